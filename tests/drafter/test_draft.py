"""The draft loop: greedy drafts equal transformers' step-by-step loop; drafting from our target's KV cache."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mtp.drafter.draft import draft
from mtp.gemma4.cache import KVCache
from tests import hf_oracle
from tests.drafter.conftest import hf_step_inputs, layer_kv, token_ids

POSITION, STEPS = 12, 3


@functools.partial(nnx.jit, static_argnames=("num_tokens", "temperature"))
def jit_draft(drafter, target, token, hidden, position, kv, num_tokens, temperature=0.0, keys=None):
    return draft(
        drafter, target, token, hidden, position, kv, num_tokens=num_tokens, temperature=temperature, keys_B=keys
    )


def hf_greedy_loop(hf_target, hf_assistant, token, hidden, shared_kv, steps):
    """What transformers' candidate generator does (batch 1): argmax token and projected state fed back."""
    tokens, logits = [], []
    for _ in range(steps):
        with torch.no_grad():
            embed = hf_target.model.embed_tokens(torch.as_tensor(token[:, None])).numpy()
        inputs = np.concatenate([embed, hidden], axis=-1)
        out = hf_oracle.reference_draft_step(hf_assistant, inputs, np.array([[POSITION]]), shared_kv)
        token, hidden = out["logits"][:, 0].argmax(-1), out["projected"]
        tokens.append(token)
        logits.append(out["logits"][:, 0])
    return np.stack(tokens, 1), np.stack(logits, 1)


def hf_greedy_rows(hf_target, hf_assistant, token, hidden, shared_kv, steps):
    """The loop one row at a time (transformers' centroid fill is a batch-global min; ours is per row)."""
    rows = []
    for b in range(len(token)):
        kv = {t: (k[b : b + 1], v[b : b + 1]) for t, (k, v) in shared_kv.items()}
        rows.append(hf_greedy_loop(hf_target, hf_assistant, token[b : b + 1], hidden[b : b + 1], kv, steps))
    return np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])


@pytest.mark.parametrize(
    ("kind", "ordered"), [("dense", False), ("e2b_like", True), ("moe_like", False), ("keqv_like", True)]
)
def test_greedy_draft_matches_transformers_loop(kind, ordered, targets, assistants):
    hf_target, target = targets(kind)
    hf_assistant, _, drafter = assistants(kind, ordered)
    ids = token_ids(2, POSITION + 2, seed=11)
    _, hidden, shared_kv = hf_step_inputs(hf_target, ids, POSITION)
    want_tokens, want_logits = hf_greedy_rows(hf_target, hf_assistant, ids[:, POSITION], hidden, shared_kv, STEPS)
    top2 = np.sort(want_logits, axis=-1)[..., -2:]
    assert np.all(top2[..., 1] - top2[..., 0] > 1e-3), "near-tie: the token comparison would be fragile"
    got = jit_draft(
        drafter,
        target,
        jnp.asarray(ids[:, POSITION]),
        jnp.asarray(hidden[:, 0]),
        jnp.full((2,), POSITION),
        layer_kv(shared_kv),
        STEPS,
    )
    np.testing.assert_array_equal(np.asarray(got.tokens_BP), want_tokens, err_msg=kind)
    assert got.logits_BPV.shape == (2, STEPS, hf_oracle.VOCAB)
    # float32 summation order (XLA's products vs torch's) compounds over the recurrent steps: up to 6e-5 at step 3.
    np.testing.assert_allclose(np.asarray(got.logits_BPV), want_logits, atol=1e-4, rtol=0, err_msg=kind)


