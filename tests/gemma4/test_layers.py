"""The mixture of experts gives the same answer in tiles (long sequences) as with ``ragged_dot`` (decoding)."""

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
