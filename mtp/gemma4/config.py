"""Gemma 4 text-decoder hyper-parameters: a frozen dataclass, read from HF config.json or a published preset."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

from mtp.data.tokenizer import GEMMA4_STOP_TOKENS
from mtp.errors import UserError

SLIDING = "sliding_attention"
FULL = "full_attention"
ATTENTION_TYPES = (SLIDING, FULL)


class ConfigError(UserError):
    """A model configuration that mtp cannot represent faithfully."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one attention type; ``rotary_fraction`` < 1 is Gemma 4's "proportional" RoPE."""

    theta: float
    rotary_fraction: float = 1.0
    factor: float = 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVGeometry:
    """The keys and values of each attention type: KV heads, head dim, RoPE, window.

    A Gemma 4 target's layers write K/V of this shape and its MTP drafter's layers read them, so both configs are
    a ``KVGeometry`` (fields and per-type accessors declared here once) and a drafter fits a target when their
    geometries agree on the attention types it uses (``DrafterConfig.validate_against``).
    """

    head_dim: int
    global_head_dim: int
    num_kv_heads: int
    num_global_kv_heads: int | None = None
    attention_k_eq_v: bool = False
    sliding_window: int
    rope_sliding: RopeConfig = RopeConfig(theta=10_000.0)
    rope_full: RopeConfig = RopeConfig(theta=1_000_000.0, rotary_fraction=0.25)

    @property
    def kv_geometry(self) -> KVGeometry:
        """The geometry alone (of a target or a drafter config), e.g. to compare two of them."""
        return KVGeometry(**{f.name: getattr(self, f.name) for f in dataclasses.fields(KVGeometry)})

    def head_dim_of(self, layer_type: str) -> int:
        return self.global_head_dim if layer_type == FULL else self.head_dim

    def kv_heads(self, layer_type: str) -> int:
        if layer_type == FULL and self.attention_k_eq_v and self.num_global_kv_heads:
            return self.num_global_kv_heads
        return self.num_kv_heads

    def rope(self, layer_type: str) -> RopeConfig:
        return self.rope_full if layer_type == FULL else self.rope_sliding


# ``mtp.gemma4.attention.choose_implementation`` says which runs where.
ATTENTION_IMPLEMENTATIONS = ("auto", "dense", "blockwise", "fused", "splash")


