"""The loss unrolls the drafter exactly as inference runs it, and reduces the depths to the documented number."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp.drafter.config import DrafterConfig
from mtp.drafter.draft import draft
from mtp.drafter.model import Drafter
from mtp.gemma4.cache import KVCache
from mtp.gemma4.config import config_from_hf
from mtp.gemma4.layers import first_argmax
from mtp.gemma4.model import Gemma4, drafter_kv_from_cache
from mtp.training.loss import (
    LossConfig,
    cross_entropy,
    distill_loss,
    frozen_target,
    unroll,
    vocab_projection,
)
from tests import hf_oracle

DEPTH = 3
LENGTH = 32
DOCS = {"A": 9, "B": 20}  # packed in this order, then 3 pad tokens
USER = {"A": 3, "B": 7}  # the first tokens of each document are a user turn: no loss on predicting them
# (document, anchor q): the first anchor after a document boundary; predictions inside the user turn (masked)
# and after it; an anchor beyond the sliding window (8 + 1), so the target's ring cache wraps; an anchor whose
# deepest prediction would fall in the next document (not trained). Every anchor has q + DEPTH <= its length.
CASES = [("B", 1), ("B", 4), ("B", 14), ("A", 6)]


@pytest.fixture(scope="module")
def target():
    config = config_from_hf(hf_oracle.tiny_text_config_dict("e2b_like") | {"model_type": "gemma4_text"})
    return Gemma4(config, rngs=nnx.Rngs(0))


def make_drafter(target, ordered: bool) -> Drafter:
    config = DrafterConfig.for_target(
        target.config,
        num_layers=2,
        hidden_size=32,
        max_draft_len=DEPTH,
        use_ordered_embeddings=ordered,
        num_centroids=16,
        centroid_intermediate_top_k=4,
    )
    drafter = Drafter(config, rngs=nnx.Rngs(1))
    if ordered:
        ordering = jax.random.permutation(jax.random.key(2), hf_oracle.VOCAB).astype(jnp.int32)
        drafter.token_ordering.set_value(ordering)
    return drafter


@nnx.jit
def prefill(target, prefix_BL, anchor_B):
    """The target's cache committed up to the anchor q (x_<q) and its last hidden state h_{q-1}."""
    batch = prefix_BL.shape[0]
    cache = KVCache.init(target.config, batch, prefix_BL.shape[1] + DEPTH + 1, max_chunk=DEPTH)
    out, cache = target(prefix_BL, cache, num_valid_B=anchor_B, return_logits=False, prefill=True)
    return cache.commit(anchor_B), out.hidden[jnp.arange(batch), anchor_B - 1]


@nnx.jit
def propose(drafter, target, cache, token_B, hidden_BD, anchor_B):
    """DEPTH greedy draft steps from x_q at q over the committed cache, as the decode loop calls them."""
    kv = drafter_kv_from_cache(target.config, cache)
    return draft(drafter, target, token_B, hidden_BD, anchor_B, kv, num_tokens=DEPTH)


@nnx.jit
def verify(target, cache, chunk_BT):
    return target(chunk_BT, cache)[0].logits


@nnx.jit
def target_forward(target, batch):
    return frozen_target(target, batch, jnp.float32)


@nnx.jit
def training(drafter, target, target_out, batch):
    """Per depth: the drafting head's logits, the teacher's logits and the trained anchors of the loss's unroll."""
    depths = unroll(drafter, target, target_out, batch, DEPTH)
    return [(drafter.logits(d.features.normed), target.logits(d.teacher_hidden_BTD), d.valid_BT) for d in depths]


def packed_batch(docs: list[dict[str, np.ndarray]]) -> dict[str, jax.Array]:
    """One row per entry: documents A and B packed, a user turn at the start of each, then padding."""
    rows = {name: [] for name in ("tokens", "loss_mask", "segment_ids", "positions")}
    pad = LENGTH - sum(DOCS.values())
    for row in docs:
        rows["tokens"].append(np.concatenate([row["A"], row["B"], np.zeros(pad, np.int32)]))
        rows["loss_mask"].append(np.concatenate([np.arange(n) >= USER[d] for d, n in DOCS.items()] + [np.zeros(pad)]))
        rows["segment_ids"].append(np.repeat([1, 2, 0], [*DOCS.values(), pad]))
        rows["positions"].append(np.concatenate([np.arange(n) for n in (*DOCS.values(), pad)]))
    return {k: jnp.asarray(np.stack(v).astype(np.int32)) for k, v in rows.items()}


