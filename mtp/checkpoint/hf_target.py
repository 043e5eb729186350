"""Load a Hugging Face Gemma 4 checkpoint (``Gemma4ForCausalLM`` or the text part of
``Gemma4ForConditionalGeneration``) into our ``Gemma4``, streamed tensor by tensor into its mesh sharding."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from mtp import sharding as sharding_lib
from mtp.checkpoint.layout import Layout, linear, same
from mtp.checkpoint.safetensors_io import CheckpointError, SafetensorsCheckpoint
from mtp.gemma4.config import Gemma4Config, config_from_hf
from mtp.gemma4.model import Gemma4

log = logging.getLogger(__name__)

Path = tuple[str | int, ...]

# Non-text towers of the multimodal checkpoint: not part of the text decoder, skipped (and counted in the log).
_MULTIMODAL = re.compile(r"^model\.(vision_tower|audio_tower|embed_vision|embed_audio|multi_modal_projector)\.")


def norm_layouts(prefix: str, path: Path, dim: int) -> dict[Path, Layout]:
    return {(*path, "weight"): same(f"{prefix}.weight", (dim,))}


def decoder_layer_layouts(config: Gemma4Config, i: int, prefix: str) -> dict[Path, Layout]:
    """Our parameter paths -> HF tensors for one decoder layer (also used by the drafter's layers)."""
    layer_type = config.layer_types[i]
    width, heads, head_dim = config.hidden_size, config.num_heads, config.head_dim_of(layer_type)
    kv_heads, p, at = config.kv_heads(layer_type), ("layers", i), f"{prefix}.self_attn"
    out = {
        (*p, "attn", "q"): linear(f"{at}.q_proj.weight", (heads, head_dim), (width,)),
        (*p, "attn", "o"): linear(f"{at}.o_proj.weight", (width,), (heads, head_dim)),
        **norm_layouts(f"{at}.q_norm", (*p, "attn", "q_norm"), head_dim),
        (*p, "mlp", "gate"): linear(f"{prefix}.mlp.gate_proj.weight", (config.mlp_width(i),), (width,)),
        (*p, "mlp", "up"): linear(f"{prefix}.mlp.up_proj.weight", (config.mlp_width(i),), (width,)),
        (*p, "mlp", "down"): linear(f"{prefix}.mlp.down_proj.weight", (width,), (config.mlp_width(i),)),
        (*p, "layer_scalar"): same(f"{prefix}.layer_scalar", (1,)),
    }
    if not config.shares_kv(i):
        out[(*p, "attn", "k")] = linear(f"{at}.k_proj.weight", (kv_heads, head_dim), (width,))
        out.update(norm_layouts(f"{at}.k_norm", (*p, "attn", "k_norm"), head_dim))
        if not config.keys_are_values(i):
            out[(*p, "attn", "v")] = linear(f"{at}.v_proj.weight", (kv_heads, head_dim), (width,))
    norms = {
        "input_norm": "input_layernorm",
        "post_attn_norm": "post_attention_layernorm",
        "pre_ffw_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    }
    if config.enable_moe:
        norms |= {
            "post_ffw_norm_1": "post_feedforward_layernorm_1",
            "pre_ffw_norm_2": "pre_feedforward_layernorm_2",
            "post_ffw_norm_2": "post_feedforward_layernorm_2",
        }
        experts, moe_width = config.num_experts, config.moe_intermediate_size
        out |= {
            (*p, "moe", "router_proj"): linear(f"{prefix}.router.proj.weight", (experts,), (width,)),
            (*p, "moe", "router_scale"): same(f"{prefix}.router.scale", (width,)),
            (*p, "moe", "per_expert_scale"): same(f"{prefix}.router.per_expert_scale", (experts,)),
            (*p, "moe", "gate_up"): Layout(
                f"{prefix}.experts.gate_up_proj",
                (experts, 2 * moe_width, width),
                (experts, 2 * moe_width, width),
                (0, 2, 1),
            ),
            (*p, "moe", "down"): Layout(
                f"{prefix}.experts.down_proj", (experts, width, moe_width), (experts, width, moe_width), (0, 2, 1)
            ),
        }
    if config.per_layer_input_dim:
        dim = config.per_layer_input_dim
        out[(*p, "ple_gate")] = linear(f"{prefix}.per_layer_input_gate.weight", (dim,), (width,))
        out[(*p, "ple_proj")] = linear(f"{prefix}.per_layer_projection.weight", (width,), (dim,))
        norms["ple_norm"] = "post_per_layer_input_norm"
    for ours, theirs in norms.items():
        out.update(norm_layouts(f"{prefix}.{theirs}", (*p, ours), width))
    return out


def target_layouts(config: Gemma4Config, prefix: str = "model") -> dict[Path, Layout]:
    """Every parameter of ``Gemma4(config)`` and the HF tensor it comes from."""
    width = config.hidden_size
    out = {("embed",): same(f"{prefix}.embed_tokens.weight", (config.vocab_size, width))}
    out.update(norm_layouts(f"{prefix}.norm", ("final_norm",), width))
    if config.per_layer_input_dim:
        layers, dim = config.num_layers, config.per_layer_input_dim
        table = (config.per_layer_vocab_size, layers * dim)
        out[("ple_embed",)] = Layout(
            f"{prefix}.embed_tokens_per_layer.weight", table, (table[0], layers, dim), (0, 1, 2)
        )
        out[("ple_model_proj",)] = linear(f"{prefix}.per_layer_model_projection.weight", (layers, dim), (width,))
        out.update(norm_layouts(f"{prefix}.per_layer_projection_norm", ("ple_proj_norm",), dim))
    for i in range(config.num_layers):
        out.update(decoder_layer_layouts(config, i, f"{prefix}.layers.{i}"))
    return out


def local_directory(model_dir: str | os.PathLike) -> pathlib.Path:
    """A checkpoint directory on this machine's disk (tensors are read from local files, a slice at a time); a
    remote one (``gs://...``) is refused, saying how to copy it."""
    if "://" in os.fspath(model_dir):
        raise CheckpointError(
            f"{os.fspath(model_dir)}: checkpoints are read from a local disk, not from a remote path; copy the "
            f"directory first (e.g. `gcloud storage cp -r {os.fspath(model_dir)} /local/dir`) and pass the copy."
        )
    return pathlib.Path(model_dir)


def read_config(model_dir: str | os.PathLike) -> dict:
    path = local_directory(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json; point at a Hugging Face model directory.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}).") from None


def _tensor_prefix(checkpoint: SafetensorsCheckpoint, source: str) -> str:
    if any(k.startswith("model.language_model.") for k in checkpoint):
        return "model.language_model"
    if any(k.startswith("model.") for k in checkpoint):
        return "model"
    raise CheckpointError(f"{source}: no 'model.*' or 'model.language_model.*' tensors; is this a Gemma 4 checkpoint?")


def check_tensors(
    checkpoint: SafetensorsCheckpoint, layouts: dict[Path, Layout], prefix: str, source: str, config: Gemma4Config
) -> None:
    """Every expected tensor present with its shape; nothing unexpected except what transformers also drops."""
    expected = {layout.key for layout in layouts.values()}
    missing = sorted(expected - set(checkpoint.keys()))
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensors missing, e.g. {missing[:5]}.")
    # Released E2B/E4B files still carry K/V projections for the KV-shared layers; transformers ignores them.
    shared = {i for i in range(config.num_layers) if config.shares_kv(i)}
    tolerated = re.compile(rf"^{re.escape(prefix)}\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.weight$")
    unexpected, skipped = [], 0
    for key in checkpoint:
        if key in expected or (key == "lm_head.weight"):
            continue
        match = tolerated.match(key)
        if (match and int(match.group(1)) in shared) or _MULTIMODAL.match(key):
            skipped += 1
        else:
            unexpected.append(key)
    if unexpected:
        examples = [f"{key} (in {checkpoint.file_of(key).name})" for key in sorted(unexpected)[:5]]
        raise CheckpointError(
            f"{source}: {len(unexpected)} unexpected tensors, e.g. {examples}; the config does not "
            "describe this checkpoint (or it is not a Gemma 4 text model)."
        )
    if skipped:
        log.info(
            "%s: skipped %d tensors outside the text decoder (multimodal towers, unused shared K/V).", source, skipped
        )
    for layout in layouts.values():
        if tuple(checkpoint.shape(layout.key)) != layout.hf_shape:
            raise CheckpointError(
                f"{checkpoint.file_of(layout.key)}: tensor {layout.key} has shape "
                f"{tuple(checkpoint.shape(layout.key))}, expected {layout.hf_shape} from config.json."
            )
    check_tied_head(checkpoint, f"{prefix}.embed_tokens.weight")


def check_tied_head(checkpoint: SafetensorsCheckpoint, embed_key: str, rows_per_read: int = 4096) -> None:
    """An ``lm_head.weight`` must equal the embedding: transformers unties (and uses) one that differs."""
    if "lm_head.weight" not in checkpoint:
        return
    head, embed = checkpoint.shape("lm_head.weight"), checkpoint.shape(embed_key)
    where = f"{checkpoint.file_of('lm_head.weight')}: tensor lm_head.weight"
    if head != embed:
        raise CheckpointError(f"{where} has shape {head} but {embed_key} has {embed}; untied heads are not supported.")
    for start in range(0, embed[0], rows_per_read):  # block by block: never two full tables on the host
        rows = (slice(start, start + rows_per_read),)
        if not np.array_equal(checkpoint.read("lm_head.weight", rows), checkpoint.read(embed_key, rows)):
            raise CheckpointError(
                f"{where} differs from {embed_key} in rows {start}:{start + rows_per_read}; transformers would "
                "use it as an untied output layer, which mtp does not support (drop it if it is stale)."
            )


def load_params(
    checkpoint: SafetensorsCheckpoint,
    layouts: dict[Path, Layout],
    model: nnx.Module,
    shardings: dict[Path, jax.sharding.Sharding],
    dtype: jnp.dtype | None,
) -> None:
    """Streams every tensor into ``model``'s parameters, device shard by device shard."""
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    for path, layout in layouts.items():
        variable = flat[path]
        target_dtype = np.dtype(dtype or checkpoint.dtype(layout.key))

        def read(index, layout=layout, target_dtype=target_dtype):
            block = layout.read(lambda hf_index: checkpoint.read(layout.key, hf_index), index)
            return np.asarray(block, dtype=target_dtype)

        variable.set_value(jax.make_array_from_callback(layout.shape, shardings[path], read))
    nnx.update(model, state)


def load_target(model_dir: str | os.PathLike, *, mesh: Mesh | None = None, dtype: jnp.dtype | None = None) -> Gemma4:
    """A Gemma 4 target from an HF directory; ``dtype`` None keeps the checkpoint's dtype (bf16 stays bf16)."""
    model_dir = local_directory(model_dir)
    config = config_from_hf(read_config(model_dir), source=str(model_dir / "config.json"))
    with SafetensorsCheckpoint.open(model_dir) as checkpoint:
        prefix = _tensor_prefix(checkpoint, str(model_dir))
        layouts = target_layouts(config, prefix)
        check_tensors(checkpoint, layouts, prefix, str(model_dir), config)
        model = nnx.eval_shape(lambda: Gemma4(config, rngs=nnx.Rngs(0)))
        shardings = param_shardings(model, mesh)
        load_params(checkpoint, layouts, model, shardings, dtype)
    return model


def param_shardings(model: nnx.Module, mesh: Mesh | None) -> dict[Path, jax.sharding.Sharding]:
    """Each parameter's sharding: from the logical-axis rules on a mesh, else the first device."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    if mesh is None:
        return {path: SingleDeviceSharding(jax.devices()[0]) for path, _ in flat}
    out: dict[Path, NamedSharding] = {}
    for path, variable in flat:
        axes = variable.get_metadata()["axes"]
        # ``get_value()``, not ``[...]``: the model is abstract here (ShapeDtypeStructs are not subscriptable).
        out[path] = sharding_lib.logical_sharding(variable.get_value().shape, axes, mesh)
    return out