@dataclasses.dataclass(frozen=True)
class Gemma4Config(KVGeometry):
    """Everything that shapes a Gemma 4 text decoder (names follow HF ``Gemma4TextConfig`` where sensible).

    The K/V fields (head dims, KV heads, RoPE, window) are ``KVGeometry``'s, keyword-only.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_types: tuple[str, ...]
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    per_layer_input_dim: int = 0
    per_layer_vocab_size: int = 0
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = GEMMA4_STOP_TOKENS
    pad_token_id: int = 0
    attention_impl: str = "auto"  # ours, not HF's: see ``mtp.gemma4.attention.attend``

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLEMENTATIONS}.")
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries but num_layers={self.num_layers}.")
        if unknown := set(self.layer_types) - set(ATTENTION_TYPES):
            raise ConfigError(f"Unknown layer types {sorted(unknown)}; expected {ATTENTION_TYPES}.")
        if self.layer_types[-1] != FULL:
            raise ConfigError("Gemma 4's last layer is full attention (transformers forces it); fix layer_types.")
        if not 0 <= self.num_kv_shared_layers < self.num_layers:
            raise ConfigError(
                f"num_kv_shared_layers={self.num_kv_shared_layers} must be in [0, num_layers={self.num_layers})."
            )
        prefix_types = set(self.layer_types[: self.first_shared_layer])
        if prefix_types != set(self.layer_types):
            raise ConfigError(
                f"The KV-shared layers need a producer layer of each type before them; the non-shared prefix has "
                f"only {sorted(prefix_types)}."
            )
        for layer_type in ATTENTION_TYPES:
            heads = self.kv_heads(layer_type)
            if self.num_heads % heads:
                raise ConfigError(f"num_heads={self.num_heads} is not a multiple of {layer_type} KV heads={heads}.")
        if self.enable_moe and not (0 < self.top_k_experts <= self.num_experts and self.moe_intermediate_size > 0):
            raise ConfigError(
                f"MoE needs 0 < top_k_experts ({self.top_k_experts}) <= num_experts ({self.num_experts}) and "
                f"moe_intermediate_size > 0 ({self.moe_intermediate_size})."
            )
        if self.per_layer_input_dim and self.per_layer_vocab_size < self.vocab_size:
            raise ConfigError(
                f"per_layer_vocab_size={self.per_layer_vocab_size} < vocab_size={self.vocab_size}: token ids would "
                "index past the per-layer embedding table."
            )

    @property
    def enable_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def first_shared_layer(self) -> int:
        return self.num_layers - self.num_kv_shared_layers

    def shares_kv(self, layer: int) -> bool:
        return layer >= self.first_shared_layer

    def keys_are_values(self, layer: int) -> bool:
        return self.attention_k_eq_v and self.layer_types[layer] == FULL

    def mlp_width(self, layer: int) -> int:
        double = self.use_double_wide_mlp and self.shares_kv(layer)
        return self.intermediate_size * (2 if double else 1)

    @functools.cached_property
    def producer_layers(self) -> dict[str, int]:
        """The last non-shared layer of each type: its K/V feeds the shared layers and the drafter."""
        prefix = self.layer_types[: self.first_shared_layer]
        return {t: max(i for i, lt in enumerate(prefix) if lt == t) for t in ATTENTION_TYPES}

    def kv_source(self, layer: int) -> int:
        """The layer whose keys and values ``layer`` attends to."""
        return self.producer_layers[self.layer_types[layer]] if self.shares_kv(layer) else layer

    def replace(self, **changes: Any) -> Gemma4Config:
        return dataclasses.replace(self, **changes)


def _pattern(num_layers: int, period: int) -> tuple[str, ...]:
    return tuple(FULL if (i + 1) % period == 0 else SLIDING for i in range(num_layers))


def _released(**kwargs: Any) -> Gemma4Config:
    defaults = dict(vocab_size=262_144, head_dim=256, global_head_dim=512, final_logit_softcapping=30.0)
    return Gemma4Config(**(defaults | kwargs))


# Published hyper-parameters of the released text decoders (google-deepmind/gemma, gemma4/_gemma4.py).
PRESETS: dict[str, Gemma4Config] = {
    "gemma4_e2b": _released(
        hidden_size=1536,
        intermediate_size=6144,
        num_layers=35,
        num_heads=8,
        num_kv_heads=1,
        layer_types=_pattern(35, 5),
        sliding_window=512,
        per_layer_input_dim=256,
        per_layer_vocab_size=262_144,
        num_kv_shared_layers=20,
        use_double_wide_mlp=True,
    ),
    "gemma4_e4b": _released(
        hidden_size=2560,
        intermediate_size=10240,
        num_layers=42,
        num_heads=8,
        num_kv_heads=2,
        layer_types=_pattern(42, 6),
        sliding_window=512,
        per_layer_input_dim=256,
        per_layer_vocab_size=262_144,
        num_kv_shared_layers=18,
    ),
    "gemma4_26b_a4b": _released(
        hidden_size=2816,
        intermediate_size=2112,
        num_layers=30,
        num_heads=16,
        num_kv_heads=8,
        num_global_kv_heads=2,
        attention_k_eq_v=True,
        layer_types=_pattern(30, 6),
        sliding_window=1024,
        num_experts=128,
        top_k_experts=8,
        moe_intermediate_size=704,
    ),
    "gemma4_31b": _released(
        hidden_size=5376,
        intermediate_size=21504,
        num_layers=60,
        num_heads=32,
        num_kv_heads=16,
        num_global_kv_heads=4,
        attention_k_eq_v=True,
        layer_types=_pattern(60, 6),
        sliding_window=1024,
    ),
}


_SUPPORTED_TEXT_KEYS = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "global_head_dim",
    "num_global_key_value_heads",
    "per_layer_config",
    "layer_types",
    "sliding_window",
    "rope_parameters",
    "attention_k_eq_v",
    "rms_norm_eps",
    "final_logit_softcapping",
    "hidden_size_per_layer_input",
    "vocab_size_per_layer_input",
    "num_kv_shared_layers",
    "use_double_wide_mlp",
    "enable_moe_block",
    "num_experts",
    "top_k_experts",
    "moe_intermediate_size",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "hidden_activation",
    "attention_bias",
    "use_bidirectional_attention",
    "tie_word_embeddings",
    "model_type",
}


def _rope_from_hf(params: Mapping[str, Any] | None, layer_type: str, default: RopeConfig) -> RopeConfig:
    if params is None:
        return default
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        return RopeConfig(theta=float(params["rope_theta"]))
    if rope_type == "proportional":
        return RopeConfig(
            theta=float(params["rope_theta"]),
            rotary_fraction=float(params.get("partial_rotary_factor", 1.0)),
            factor=float(params.get("factor", 1.0)),
        )
    raise ConfigError(
        f"rope_type {rope_type!r} for {layer_type} is not supported (Gemma 4 uses 'default' on sliding and "
        "'proportional' on full layers)."
    )


def _per_layer_overrides(text: Mapping[str, Any], layer_types: tuple[str, ...]) -> tuple[int, int | None]:
    """The full layers' head dim and KV heads, from the hub form or the ``per_layer_config`` form."""
    if "per_layer_config" not in text:
        return int(text.get("global_head_dim", 512)), text.get("num_global_key_value_heads")
    overrides = {int(i): dict(v) for i, v in text["per_layer_config"].items()}
    found = set()
    for i, layer_type in enumerate(layer_types):
        entry = overrides.get(i, {})
        if layer_type == SLIDING:
            if entry.get("head_dim", text["head_dim"]) != text["head_dim"] or (
                entry.get("num_key_value_heads", text["num_key_value_heads"]) != text["num_key_value_heads"]
            ):
                raise ConfigError(f"per_layer_config overrides sliding layer {i} ({entry}); not supported.")
        else:
            found.add((entry.get("head_dim", text["head_dim"]), entry.get("num_key_value_heads")))
    if len(found) != 1:
        raise ConfigError(f"per_layer_config gives full layers different shapes {sorted(found)}; not supported.")
    head_dim, kv_heads = found.pop()
    return int(head_dim), kv_heads