@pytest.mark.parametrize("ordered", [False, True], ids=["tied_head", "centroid_head"])
def test_the_loss_unrolls_the_drafter_as_draft_runs_it(target, ordered):
    """Depth j at anchor p of the teacher-forced unroll == draft() step j from the target's cache committed up to p.

    Each document is made to continue, after the anchor, with the drafter's own greedy proposals: teacher forcing
    then feeds exactly the tokens draft() feeds, so every depth is comparable (not only the first).
    """
    drafter = make_drafter(target, ordered)
    rng = np.random.default_rng(0)
    docs = [{d: rng.integers(3, hf_oracle.VOCAB, n).astype(np.int32) for d, n in DOCS.items()} for _ in CASES]
    anchors = np.array([q for _, q in CASES], np.int32)
    prefixes = np.stack([np.pad(row[d], (0, DOCS["B"] - DOCS[d])) for row, (d, _) in zip(docs, CASES, strict=True)])
    cache, hidden = prefill(target, jnp.asarray(prefixes), jnp.asarray(anchors))
    token = jnp.asarray(prefixes[np.arange(len(CASES)), anchors])  # x_q: the newest token, not yet in the cache
    proposal = propose(drafter, target, cache, token, hidden, jnp.asarray(anchors))
    proposed = np.asarray(proposal.tokens_BP)
    # The target verifies [x_q, drafts]: its logits there are the teacher of each depth.
    verify_logits = verify(target, cache, jnp.concatenate([token[:, None], proposal.tokens_BP[:, : DEPTH - 1]], 1))
    for row, (d, q), tokens in zip(docs, CASES, proposed, strict=True):
        row[d][q + 1 : q + DEPTH] = tokens[: DEPTH - 1]  # x_{q+1}, x_{q+2}: what draft() fed at depths 1, 2

    batch = packed_batch(docs)
    depths = jax.device_get(training(drafter, target, target_forward(target, batch), batch))
    proposal, verify_logits = jax.device_get((proposal, verify_logits))
    offsets = {"A": 0, "B": DOCS["A"]}
    # The logits reach ~30 here: 3e-5 is a few float32 ulps (the two sides sum attention in different orders).
    for r, (d, q) in enumerate(CASES):
        for j, (student, teacher, _) in enumerate(depths):
            where = f"{'centroid' if ordered else 'tied'} head, document {d}, anchor {q}, depth {j}"
            p = offsets[d] + q
            np.testing.assert_allclose(student[r, p], proposal.logits_BPV[r, j], atol=3e-5, rtol=0, err_msg=where)
            np.testing.assert_allclose(teacher[r, p], verify_logits[r, j], atol=3e-5, rtol=0, err_msg=where)
    # Trained: anchors q >= 1 (inference drafts after a prefix) whose prediction x_{q+j+1} is in the document's
    # model turn; nothing in the padding.
    for j, (_, _, valid) in enumerate(depths):
        expected = np.zeros(LENGTH, bool)
        for d, n in DOCS.items():
            q = np.arange(n)
            expected[offsets[d] : offsets[d] + n] = (q >= 1) & (q + j + 1 < n) & (q + j + 1 >= USER[d])
        np.testing.assert_array_equal(valid, np.broadcast_to(expected, valid.shape), err_msg=f"depth {j}")


