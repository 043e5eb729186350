"""Drafters with known behaviour for decoding tests: random (drafts rejected) and copying (drafts accepted)."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp.drafter.config import DrafterConfig
from mtp.drafter.model import Drafter
from mtp.gemma4.model import Gemma4

SHAPE = {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64}


def random_drafter(target: Gemma4, seed: int = 0, **kwargs) -> Drafter:
    """Random weights; ``kwargs`` override ``SHAPE`` and set any other ``DrafterConfig`` field."""
    return Drafter(DrafterConfig.for_target(target.config, **(SHAPE | kwargs)), rngs=nnx.Rngs(seed))


def copy_drafter(target: Gemma4, seed: int = 0, **kwargs) -> Drafter:
    """A drafter that proposes its input token again: random targets repeat themselves, so drafts get accepted.

    Every layer's output projections are zero (the layers pass the residual through), the pre-projection keeps a
    random orthonormal projection M of the token embedding, and the head's table is the target's embedding
    through M, so the logits are <M e_token, M e_v>: largest at v = token for near-orthogonal embeddings.
    """
    drafter = random_drafter(target, seed, **kwargs)
    width, backbone = drafter.config.hidden_size, drafter.config.backbone_hidden_size
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(backbone, backbone)))
    m = jnp.asarray(q[:, :width], jnp.float32)
    drafter.pre_projection[...] = jnp.concatenate([m, jnp.zeros_like(m)], axis=0)
    drafter.embed[...] = target.embed[...] @ m
    drafter.final_norm.weight[...] = jnp.ones_like(drafter.final_norm.weight[...])
    for layer in drafter.layers:
        layer.attn.o[...] = jnp.zeros_like(layer.attn.o[...])
        layer.mlp.down[...] = jnp.zeros_like(layer.mlp.down[...])
    return drafter