def rope_to_hf(rope: RopeConfig, layer_type: str) -> dict[str, Any]:
    """HF rope_type "default" for a plain sliding RoPE, else "proportional" (always on full layers, as shipped)."""
    if layer_type == SLIDING and rope.rotary_fraction == 1.0 and rope.factor == 1.0:
        return {"rope_type": "default", "rope_theta": rope.theta}
    out = {"rope_type": "proportional", "partial_rotary_factor": rope.rotary_fraction, "rope_theta": rope.theta}
    return out | ({"factor": rope.factor} if rope.factor != 1.0 else {})


def decoder_fields_to_hf(config: Any) -> dict[str, Any]:
    """The gemma4_text fields a target and a drafter share (hub form: ``global_head_dim``), from either config."""
    out = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "global_head_dim": config.global_head_dim,
        "attention_k_eq_v": config.attention_k_eq_v,
        "layer_types": list(config.layer_types),
        "sliding_window": config.sliding_window,
        "rope_parameters": {t: rope_to_hf(config.rope(t), t) for t in ATTENTION_TYPES},
        "rms_norm_eps": config.rms_norm_eps,
        "final_logit_softcapping": config.final_logit_softcapping,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "tie_word_embeddings": True,
    }
    if config.attention_k_eq_v and config.num_global_kv_heads:
        out["num_global_key_value_heads"] = config.num_global_kv_heads  # only shapes the model with k_eq_v
    return out


