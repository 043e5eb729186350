"""The splash (Pallas TPU) kernel, interpreted on CPU, equals dense attention; ``auto`` picks by platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp.gemma4 import attention
from mtp.gemma4.attention import SelfMask, attend, choose_implementation, chunk_mask
from mtp.gemma4.config import FULL, PRESETS, SLIDING, ConfigError
from mtp.gemma4.model import Gemma4

ATOL = 1e-5  # float32, as for the oracle tests (tests/gemma4/test_attention.py)
B, T, H = 1, 128, 8  # one splash tile: interpret mode is slow


def packed():
    segments = np.ones((B, T), np.int32)
    segments[0, 50:] = 2
    segments[0, -9:] = 0  # padding
    positions = np.concatenate([np.arange(50), np.arange(T - 50)])[None]
    return jnp.asarray(positions), jnp.asarray(segments)


@pytest.mark.parametrize(
    "heads, kv_heads, window, segmented",
    [(1, 1, None, False), (2, 1, 5, True)],
    ids=["causal", "gqa-window-segments"],  # GQA and segments under full attention: the model test
)
def test_splash_equals_dense(heads, kv_heads, window, segmented):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (B, T, heads, H))
    k, v = (jax.random.normal(key, (B, kv_heads, T, H)) for key in keys[1:])
    positions, segments = packed() if segmented else (jnp.arange(T)[None], None)
    valid = jnp.ones((B, T), bool) if segments is None else segments > 0
    mask = chunk_mask(positions, valid, segments, window)
    splash = jax.jit(lambda q: attend(q, [(k, v, mask)], "splash", self_mask=SelfMask(segments, window)))
    dense = attend(q, [(k, v, mask)], "dense")
    if segmented:  # under a mesh the kernel runs per device on its rows (shard_map): one CPU device here
        mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # as the train step traces
            assert "shard_map" in str(jax.make_jaxpr(splash)(q))
            splash = splash.lower(q).compile()
    splash = splash(q)
    keep = np.asarray(valid)[..., None, None]  # padding queries read different padding (see SelfMask)
    np.testing.assert_allclose(splash * keep, dense * keep, atol=ATOL, rtol=0)


def test_auto_picks_by_platform(monkeypatch):
    q = lambda length, dtype=jnp.float32, head_dim=H: jax.ShapeDtypeStruct((B, length, 2, head_dim), dtype)
    structure = SelfMask(None, None)
    assert choose_implementation("auto", q(T), structure) == "dense"  # CPU: today's rule
    assert choose_implementation("auto", q(512), structure) == "blockwise"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert choose_implementation("auto", q(T), structure) == "splash"
    assert choose_implementation("auto", q(T), None) == "dense", "a cache or the drafter: no splash"
    assert choose_implementation("auto", q(T + 1), structure) == "dense", "not whole tiles"
    assert choose_implementation("splash", q(1), None) == "dense", "splash decodes densely"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert choose_implementation("auto", q(T, jnp.bfloat16), None) == "fused"
    assert choose_implementation("auto", q(T, jnp.bfloat16, 512), None) == "dense", "head dim past cuDNN's"
    assert choose_implementation("auto", q(T, jnp.bfloat16), None, num_keys=T + 1) == "dense", "odd S"
    assert choose_implementation("auto", q(512), None) == "blockwise", "float32: no cuDNN"
    with pytest.raises(ValueError, match="flash"):
        choose_implementation("flash", q(T), None)
    with pytest.raises(ConfigError, match="flash"):
        PRESETS["gemma4_e2b"].replace(attention_impl="flash")


def test_model_splash_equals_dense():
    """A whole (shrunk) cache-less target forward over a packed row in float32 (the kernel has no float64): k_eq_v,
    GQA, head dims 8 and 16 (padded to the kernel's 128), a sliding and a full layer."""
    config = PRESETS["gemma4_e2b"].replace(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        global_head_dim=16,
        sliding_window=6,
        num_layers=2,
        layer_types=(SLIDING, FULL),
        num_kv_shared_layers=0,
        attention_k_eq_v=True,
        num_global_kv_heads=1,
        per_layer_vocab_size=64,
        per_layer_input_dim=4,
    )
    positions, segments = packed()
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, 64)

    # Shapes from eval_shape, weights from numpy: initializing the model itself costs ~20 s of compiles here.
    def model(implementation):
        return nnx.split(
            nnx.eval_shape(lambda: Gemma4(config.replace(attention_impl=implementation), rngs=nnx.Rngs(0)))
        )

    rng = np.random.default_rng(0)
    weights = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), model("dense")[1])

    def logits(implementation):
        graph = model(implementation)[0]
        forward = jax.jit(lambda w: nnx.merge(graph, w)(tokens, positions_BT=positions, segments_BT=segments)[0])
        return forward(weights).logits

    dense, splash = logits("dense"), logits("splash")
    valid = np.asarray(segments > 0)[..., None]
    np.testing.assert_allclose(splash * valid, dense * valid, atol=ATOL, rtol=0)
    assert attention.SPLASH_BLOCK == T
