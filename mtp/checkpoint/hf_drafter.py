"""Load and save Hugging Face ``gemma4_assistant`` checkpoints (``Gemma4AssistantForCausalLM``) as our ``Drafter``."""

from __future__ import annotations

import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from mtp.checkpoint.hf_target import (
    Path,
    decoder_layer_layouts,
    load_params,
    local_directory,
    norm_layouts,
    param_shardings,
    read_config,
)
from mtp.checkpoint.layout import Layout, linear, same
from mtp.checkpoint.safetensors_io import CheckpointError, SafetensorsCheckpoint, save_safetensors
from mtp.drafter.config import DrafterConfig, DrafterConfigError, config_from_hf, config_to_hf
from mtp.drafter.model import Drafter
from mtp.gemma4.config import Gemma4Config
from mtp.multihost import barrier, host_value

log = logging.getLogger(__name__)

TOKEN_ORDERING = "masked_embedding.token_ordering"
GENERATION_CONFIG = "generation_config.json"
# transformers drops these for KV-shared layers (every assistant layer), so we tolerate them too.
_SHARED_KV = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.weight$")


def drafter_layouts(config: DrafterConfig) -> dict[Path, Layout]:
    """Every parameter of ``Drafter(config)`` and the HF tensor it comes from (``token_ordering`` aside)."""
    width, backbone = config.hidden_size, config.backbone_hidden_size
    out = {
        ("pre_projection",): linear("pre_projection.weight", (width,), (2 * backbone,)),
        ("post_projection",): linear("post_projection.weight", (backbone,), (width,)),
        ("embed",): same("model.embed_tokens.weight", (config.vocab_size, width)),
        **norm_layouts("model.norm", ("final_norm",), width),
    }
    for i in range(config.num_layers):
        out.update(decoder_layer_layouts(config, i, f"model.layers.{i}"))
    if config.use_ordered_embeddings:
        out[("centroids",)] = linear("masked_embedding.centroids.weight", (config.num_centroids,), (width,))
    return out


def _check_tensors(
    checkpoint: SafetensorsCheckpoint, layouts: dict[Path, Layout], config: DrafterConfig, source: str
) -> None:
    """Every expected tensor present with its shape; nothing unexpected except what transformers also drops."""
    expected = {layout.key for layout in layouts.values()}
    if config.use_ordered_embeddings:
        if TOKEN_ORDERING not in checkpoint:
            raise CheckpointError(
                f"{source}: use_ordered_embeddings is set but {TOKEN_ORDERING} is missing; without it the centroid "
                "head cannot map clusters to tokens."
            )
        expected.add(TOKEN_ORDERING)
    if missing := sorted(expected - set(checkpoint.keys())):
        raise CheckpointError(f"{source}: {len(missing)} tensors missing, e.g. {missing[:5]}.")
    unexpected = [k for k in checkpoint if k not in expected and k != "lm_head.weight" and not _SHARED_KV.match(k)]
    if unexpected:
        raise CheckpointError(
            f"{source}: {len(unexpected)} unexpected tensors, e.g. {sorted(unexpected)[:5]}; config.json does not "
            "describe this checkpoint."
        )
    shapes = {layout.key: layout.hf_shape for layout in layouts.values()}
    if config.use_ordered_embeddings:
        shapes[TOKEN_ORDERING] = (config.vocab_size,)
    for key, shape in shapes.items():
        if (found := tuple(checkpoint.shape(key))) != shape:
            raise CheckpointError(
                f"{checkpoint.file_of(key)}: tensor {key} has shape {found}, expected {shape} from config.json."
            )