def config_from_hf(config: Mapping[str, Any], *, source: str = "config.json") -> Gemma4Config:
    """Reads a ``gemma4`` (text part of the multimodal model) or ``gemma4_text`` config.json dict."""
    model_type = config.get("model_type")
    if model_type == "gemma4":
        if "text_config" not in config:
            raise ConfigError(f"{source}: model_type 'gemma4' without a 'text_config'.")
        text = dict(config["text_config"])
    elif model_type == "gemma4_text":
        text = dict(config)
    else:
        raise ConfigError(
            f"{source}: model_type is {model_type!r}; mtp loads Gemma 4 targets ('gemma4' or 'gemma4_text'). "
            "Drafters ('gemma4_assistant') load with mtp.drafter."
        )
    if unknown := sorted(set(text) - _SUPPORTED_TEXT_KEYS - IGNORED_TEXT_KEYS):
        raise ConfigError(f"{source}: unsupported text config keys {unknown}; mtp would silently ignore them.")
    if text.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ConfigError(f"{source}: hidden_activation {text['hidden_activation']!r} is not supported.")
    if text.get("attention_bias", False):
        raise ConfigError(f"{source}: attention_bias=True is not supported (no released Gemma 4 uses it).")
    if text.get("use_bidirectional_attention") == "all":
        raise ConfigError(f"{source}: use_bidirectional_attention='all' (an encoder) is not a causal target.")
    if not text.get("tie_word_embeddings", config.get("tie_word_embeddings", True)):
        raise ConfigError(f"{source}: untied word embeddings are not supported (Gemma 4 ties them).")

    num_layers = int(text.get("num_hidden_layers", 30))
    layer_types = list(text.get("layer_types") or _pattern(num_layers, 6))
    layer_types[-1] = FULL  # transformers forces this too (with a warning)
    layer_types = tuple(layer_types)
    text.setdefault("head_dim", 256)
    text.setdefault("num_key_value_heads", 4)
    global_head_dim, global_kv_heads = _per_layer_overrides(text, layer_types)
    k_eq_v = bool(text.get("attention_k_eq_v", False))
    rope = text.get("rope_parameters") or {}
    eos = text.get("eos_token_id", config.get("eos_token_id", 1))
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
    per_layer_dim = int(text.get("hidden_size_per_layer_input", 256) or 0)
    moe = bool(text.get("enable_moe_block", False))
    try:
        return Gemma4Config(
            vocab_size=int(text.get("vocab_size", 262_144)),
            hidden_size=int(text.get("hidden_size", 2304)),
            intermediate_size=int(text.get("intermediate_size", 9216)),
            num_layers=num_layers,
            num_heads=int(text.get("num_attention_heads", 8)),
            num_kv_heads=int(text["num_key_value_heads"]),
            head_dim=int(text["head_dim"]),
            global_head_dim=global_head_dim,
            num_global_kv_heads=int(global_kv_heads) if (global_kv_heads and k_eq_v) else None,
            attention_k_eq_v=k_eq_v,
            layer_types=layer_types,
            sliding_window=int(text.get("sliding_window", 512)),
            rope_sliding=_rope_from_hf(rope.get(SLIDING), SLIDING, RopeConfig(theta=10_000.0)),
            rope_full=_rope_from_hf(rope.get(FULL), FULL, RopeConfig(theta=1_000_000.0, rotary_fraction=0.25)),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            final_logit_softcapping=text.get("final_logit_softcapping"),
            per_layer_input_dim=per_layer_dim,
            per_layer_vocab_size=int(text.get("vocab_size_per_layer_input", 262_144)) if per_layer_dim else 0,
            num_kv_shared_layers=int(text.get("num_kv_shared_layers", 0)),
            use_double_wide_mlp=bool(text.get("use_double_wide_mlp", False)),
            num_experts=int(text.get("num_experts") or 0) if moe else 0,
            top_k_experts=int(text.get("top_k_experts") or 0) if moe else 0,
            moe_intermediate_size=int(text.get("moe_intermediate_size") or 0) if moe else 0,
            bos_token_id=int(text.get("bos_token_id", 2)),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            pad_token_id=int(text.get("pad_token_id", 0) or 0),
        )
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


# Keys transformers writes that do not change the text decoder's numerics.
IGNORED_TEXT_KEYS = {
    "architectures",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "initializer_range",
    "use_cache",
    "max_position_embeddings",
    "attention_dropout",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
    "tokenizer_class",
    "_name_or_path",
    "add_cross_attention",
    "cross_attention_hidden_size",
    "is_decoder",
    "pruned_heads",
    "tie_encoder_decoder",
    "task_specific_params",
    "finetuning_task",
    "prefix",
    "sep_token_id",
    "decoder_start_token_id",
    "tf_legacy_loss",
    "use_bfloat16",
    "torchscript",
    "_attn_implementation_autoset",
    "name_or_path",
}
