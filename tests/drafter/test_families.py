"""Every drafter family through the one interface: training unrolls it as drafting runs it, a few steps lower its
loss, and saving then loading gives back the same parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mtp.drafter import Anchor, draft, family_of, load_drafter, save_drafter
from mtp.gemma4.cache import KVCache
from mtp.gemma4.model import drafter_kv_from_cache
from mtp.training.loss import LossConfig, distill_loss, frozen_target, unroll
from tests.drafter.families import NAMES, NEW_FAMILIES, make_drafter, params_of, tiny_target

DEPTH, LENGTH = 3, 24
ANCHORS = np.array([5, 13], np.int32)  # 13: past the sliding window (8), so the target's ring cache wraps


@pytest.fixture(scope="module")
def target():
    return tiny_target()


@pytest.fixture(scope="module")
def drafters(target):
    return {family: make_drafter(family, target, max_draft_len=DEPTH) for family in NAMES}


def batch_of(tokens: np.ndarray) -> dict:
    rows, length = tokens.shape
    return {
        "tokens": jnp.asarray(tokens, jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length)),
        "segment_ids": jnp.ones((rows, length), jnp.int32),
        "loss_mask": jnp.ones((rows, length), jnp.int32),
    }


@nnx.jit(static_argnames="layers")
def propose(drafter, target, tokens_BL, anchor_B, layers):
    """The target's cache committed up to the anchor q, then DEPTH greedy drafts from x_q as the decode loop runs."""
    batch = tokens_BL.shape[0]
    cache = KVCache.init(target.config, batch, LENGTH + DEPTH + 1, max_chunk=DEPTH)
    out, cache = target(tokens_BL, cache, num_valid_B=anchor_B, prefill=True, feature_layers=layers)
    cache = cache.commit(anchor_B)
    token_B = tokens_BL[jnp.arange(batch), anchor_B]
    kv = drafter_kv_from_cache(target.config, cache)
    return draft(drafter, target, token_B, Anchor.at(out, anchor_B - 1), anchor_B, kv, num_tokens=DEPTH)


@nnx.jit
def training_logits(drafter, target, batch):
    target_out = frozen_target(target, batch, jnp.float32, drafter.feature_layers)
    table = drafter.vocab_table(target)
    return [drafter.full_logits(d.features.normed, table) for d in unroll(drafter, target, target_out, batch, DEPTH)]


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_training_unrolls_the_drafter_as_drafting_runs_it(target, drafters, family):
    """Depth j at anchor q of the teacher-forced unroll == draft step j from the cache committed up to q, when the
    sequence continues with the drafter's own greedy drafts (so every depth is fed the same tokens)."""
    drafter = drafters[family]
    tokens = np.random.default_rng(0).integers(3, target.config.vocab_size, (len(ANCHORS), LENGTH)).astype(np.int32)
    proposal = propose(drafter, target, jnp.asarray(tokens), jnp.asarray(ANCHORS), drafter.feature_layers)
    for row, q in enumerate(ANCHORS):
        tokens[row, q + 1 : q + DEPTH] = np.asarray(proposal.tokens_BP[row, : DEPTH - 1])
    depths = jax.device_get(training_logits(drafter, target, batch_of(tokens)))
    for row, q in enumerate(ANCHORS):
        for j, logits in enumerate(depths):
            np.testing.assert_allclose(
                logits[row, q], proposal.logits_BPV[row, j], atol=5e-5, rtol=0, err_msg=f"{family} q={q} depth {j}"
            )


@pytest.mark.parametrize("family", NAMES)
def test_a_few_steps_lower_the_loss(target, family):
    drafter = make_drafter(family, target, max_draft_len=DEPTH, seed=1)
    batch = batch_of(np.random.default_rng(1).integers(3, target.config.vocab_size, (4, LENGTH)))
    config = LossConfig(depth=DEPTH, chunk_size=8)
    graph, params, rest = nnx.split(drafter, nnx.Param, ...)
    tx = optax.adam(1e-2)

    @jax.jit
    def steps(params):
        target_out = frozen_target(target, batch, jnp.float32, drafter.feature_layers)

        def loss_fn(p):
            return distill_loss(nnx.merge(graph, p, rest), target, target_out, batch, config)[0]

        def one(carry, _):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(one, (params, tx.init(params)), length=6)
        return losses, loss_fn(params)

    losses, final = jax.device_get(steps(params))
    assert final < 0.9 * losses[0], (family, losses, final)


@pytest.mark.parametrize("family", NAMES)
def test_save_and_load_round_trip_exactly(target, drafters, family, tmp_path):
    drafter = drafters[family]
    save_drafter(drafter, tmp_path / family)
    assert family_of(tmp_path / family) == family
    loaded = load_drafter(tmp_path / family, target_config=target.config, max_draft_len=DEPTH)
    assert type(loaded) is type(drafter) and loaded.config == drafter.config
    want, got = params_of(drafter), params_of(loaded)
    assert want.keys() == got.keys()
    for path, value in want.items():
        np.testing.assert_array_equal(got[path], value, err_msg=f"{family} {path}")