def _read_token_ordering(checkpoint: SafetensorsCheckpoint, vocab_size: int, source: str) -> np.ndarray:
    ordering = checkpoint.read(TOKEN_ORDERING)
    if not np.issubdtype(ordering.dtype, np.integer):
        raise CheckpointError(f"{source}: {TOKEN_ORDERING} has dtype {ordering.dtype}; expected integer token ids.")
    if ordering.size and (ordering.min() < 0 or ordering.max() >= vocab_size):
        raise CheckpointError(
            f"{source}: {TOKEN_ORDERING} holds ids in [{ordering.min()}, {ordering.max()}], outside the vocabulary "
            f"[0, {vocab_size})."
        )
    if len(np.unique(ordering)) != vocab_size:
        log.warning("%s: %s is not a permutation; some tokens can never be drafted.", source, TOKEN_ORDERING)
    return ordering.astype(np.int32)


def load_drafter(
    model_dir: str | os.PathLike,
    *,
    target_config: Gemma4Config | None = None,
    mesh: Mesh | None = None,
    dtype: jnp.dtype | None = None,
    max_draft_len: int = 8,
) -> Drafter:
    """A drafter from an HF ``gemma4_assistant`` directory, checked against ``target_config`` when given.

    ``dtype`` None keeps the checkpoint's dtype (bf16 stays bf16); ``max_draft_len`` is not stored by HF.
    """
    model_dir = local_directory(model_dir)
    source = str(model_dir / "config.json")
    config = config_from_hf(read_config(model_dir), source=source, max_draft_len=max_draft_len)
    if target_config is not None:
        try:
            config.validate_against(target_config)
        except DrafterConfigError as e:
            raise DrafterConfigError(f"{source}: {e}") from None
    with SafetensorsCheckpoint.open(model_dir) as checkpoint:
        layouts = drafter_layouts(config)
        _check_tensors(checkpoint, layouts, config, str(model_dir))
        model = nnx.eval_shape(lambda: Drafter(config, rngs=nnx.Rngs(0)))
        load_params(checkpoint, layouts, model, param_shardings(model, mesh), dtype)
        if config.use_ordered_embeddings:
            ordering = _read_token_ordering(checkpoint, config.vocab_size, str(model_dir))
            where = SingleDeviceSharding(jax.devices()[0]) if mesh is None else NamedSharding(mesh, PartitionSpec())
            model.token_ordering.set_value(jax.device_put(ordering, where))
    return model


def save_drafter(
    drafter: Drafter, model_dir: str | os.PathLike, *, num_assistant_tokens: int = 4, dtype: jnp.dtype | None = None
) -> None:
    """Writes HF's exact layout: config.json, model.safetensors (tied head once), generation_config.json.

    ``num_assistant_tokens`` goes into generation_config.json: transformers leaves it None and then crashes. On
    many processes every one calls this (parameters sharded across them are gathered tensor by tensor) and
    process 0 writes; ``model_dir`` may be remote (``gs://...``).
    """
    if num_assistant_tokens < 1:
        raise ValueError(f"num_assistant_tokens={num_assistant_tokens} must be >= 1.")
    config = drafter.config
    flat = dict(nnx.to_flat_state(nnx.state(drafter, nnx.Param)))
    tensors = {}
    for path, layout in drafter_layouts(config).items():
        value = host_value(flat[path].get_value())
        tensors[layout.key] = layout.to_hf(value.astype(dtype or value.dtype))
    if config.use_ordered_embeddings:
        tensors[TOKEN_ORDERING] = host_value(drafter.token_ordering.get_value()).astype(np.int64)
    if jax.process_index() == 0:
        _write_drafter(tensors, config, epath.Path(model_dir), num_assistant_tokens)
    barrier("drafter exported")


def _write_drafter(tensors: dict, config: DrafterConfig, model_dir: epath.Path, num_assistant_tokens: int) -> None:
    save_safetensors(tensors, model_dir)
    hf_config = config_to_hf(config) | {"dtype": np.dtype(tensors["model.embed_tokens.weight"].dtype).name}
    (model_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    generation = {"num_assistant_tokens": num_assistant_tokens, "num_assistant_tokens_schedule": "constant"}
    (model_dir / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
