"""The Gemma 4 text decoder (the frozen target): config, model and KV cache.

Load checkpoints with ``mtp.checkpoint.load_target``.
"""

from mtp.gemma4.cache import KVCache
from mtp.gemma4.config import FULL, PRESETS, SLIDING, Gemma4Config, config_from_hf
from mtp.gemma4.model import Gemma4, LayerKV, TargetOutput

__all__ = [
    "FULL",
    "PRESETS",
    "SLIDING",
    "Gemma4",
    "Gemma4Config",
    "KVCache",
    "LayerKV",
    "TargetOutput",
    "config_from_hf",
]
