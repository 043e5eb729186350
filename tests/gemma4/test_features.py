"""The target returns chosen layers' outputs from the same forward: cache-less (scanned) and cached paths agree."""

import jax.numpy as jnp
import numpy as np

from mtp.gemma4.cache import KVCache
from tests.drafter.families import tiny_target


def test_feature_layers_agree_over_both_paths_and_end_in_the_last_hidden_state():
    target = tiny_target()
    layers = (0, 2, 3)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 96, (2, 12)), jnp.int32)
    scanned, _ = target(tokens, feature_layers=layers)
    cache = KVCache.init(target.config, 2, 16, max_chunk=4)
    cached, _ = target(tokens, cache, prefill=True, feature_layers=layers)
    assert scanned.features.shape == (2, 12, 3, 32) and target(tokens)[0].features is None
    np.testing.assert_allclose(scanned.features, cached.features, atol=1e-5)
    np.testing.assert_allclose(target.final_norm(scanned.features[:, :, 2]), scanned.hidden, atol=1e-5)
    assert not np.allclose(scanned.features[:, :, 0], scanned.features[:, :, 1], atol=1e-3)