def test_the_loss_is_the_decayed_mean_of_the_per_depth_divergences(target):
    """distill_loss from the unroll's logits, recomputed in float64: KL per trained anchor, centroid CE, weights."""
    drafter = make_drafter(target, ordered=True)
    rng = np.random.default_rng(1)
    batch = packed_batch([{d: rng.integers(3, hf_oracle.VOCAB, n) for d, n in DOCS.items()} for _ in CASES])
    config = LossConfig(depth=DEPTH, divergence="kl", depth_decay=0.5, chunk_size=8, centroid_weight=0.3)

    @nnx.jit
    def run(drafter, target, target_out, batch):
        depths = unroll(drafter, target, target_out, batch, DEPTH)
        parts = [
            (
                drafter.full_logits(d.features.normed),
                drafter.centroid_scores(d.features.normed),
                target.logits(d.teacher_hidden_BTD),
                d.valid_BT,
                jnp.argmax(drafter.logits(d.features.normed), axis=-1),
                drafter.drafted_tokens(d.features.normed, drafter.full_logits(d.features.normed)),
            )
            for d in depths
        ]
        return distill_loss(drafter, target, target_out, batch, config), parts

    (loss, metrics), parts = jax.device_get(run(drafter, target, target_forward(target, batch), batch))
    cluster_of = np.empty(hf_oracle.VOCAB, int)  # row c of the [C, V/C] ordering table lists cluster c's tokens
    cluster_of[np.asarray(drafter.token_ordering[...]).reshape(16, -1)] = np.arange(16)[:, None]

    def log_softmax(x):
        x = np.asarray(x, np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    total, kl_per_depth, coverage, agreement = 0.0, [], [], []
    for j, (student, scores, teacher, valid, drafted, from_full) in enumerate(parts):
        valid = np.asarray(valid)
        log_p, log_q = log_softmax(teacher)[valid], log_softmax(student)[valid]
        kl = np.sum(np.exp(log_p) * (log_p - log_q), -1)
        wanted = cluster_of[np.argmax(np.asarray(teacher)[valid], -1)]
        ce = -np.take_along_axis(log_softmax(scores)[valid], wanted[:, None], -1)[:, 0]
        top4 = np.argsort(-np.asarray(scores)[valid], -1)[:, :4]
        total += 0.5**j * (kl.sum() + 0.3 * ce.sum()) / valid.sum()
        kl_per_depth.append(kl.mean())
        coverage.append(np.mean(np.any(top4 == wanted[:, None], -1)))
        # What inference sees: the centroid-masked head's proposal (the unroll's proposals are draft()'s, as the
        # test above shows), not the full head's argmax.
        agreement.append(np.mean(drafted[valid] == np.argmax(np.asarray(teacher)[valid], -1)))
        np.testing.assert_array_equal(from_full, drafted, err_msg=f"depth {j}: the metrics' drafted tokens")
        assert np.any(drafted != np.argmax(student, -1)), "the fixture should tell the two heads apart"
    np.testing.assert_allclose(loss, total / (1 + 0.5 + 0.25), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_per_depth"], kl_per_depth, rtol=1e-5)
    np.testing.assert_allclose(metrics["centroid_coverage"], coverage, rtol=1e-6)
    np.testing.assert_allclose(metrics["top1_agreement"], agreement, rtol=1e-6)


def test_remat_sequence_chunks_and_the_once_computed_teacher_change_neither_the_loss_nor_the_gradients(target):
    """Rematerializing each drafter layer, or each whole depth in chunks of 8 anchors, or projecting the teacher per
    depth in vocabulary chunks instead of once for all depths (``whole_teacher_bytes=0``), gives the same numbers,
    metrics included."""
    drafter = make_drafter(target, ordered=True)
    rng = np.random.default_rng(2)
    batch = packed_batch([{d: rng.integers(3, hf_oracle.VOCAB, n) for d, n in DOCS.items()} for _ in CASES])
    target_out = target_forward(target, batch)
    variants = {
        "once": dict(remat="none", seq_chunk=0),
        "layer": dict(remat="layer", seq_chunk=0),
        "depth": dict(remat="depth", seq_chunk=8),
        "per_depth": dict(remat="none", seq_chunk=0, whole_teacher_bytes=0),
    }

    @jax.jit
    def grads(params, rest):
        out = {}
        for name, kwargs in variants.items():
            config = LossConfig(depth=DEPTH, chunk_size=4, **kwargs)

            def loss_fn(p, config=config):
                return distill_loss(nnx.merge(graph, p, rest), target, target_out, batch, config)

            out[name] = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return out

    graph, params, rest = nnx.split(drafter, nnx.Param, ...)
    out = jax.device_get(grads(params, rest))
    for name in ("once", "layer", "depth"):
        for got, want in zip(jax.tree.leaves(out[name]), jax.tree.leaves(out["per_depth"]), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5, err_msg=name)


def test_the_fused_cross_entropy_has_the_plain_formulas_value_and_gradients():
    """cross_entropy's custom backward == jax.grad of -Σ p log softmax(s), for both arguments, in float64."""
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(3), 3)
        p = jax.nn.softmax(3 * jax.random.normal(keys[0], (2, 5, 64), jnp.float64), axis=-1)
        logits = 20 * jax.random.normal(keys[1], (2, 5, 64), jnp.float64)  # large logits: no cancellation either
        weight = jax.random.normal(keys[2], (2, 5), jnp.float64)

        def plain(p, logits):
            return jnp.sum(weight * -jnp.sum(p * jax.nn.log_softmax(logits, axis=-1), axis=-1))

        def fused(p, logits):
            return jnp.sum(weight * cross_entropy(p, logits))

        want = jax.value_and_grad(plain, argnums=(0, 1))(p, logits)
        got = jax.value_and_grad(fused, argnums=(0, 1))(p, logits)
        for name, g, w in zip(
            ("value", "grad p", "grad logits"), jax.tree.leaves(got), jax.tree.leaves(want), strict=True
        ):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize(
    "dtype, rtol", [(jnp.float64, 1e-13), (jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)], ids=["f64", "f32", "bf16"]
)
def test_vocab_projection_has_the_einsums_value_and_gradients(dtype, rtol):
    """The student head's custom backward (no transposed [V, B T] gradient; on CPU the table's gradient made as
    [E, V] and transposed after) == jax.grad of the plain einsum, for the input and the table, jitted."""

    def plain(h_BTE, table_VE):
        return jnp.einsum("BTE,VE->BTV", h_BTE, table_VE, preferred_element_type=jnp.promote_types(dtype, jnp.float32))

    def value_and_grads(head, h_BTE, table_VE, c_BTV):  # a cotangent that is not all ones, through a nonlinearity
        return jax.jit(jax.value_and_grad(lambda h, t: jnp.sum(jnp.sin(head(h, t)) * c_BTV), argnums=(0, 1)))(
            h_BTE, table_VE
        )

    with jax.enable_x64(dtype == jnp.float64):
        keys = jax.random.split(jax.random.key(5), 3)
        h_BTE = jax.random.normal(keys[0], (2, 5, 6), dtype)
        table_VE = jax.random.normal(keys[1], (11, 6), dtype)
        c_BTV = jax.random.normal(keys[2], (2, 5, 11), jnp.promote_types(dtype, jnp.float32))
        want = jax.tree.leaves(value_and_grads(plain, h_BTE, table_VE, c_BTV))
        got = jax.tree.leaves(value_and_grads(vocab_projection, h_BTE, table_VE, c_BTV))
    assert [x.dtype for x in got] == [x.dtype for x in want]
    assert [x.shape for x in got] == [(), h_BTE.shape, table_VE.shape]
    for name, got_x, want_x in zip(("value", "grad h", "grad table"), got, want, strict=True):
        np.testing.assert_allclose(
            np.float64(got_x), np.float64(want_x), rtol=rtol, atol=rtol * np.abs(want_x).max(), err_msg=name
        )


def test_first_argmax_is_argmax_ties_included():
    rng = np.random.default_rng(4)
    x = rng.integers(0, 5, (3, 7, 40)).astype(np.float32)  # many equal maxima per row
    x[0, 0] = -np.inf
    x[0, 1, 5] = np.inf
    np.testing.assert_array_equal(first_argmax(jnp.asarray(x)), np.argmax(x, axis=-1))
