"""The drafter's sequence form (training): packed documents stay apart, T queries equal T single steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp.drafter.config import DrafterConfig
from mtp.drafter.model import Drafter, TokenOrdering
from mtp.training.loss import centroid_head_loss
from tests import hf_oracle

LENGTH = 20
DOCS = (7, 12)  # the second is longer than window + 1


@nnx.jit
def target_forward(target, tokens, positions, segments):
    return target(tokens, positions_BT=positions, segments_BT=segments)[0]


@nnx.jit
def drafter_forward(drafter, target, tokens, hidden, positions, kv, segments=None):
    packing = {} if segments is None else dict(segments_BT=segments, key_segments_BS=segments)
    return drafter(target.embed_tokens(tokens), hidden, positions, kv, **packing)


@pytest.fixture(scope="module")
def ordered_drafter(targets):
    target = targets("dense")[1]
    config = DrafterConfig.for_target(
        target.config, use_ordered_embeddings=True, num_centroids=16, centroid_intermediate_top_k=4
    )
    drafter = nnx.jit(lambda: Drafter(config, rngs=nnx.Rngs(0)))()
    drafter.token_ordering.set_value(jax.random.permutation(jax.random.key(1), hf_oracle.VOCAB).astype(jnp.int32))
    return target, drafter


def test_packed_documents_match_separate_runs_and_single_steps(ordered_drafter):
    target, drafter = ordered_drafter
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, hf_oracle.VOCAB, n) for n in DOCS]
    pad = LENGTH - sum(DOCS)
    tokens = jnp.asarray(np.concatenate([*docs, np.zeros(pad, int)])[None])
    positions = jnp.asarray(np.concatenate([np.arange(n) for n in (*DOCS, pad)])[None])
    segments = jnp.asarray(np.repeat([1, 2, 0], (*DOCS, pad))[None])
    out = target_forward(target, tokens, positions, segments)
    packed = drafter_forward(drafter, target, tokens, out.hidden, positions, out.drafter_kv, segments)
    assert packed.logits_BTV.shape == (1, LENGTH, hf_oracle.VOCAB) and packed.projected_BTD.shape == (1, LENGTH, 64)

    start = 0
    for doc in docs:
        n = len(doc)
        alone_tokens = jnp.asarray(np.concatenate([doc, np.zeros(LENGTH - n, int)])[None])
        alone_segments = jnp.asarray((np.arange(LENGTH) < n)[None].astype(np.int32))
        alone_positions = jnp.arange(LENGTH)[None]
        alone_out = target_forward(target, alone_tokens, alone_positions, alone_segments)
        alone = drafter_forward(
            drafter, target, alone_tokens, alone_out.hidden, alone_positions, alone_out.drafter_kv, alone_segments
        )
        for name in ("logits_BTV", "projected_BTD"):
            got, want = getattr(packed, name)[0, start : start + n], getattr(alone, name)[0, :n]
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0, err_msg=name)
        start += n

    # One query at a time (decoding's T=1) over the unpacked second document's K/V gives the same rows.
    for t in (0, 5, 11):
        step = drafter_forward(
            drafter,
            target,
            alone_tokens[:, t : t + 1],
            alone_out.hidden[:, t : t + 1],
            alone_positions[:, t : t + 1],
            alone_out.drafter_kv,
        )
        np.testing.assert_allclose(np.asarray(step.logits_BTV[0, 0]), np.asarray(alone.logits_BTV[0, t]), atol=1e-5)


def test_token_ordering_is_not_trained(ordered_drafter):
    target, drafter = ordered_drafter
    assert isinstance(drafter.token_ordering, TokenOrdering)
    assert not isinstance(drafter.token_ordering, nnx.Param)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, hf_oracle.VOCAB, (1, LENGTH)))
    positions = jnp.arange(LENGTH)[None]
    out = target_forward(target, tokens, positions, jnp.ones_like(tokens))

    @nnx.jit
    def grad(model):
        def loss(model):
            logits = model(target.embed_tokens(tokens), out.hidden, positions, out.drafter_kv).logits_BTV
            return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        return nnx.grad(loss)(model)

    grads = grad(drafter)
    flat = dict(nnx.to_flat_state(grads))
    assert ("token_ordering",) not in flat
    for path in (("pre_projection",), ("embed",), ("layers", 0, "attn", "q"), ("final_norm", "weight")):
        assert np.all(np.isfinite(flat[path][...])) and np.any(flat[path][...] != 0), path


def test_training_hooks_agree_with_the_drafting_head(ordered_drafter):
    target, drafter = ordered_drafter
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, hf_oracle.VOCAB, (1, LENGTH)))
    positions = jnp.arange(LENGTH)[None]
    out = target_forward(target, tokens, positions, jnp.ones_like(tokens))
    mask = jnp.asarray(np.arange(LENGTH) % 3 != 0)[None]  # some positions are not trained

    @nnx.jit
    def run(model):
        args = (target.embed_tokens(tokens), out.hidden, positions, out.drafter_kv)
        features, drafted = model.features(*args), model(*args)
        teacher = target.logits(out.hidden)
        return (
            features,
            drafted,
            model.full_logits(features.normed),
            model.centroid_scores(features.normed),
            teacher,
            centroid_head_loss(model, features.normed, teacher, mask),
        )

    features, drafted, full, scores, teacher, (aux, coverage) = run(drafter)
    np.testing.assert_array_equal(np.asarray(features.projected), np.asarray(drafted.projected_BTD))
    logits = np.asarray(drafted.logits_BTV)
    chosen = logits > logits.min(-1, keepdims=True)
    assert np.all(chosen.sum(-1) == 4 * hf_oracle.VOCAB // 16)
    np.testing.assert_allclose(logits[chosen], np.asarray(full)[chosen], atol=1e-6)
    fill = np.where(chosen, -np.inf, logits).max(-1)  # one value per row, 1 below the row's lowest chosen score
    np.testing.assert_allclose(fill, np.where(chosen, logits, np.inf).min(-1) - 1, atol=1e-6)
    # The centroid loss by hand, in float64: cross-entropy of the centroid scores towards the cluster (a row of the
    # [C, V/C] ordering table) holding the target's argmax, and whether that cluster is among the top 4 scores.
    cluster_of = np.empty(hf_oracle.VOCAB, int)
    cluster_of[np.asarray(drafter.token_ordering[...]).reshape(16, -1)] = np.arange(16)[:, None]
    wanted = cluster_of[np.asarray(teacher)[0].argmax(-1)]
    scores = np.asarray(scores, np.float64)[0]
    log_probs = scores - scores.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    trained = np.asarray(mask)[0]
    covered = np.any(np.argsort(-scores, -1)[:, :4] == wanted[:, None], -1)
    np.testing.assert_allclose(aux, -log_probs[np.arange(LENGTH), wanted][trained].sum(), rtol=1e-6)
    assert coverage == covered[trained].sum() and 0 < coverage < trained.sum()
