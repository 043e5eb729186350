"""Export our ``Gemma4`` as a Hugging Face ``Gemma4ForCausalLM`` directory: the inverse of ``load_target``.

config.json is written in the hub form (``global_head_dim`` / ``num_global_key_value_heads``, not transformers'
``per_layer_config``) and names every field our config carries, since transformers' defaults differ from ours
(it turns per-layer embeddings on unless told ``hidden_size_per_layer_input: 0``). model.safetensors holds each
parameter through its ``Layout`` in ``target_layouts``; the tied ``lm_head`` is not written, as transformers does.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp.checkpoint.hf_target import target_layouts
from mtp.checkpoint.safetensors_io import save_safetensors
from mtp.gemma4.config import Gemma4Config, decoder_fields_to_hf
from mtp.gemma4.model import Gemma4
from mtp.multihost import barrier, host_value

ARCHITECTURE = "Gemma4ForCausalLM"
MODEL_TYPE = "gemma4_text"


def config_to_hf(config: Gemma4Config) -> dict[str, Any]:
    """The ``gemma4_text`` config.json dict; ``config_from_hf`` of it gives ``config`` back.

    ``num_global_kv_heads`` is written only with ``attention_k_eq_v``, the one case where it shapes the model
    (transformers, and ``config_from_hf``, ignore it otherwise).
    """
    moe = config.enable_moe
    eos = list(config.eos_token_ids)
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        **decoder_fields_to_hf(config),
        "hidden_size_per_layer_input": config.per_layer_input_dim,
        "vocab_size_per_layer_input": config.per_layer_vocab_size,
        "num_kv_shared_layers": config.num_kv_shared_layers,
        "use_double_wide_mlp": config.use_double_wide_mlp,
        "enable_moe_block": moe,
        "num_experts": config.num_experts if moe else None,
        "top_k_experts": config.top_k_experts if moe else None,
        "moe_intermediate_size": config.moe_intermediate_size if moe else None,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": config.pad_token_id,
    }


def _write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def save_target(model: Gemma4, path: str | os.PathLike, *, dtype: jnp.dtype | None = None) -> pathlib.Path:
    """Writes config.json and model.safetensors into ``path``; ``dtype`` None keeps the parameters' dtype.

    On many processes every one calls this (sharded parameters are gathered tensor by tensor) and process 0 writes.
    """
    config = model.config
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    tensors = {}
    for param_path, layout in target_layouts(config, "model").items():
        value = host_value(flat[param_path].get_value())
        tensors[layout.key] = layout.to_hf(value.astype(dtype or value.dtype))
    path = pathlib.Path(path)
    if jax.process_index() == 0:
        save_safetensors(tensors, path)
        stored = np.dtype(tensors["model.embed_tokens.weight"].dtype).name
        # transformers >= 5 names the stored dtype "dtype" (and reads the older "torch_dtype" only as a fallback).
        _write_json(path / "config.json", config_to_hf(config) | {"dtype": stored})
    barrier("target exported")
    return path
