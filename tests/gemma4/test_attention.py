"""Every attention implementation equals the dense reference: sliding windows, segments, k_eq_v, cache blocks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp.drafter.model import target_kv_mask
from mtp.gemma4 import attention
from mtp.gemma4.attention import attend, cache_mask, chunk_mask
from mtp.gemma4.config import FULL, PRESETS, SLIDING
from mtp.gemma4.model import Gemma4

TOLERANCE = {jnp.float64: 1e-6, jnp.float32: 1e-5}  # as for the oracle tests (tests/gemma4/test_oracle.py)
B, T, N, K, H = 2, 19, 4, 2, 8  # T not a multiple of the chunks: padding of queries and keys is exercised


def inputs(dtype, seed=0, length=T, cache=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (B, length, N, H), dtype)
    k = jax.random.normal(keys[1], (B, K, length, H), dtype)
    v = jax.random.normal(keys[2], (B, K, length, H), dtype)
    k_cache = jax.random.normal(keys[3], (B, K, cache, H), dtype)
    v_cache = jax.random.normal(keys[4], (B, K, cache, H), dtype)
    return q, k, v, k_cache, v_cache


def packed(length=T):
    segments = np.ones((B, length), np.int32)
    segments[0, 7:] = 2
    segments[1, -3:] = 0  # padding
    positions = np.concatenate([np.arange(7), np.arange(length - 7)])[None].repeat(B, 0)
    positions[1] = np.arange(length)
    return jnp.asarray(positions), jnp.asarray(segments)


def cases(dtype):
    q, k, v, k_cache, v_cache = inputs(dtype, cache=11)
    positions, segments = packed()
    sliding = chunk_mask(positions, segments > 0, segments, 5)
    cache_pos = jnp.broadcast_to(jnp.arange(11) - 11, (B, 11)) + 11
    cached_positions = positions + 11
    yield "full, segments", q, [(k, v, chunk_mask(positions, segments > 0, segments, None))]
    yield "sliding, segments", q, [(k, v, sliding)]
    yield "k_eq_v", q, [(k, k, sliding)]
    yield (
        "cache + chunk",
        q,
        [
            (k_cache, v_cache, cache_mask(cached_positions, cache_pos, jnp.full((B,), 11), 6)),
            (k, v, chunk_mask(cached_positions, segments > 0, None, 6)),
        ],
    )
    # The drafter: queries see only the target's K/V strictly before them (the first query sees nothing).
    yield "drafter cache-only", q, [(k, v, target_kv_mask(positions, positions, 5, segments, segments))]


@functools.cache
def all_cases(implementation, dtype, **chunks):
    """Every case's output (and its gradient wrt q, k and v), in one jitted call per implementation."""

    def run():
        outs = {}
        for name, q, blocks in cases(dtype):
            arrays = [(k, v) for k, v, _ in blocks]

            def f(q, arrays, blocks=blocks):
                blocks = [(k, v, m) for (k, v), (_, _, m) in zip(arrays, blocks, strict=True)]
                return attend(q, blocks, implementation, **chunks)

            outs[name] = f(q, arrays)
            if implementation != "fused":
                outs[name + " grad"] = jax.grad(lambda q, a, f=f: jnp.sum(jnp.sin(f(q, a))), argnums=(0, 1))(q, arrays)
        sees = {name: jnp.any(jnp.concatenate([m for _, _, m in b], axis=-1), axis=-1) for name, _, b in cases(dtype)}
        return outs, sees

    with jax.enable_x64(dtype == jnp.float64):
        return jax.device_get(jax.jit(run)())


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("implementation", ["blockwise", "fused"])
def test_implementations_equal_dense(implementation, dtype):
    """Outputs (and for blockwise, gradients) equal dense; fused gives 0, not a mean, where a row sees no key."""
    want, sees = all_cases("dense", dtype)
    got, _ = all_cases(implementation, dtype, query_chunk=4, key_chunk=8)
    for name, value in got.items():
        expected = want[name]
        if implementation == "fused":
            expected = np.where(sees[name][:, :, None, None], expected, 0)
        for g, w in zip(jax.tree.leaves(value), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(g, w, atol=TOLERANCE[dtype], rtol=0, err_msg=name)


def test_dense_layouts_agree(monkeypatch):
    """dense_attend's two layouts of its products (few queries: [B, T, K, G, H]; many: batched over (B, K)) give
    the same outputs and gradients in float64, on every case."""
    layouts = {}
    with jax.enable_x64(True):
        for name, threshold in (("few", T + 1), ("many", 1)):
            monkeypatch.setattr(attention, "MANY_QUERIES", threshold)
            layouts[name] = {}
            for case, q, blocks in cases(jnp.float64):
                arrays = [(k, v) for k, v, _ in blocks]

                weights = jax.random.normal(jax.random.key(7), q.shape, q.dtype)  # every output entry its own weight

                def f(q, arrays, blocks=blocks, weights=weights):
                    blocks = [(k, v, m) for (k, v), (_, _, m) in zip(arrays, blocks, strict=True)]
                    out = attend(q, blocks, "dense")
                    return jnp.sum(jnp.sin(out) * weights), out

                layouts[name][case] = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(q, arrays)
    for case, value in layouts["many"].items():
        for got, want in zip(jax.tree.leaves(value), jax.tree.leaves(layouts["few"][case]), strict=True):
            np.testing.assert_allclose(got, want, atol=TOLERANCE[jnp.float64], rtol=0, err_msg=case)


def test_auto_is_dense_for_short_queries_and_blockwise_for_long(monkeypatch):
    q, k, v, _, _ = inputs(jnp.float32)
    mask = chunk_mask(packed()[0], jnp.ones((B, T), bool), None, None)
    jaxpr = str(jax.make_jaxpr(lambda q: attend(q, [(k, v, mask[:, :1])]))(q[:, :1]))
    assert "scan" not in jaxpr, "decoding (one query) must keep the dense path"
    monkeypatch.setattr(attention, "QUERY_CHUNK", 4)
    assert "scan" in str(jax.make_jaxpr(lambda q: attend(q, [(k, v, mask)]))(q))


def test_model_blockwise_equals_dense(monkeypatch):
    """A whole (shrunk) target forward over a packed batch: KV-shared layers, k_eq_v, PLE, sliding windows."""
    config = PRESETS["gemma4_e2b"].replace(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        global_head_dim=16,
        sliding_window=6,
        num_layers=5,
        layer_types=(SLIDING, SLIDING, FULL, SLIDING, FULL),
        num_kv_shared_layers=2,
        attention_k_eq_v=True,
        num_global_kv_heads=1,
        per_layer_vocab_size=64,
        per_layer_input_dim=4,
    )
    positions, segments = packed()
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, 64)
    monkeypatch.setattr(attention, "QUERY_CHUNK", 4)
    monkeypatch.setattr(attention, "KEY_CHUNK", 8)

    @jax.jit
    def both():
        logits = []
        for implementation in ("dense", "auto"):
            model = Gemma4(config.replace(attention_impl=implementation), rngs=nnx.Rngs(0))
            out, _ = model(tokens, positions_BT=positions, segments_BT=segments, dtype=jnp.float64)
            logits.append(out.logits)
        return logits

    with jax.enable_x64(True):
        dense, auto = both()
    valid = np.asarray(segments > 0)[..., None]
    np.testing.assert_allclose(auto * valid, dense * valid, atol=TOLERANCE[jnp.float64], rtol=0)
