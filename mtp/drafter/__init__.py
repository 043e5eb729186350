"""Gemma 4 MTP drafters: config, the NNX module, the draft loop; HF interop lives in ``mtp.checkpoint.hf_drafter``."""

from mtp.drafter.config import DrafterConfig, DrafterConfigError, config_from_hf, config_to_hf
from mtp.drafter.draft import Draft, draft
from mtp.drafter.model import Drafter, DrafterFeatures, DrafterOutput, TokenOrdering

__all__ = [
    "Draft",
    "Drafter",
    "DrafterConfig",
    "DrafterConfigError",
    "DrafterFeatures",
    "DrafterOutput",
    "TokenOrdering",
    "config_from_hf",
    "config_to_hf",
    "draft",
]
