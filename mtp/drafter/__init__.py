"""Drafters: one interface (``interface``), the families (Gemma 4 MTP, Medusa-1, EAGLE-3-style), saving and loading.

HF ``gemma4_assistant`` interop lives in ``mtp.checkpoint.hf_drafter``; ``load_drafter`` / ``save_drafter`` here
dispatch by family.
"""

from mtp.drafter.config import DrafterConfig, DrafterConfigError, config_from_hf, config_to_hf
from mtp.drafter.draft import Draft, draft
from mtp.drafter.eagle3 import Eagle3, Eagle3Config
from mtp.drafter.families import FAMILIES, build
from mtp.drafter.interface import Anchor, DrafterFamily
from mtp.drafter.medusa import Medusa, MedusaConfig
from mtp.drafter.model import Drafter, DrafterFeatures, DrafterOutput, TokenOrdering
from mtp.drafter.storage import family_of, load_drafter, save_drafter

__all__ = [
    "FAMILIES",
    "Anchor",
    "Draft",
    "Drafter",
    "DrafterConfig",
    "DrafterConfigError",
    "DrafterFamily",
    "DrafterFeatures",
    "DrafterOutput",
    "Eagle3",
    "Eagle3Config",
    "Medusa",
    "MedusaConfig",
    "TokenOrdering",
    "build",
    "config_from_hf",
    "config_to_hf",
    "draft",
    "family_of",
    "load_drafter",
    "save_drafter",
]
