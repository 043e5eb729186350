"""The drafter families by name, and a new drafter of any family shaped like the config's ``drafter`` section."""

from __future__ import annotations

import numpy as np
from flax import nnx

from mtp.drafter.config import DrafterConfig
from mtp.drafter.eagle3 import Eagle3, Eagle3Config
from mtp.drafter.interface import DrafterFamily
from mtp.drafter.medusa import Medusa, MedusaConfig
from mtp.drafter.model import Drafter
from mtp.gemma4.config import ConfigError
from mtp.gemma4.model import Gemma4

GEMMA4 = Drafter.family
FAMILIES = {
    Drafter.family: (Drafter, DrafterConfig),
    Medusa.family: (Medusa, MedusaConfig),
    Eagle3.family: (Eagle3, Eagle3Config),
}

# The ``config.drafter`` keys that shape a new drafter of any family (``build``'s keyword arguments).
SHAPE_KEYS = ("num_layers", "hidden_size", "num_heads", "intermediate_size", "max_draft_len", "init_embed_from_target")


def projected_table(target: Gemma4, width: int, seed: int) -> np.ndarray:
    """A random orthonormal projection of the target's embedding to ``width``, rows of RMS ``width**-0.5``: similar
    tokens start with similar head rows."""
    table = np.asarray(target.embed[...], np.float32)
    backbone = table.shape[1]
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(max(backbone, width), min(backbone, width))))
    rows = table @ (q if backbone >= width else q.T)
    return rows * width**-0.5 / np.sqrt(np.mean(rows**2))


def build(
    family: str,
    target: Gemma4,
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    intermediate_size: int,
    max_draft_len: int,
    seed: int = 0,
    init_embed_from_target: bool = True,
) -> DrafterFamily:
    """A new Medusa (``max_draft_len`` heads of ``num_layers`` blocks) or EAGLE-3 (one layer) drafter for ``target``.

    The Gemma 4 drafter is built by ``mtp.training.setup`` (its centroid head needs the training's clustering).
    """
    rngs = nnx.Rngs(seed)
    if family == Medusa.family:
        return Medusa(MedusaConfig.for_target(target.config, num_heads=max_draft_len, num_layers=num_layers), rngs=rngs)
    if family == Eagle3.family:
        if num_layers != 1:
            raise ConfigError(f"an EAGLE-3 drafter has one decoder layer; set drafter.num_layers=1 (got {num_layers}).")
        config = Eagle3Config.for_target(
            target.config,
            hidden_size=hidden_size,
            num_heads=num_heads,
            intermediate_size=intermediate_size,
            max_draft_len=max_draft_len,
        )
        drafter = Eagle3(config, rngs=rngs)
        if init_embed_from_target:
            drafter.embed[...] = projected_table(target, hidden_size, seed).astype(np.float32)
        return drafter
    raise ConfigError(f"drafter.family={family!r}; choose one of {sorted(FAMILIES)}.")
