"""The frozen Gemma 4 target: config, model and KV cache (load checkpoints with ``mtp.checkpoint.load_target``)."""

from mtp.target.cache import KVCache
from mtp.target.config import FULL, PRESETS, SLIDING, Gemma4Config, config_from_hf
from mtp.target.model import Gemma4, LayerKV, TargetOutput

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
