"""Experts in tiles equal ``ragged_dot``, the chunked MLP the whole, ``project`` (value, gradients) its einsum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp.gemma4 import layers
from mtp.gemma4.layers import MixtureOfExperts


@pytest.mark.parametrize("length", [11, 12], ids=["tiles", "chunks_of_tiles"])
def test_tiled_experts_equal_ragged_dot(monkeypatch, length):
    moe = MixtureOfExperts(16, 8, num_experts=6, top_k=2, eps=1e-6, rngs=nnx.Rngs(0))
    x_BTD, residual_BTD = jax.random.normal(jax.random.key(1), (2, 2, length, 16), jnp.float64)
    monkeypatch.setattr(layers, "MOE_CHUNK", 4)  # 12 positions: three chunks of 4; 11 does not divide

    @nnx.jit
    def both(moe, x_BTD, residual_BTD):
        return moe.ragged(x_BTD, residual_BTD), moe(x_BTD, residual_BTD)

    monkeypatch.setattr(layers, "EXPERT_TILE", 3)  # tiles that split groups and leave some empty
    with jax.enable_x64(True):
        ragged, tiled = both(moe, x_BTD.astype(jnp.float64), residual_BTD.astype(jnp.float64))
    assert float(jnp.max(jnp.abs(ragged))) > 0.1
    np.testing.assert_allclose(tiled, ragged, atol=1e-12, rtol=0)


def test_chunked_mlp_equals_the_whole_sequence(monkeypatch):
    mlp = layers.MLP(16, 24, rngs=nnx.Rngs(0))
    x_BTD = jax.random.normal(jax.random.key(1), (2, 12, 16))
    monkeypatch.setattr(layers, "MLP_CHUNK", 4)
    chunked = jax.jit(lambda x: mlp(x))(x_BTD)
    np.testing.assert_allclose(chunked, mlp.dense(x_BTD), atol=1e-6, rtol=0)


@pytest.mark.parametrize("width, out", [(6, 7), (7, 6)], ids=["widening", "narrowing"])  # both weight gradients
@pytest.mark.parametrize(
    "dtype, rtol", [(jnp.float64, 1e-13), (jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)], ids=["f64", "f32", "bf16"]
)
def test_project_value_and_gradients_equal_the_einsum(dtype, rtol, width, out):
    def plain(x_BTD, w_DF):
        return jnp.einsum("BTD,DF->BTF", x_BTD, w_DF)

    def value_and_grads(project, x_BTD, w_DF, c_BTF):  # a cotangent that is not all ones, through a nonlinearity
        return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(project(x, w)) * c_BTF), argnums=(0, 1)))(
            x_BTD, w_DF
        )

    with jax.enable_x64(dtype == jnp.float64):
        x_BTD = jax.random.normal(jax.random.key(0), (2, 5, width), dtype)
        w_DF = jax.random.normal(jax.random.key(1), (width, out), dtype)
        c_BTF = jax.random.normal(jax.random.key(2), (2, 5, out), dtype)
        np.testing.assert_array_equal(jax.jit(layers.project)(x_BTD, w_DF), jax.jit(plain)(x_BTD, w_DF))
        want = jax.tree.leaves(value_and_grads(plain, x_BTD, w_DF, c_BTF))
        got = jax.tree.leaves(value_and_grads(layers.project, x_BTD, w_DF, c_BTF))
    assert [x.dtype for x in got] == [x.dtype for x in want] == [dtype] * 3
    for got_x, want_x in zip(got, want, strict=True):
        np.testing.assert_allclose(np.float64(got_x), np.float64(want_x), rtol=rtol, atol=rtol * np.abs(want_x).max())