def test_draft_from_target_cache_ignores_uncommitted_entries(targets, assistants):
    """Drafting over our target's KV cache after a partly rejected verify chunk equals drafting over clean K/V."""
    _, target = targets("e2b_like")
    _, _, drafter = assistants("e2b_like", True)
    ids = jnp.asarray(token_ids(2, 16, seed=12))
    forward = nnx.jit(lambda model, tokens, cache: model(tokens, cache))
    cache = KVCache.init(target.config, 2, 24, max_chunk=4)
    _, cache = forward(target, ids[:, :12], cache)
    cache = cache.commit(jnp.full((2,), 12))
    verify, cache = forward(target, ids[:, 12:16], cache)  # tokens 13..15 play rejected drafts
    cache = cache.commit(jnp.ones((2,), jnp.int32))
    position = jnp.full((2,), 13)
    got = jit_draft(drafter, target, ids[:, 13], verify.hidden[:, 0], position, verify.drafter_kv, STEPS)

    clean, _ = nnx.jit(lambda model, tokens: model(tokens))(target, ids[:, :13])
    want = jit_draft(drafter, target, ids[:, 13], clean.hidden[:, 12], position, clean.drafter_kv, STEPS)
    np.testing.assert_array_equal(np.asarray(got.tokens_BP), np.asarray(want.tokens_BP))
    np.testing.assert_allclose(np.asarray(got.logits_BPV), np.asarray(want.logits_BPV), atol=5e-5, rtol=0)


def test_sampled_draft(targets, assistants):
    hf_target, target = targets("dense")
    _, _, drafter = assistants("dense", False)
    ids = token_ids(2, POSITION + 2, seed=11)
    _, hidden, shared_kv = hf_step_inputs(hf_target, ids, POSITION)
    args = (
        drafter,
        target,
        jnp.asarray(ids[:, POSITION]),
        jnp.asarray(hidden[:, 0]),
        jnp.full((2,), POSITION),
        layer_kv(shared_kv),
        4,
    )
    greedy = jit_draft(*args)
    samples = [jit_draft(*args, temperature=2.0, keys=jax.random.split(jax.random.key(seed), 2)) for seed in range(4)]
    again = jit_draft(*args, temperature=2.0, keys=jax.random.split(jax.random.key(0), 2))
    # Rows draw from their own keys only: row 1 alone with its key drafts what it drafted beside row 0.
    row_1 = jax.tree.map(lambda x: x[1:], args[2:6])
    alone = jit_draft(*args[:2], *row_1, 4, temperature=2.0, keys=jax.random.split(jax.random.key(0), 2)[1:])
    np.testing.assert_array_equal(np.asarray(alone.tokens_BP[0]), np.asarray(samples[0].tokens_BP[1]))
    np.testing.assert_array_equal(np.asarray(again.tokens_BP), np.asarray(samples[0].tokens_BP))
    assert any(not np.array_equal(s.tokens_BP, greedy.tokens_BP) for s in samples)
    assert any(not np.array_equal(s.tokens_BP, samples[0].tokens_BP) for s in samples[1:])
    for s in samples:  # the first step's logits do not depend on the sampling; later ones follow the samples
        np.testing.assert_array_equal(np.asarray(s.logits_BPV[:, 0]), np.asarray(greedy.logits_BPV[:, 0]))
        assert s.tokens_BP.dtype == jnp.int32 and np.all((s.tokens_BP >= 0) & (s.tokens_BP < hf_oracle.VOCAB))


def test_draft_rejects_bad_arguments(targets, assistants):
    _, target = targets("dense")
    _, _, drafter = assistants("dense", False)
    token, hidden, position = jnp.zeros((1,), jnp.int32), jnp.zeros((1, 64)), jnp.full((1,), 3)
    args = (drafter, target, token, hidden, position, {})
    limit = drafter.config.max_draft_len
    with pytest.raises(ValueError, match=f"max_draft_len={limit}"):
        draft(*args, num_tokens=limit + 1)
    with pytest.raises(ValueError, match="num_tokens=0"):
        draft(*args, num_tokens=0)
    with pytest.raises(ValueError, match="PRNG key"):
        draft(*args, num_tokens=2, temperature=0.7)
    with pytest.raises(ValueError, match="temperature=-1"):
        draft(*args, num_tokens=2, temperature=-1.0)
