"""Hugging Face interop: safetensors I/O and loading Gemma 4 targets (``load_target``)."""

from mtp.checkpoint.hf_target import load_target

__all__ = ["load_target"]
