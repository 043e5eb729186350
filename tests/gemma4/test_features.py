"""The target returns chosen layers' outputs from the same forward: cache-less (scanned) and cached paths agree."""

import functools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp.gemma4.cache import KVCache
from tests.drafter.families import tiny_target

LAYERS = (0, 1, 2)


@functools.partial(nnx.jit, static_argnames="layers")
def both_paths(target, tokens_BT, layers):
    scanned, _ = target(tokens_BT, feature_layers=layers)
    cache = KVCache.init(target.config, tokens_BT.shape[0], 16, max_chunk=4)
    cached, _ = target(tokens_BT, cache, prefill=True, feature_layers=layers)
    return scanned, cached, target.final_norm(scanned.features[:, :, -1]) if layers else None


def test_feature_layers_agree_over_both_paths_and_end_in_the_last_hidden_state():
    target = tiny_target()
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 96, (2, 12)), jnp.int32)
    scanned, cached, last_normed = both_paths(target, tokens, LAYERS)
    assert scanned.features.shape == (2, 12, 3, 32) and both_paths(target, tokens, ())[0].features is None
    np.testing.assert_allclose(scanned.features, cached.features, atol=1e-5)
    np.testing.assert_allclose(last_normed, scanned.hidden, atol=1e-5)
    assert not np.allclose(scanned.features[:, :, 0], scanned.features[:, :, 1], atol=1e-3)
