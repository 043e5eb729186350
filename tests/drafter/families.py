"""A tiny target and one random drafter of every family on it, shared by the family tests."""

import jax
import numpy as np
from flax import nnx

from mtp.drafter import FAMILIES, build
from mtp.gemma4.config import FULL, SLIDING, Gemma4Config
from mtp.gemma4.model import Gemma4
from tests.decoding.drafters import random_drafter

NAMES = sorted(FAMILIES)  # eagle3, gemma4, medusa
# The Gemma 4 drafter's own tests already cover these for it (test_loss.py: the unroll; test_engine.py: greedy).
NEW_FAMILIES = [name for name in NAMES if name != "gemma4"]
SHAPE = {"num_layers": 1, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64}


def tiny_target(vocab: int = 96, seed: int = 0) -> Gemma4:
    """Three layers (EAGLE-3 reads all three), a sliding window shorter than the tests' sequences."""
    config = Gemma4Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_layers=3,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        global_head_dim=16,
        layer_types=(SLIDING, SLIDING, FULL),
        sliding_window=8,
        final_logit_softcapping=30.0,
    )
    return Gemma4(config, rngs=nnx.Rngs(seed))


def make_drafter(family: str, target: Gemma4, *, max_draft_len: int = 4, seed: int = 0):
    """A random drafter; Medusa's blocks get random weights (they start at zero, which would make heads equal)."""
    if family == "gemma4":
        return random_drafter(target, seed, max_draft_len=max_draft_len, **SHAPE | {"num_layers": 2})
    drafter = build(family, target, **SHAPE, max_draft_len=max_draft_len, seed=seed)
    if family == "medusa":
        width = target.config.hidden_size
        key = jax.random.key(seed)
        drafter.weight[...] = jax.random.normal(key, drafter.weight[...].shape) * 2 * width**-0.5
    return drafter


def params_of(drafter) -> dict:
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(drafter, nnx.Param))}
