"""Drafter hyper-parameters: a frozen dataclass, its fit to a target, and the HF ``gemma4_assistant`` config."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mtp.gemma4 import config as target_config_lib
from mtp.gemma4.config import (
    ATTENTION_TYPES,
    FULL,
    SLIDING,
    ConfigError,
    Gemma4Config,
    KVGeometry,
    decoder_fields_to_hf,
)

MODEL_TYPE = "gemma4_assistant"
ARCHITECTURE = "Gemma4AssistantForCausalLM"


class DrafterConfigError(ConfigError):
    """A drafter configuration that is inconsistent, or that does not fit its target."""


@dataclasses.dataclass(frozen=True)
class DrafterConfig(KVGeometry):
    """Everything that shapes a Gemma 4 MTP drafter (HF ``Gemma4AssistantConfig`` + its ``text_config``).

    Its ``KVGeometry`` (keyword-only fields) is that of the target's K/V the drafter reads, so it must equal the
    target's (``validate_against``). ``final_logit_softcapping`` is only carried through config.json: the HF
    assistant never applies it, and neither do we. ``max_draft_len`` is ours (HF files do not store it).
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    layer_types: tuple[str, ...]
    backbone_hidden_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    max_draft_len: int = 8
    final_logit_softcapping: float | None = None
    attention_impl: str = "auto"  # ours: see ``mtp.gemma4.attention.attend``

    def __post_init__(self):
        if len(self.layer_types) != self.num_layers:
            raise DrafterConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_layers={self.num_layers}."
            )
        if unknown := set(self.layer_types) - set(ATTENTION_TYPES):
            raise DrafterConfigError(f"Unknown layer types {sorted(unknown)}; expected {ATTENTION_TYPES}.")
        if self.layer_types[-1] != FULL:
            raise DrafterConfigError("The last drafter layer must be full attention (transformers forces it).")
        for layer_type in self.attention_types:
            if self.num_heads % (heads := self.kv_heads(layer_type)):
                raise DrafterConfigError(
                    f"num_heads={self.num_heads} is not a multiple of {layer_type} KV heads={heads}."
                )
        if self.max_draft_len < 1:
            raise DrafterConfigError(f"max_draft_len={self.max_draft_len} must be >= 1.")
        if self.use_ordered_embeddings:
            if self.num_centroids < 1 or self.vocab_size % self.num_centroids:
                raise DrafterConfigError(
                    f"vocab_size={self.vocab_size} is not a multiple of num_centroids={self.num_centroids}: the "
                    "centroid head splits the vocabulary into equal clusters."
                )
            if not 1 <= self.centroid_intermediate_top_k <= self.num_centroids:
                raise DrafterConfigError(
                    f"centroid_intermediate_top_k={self.centroid_intermediate_top_k} must be in "
                    f"[1, num_centroids={self.num_centroids}]."
                )

    @classmethod
    def for_target(
        cls,
        target: Gemma4Config,
        *,
        num_layers: int = 4,
        hidden_size: int | None = None,
        num_heads: int | None = None,
        intermediate_size: int | None = None,
        layer_types: tuple[str, ...] | None = None,
        **kwargs: Any,
    ) -> DrafterConfig:
        """A drafter that reads ``target``'s K/V: width defaults to a quarter of the target's, MLP to 4x width."""
        hidden_size = hidden_size or max(target.hidden_size // 4, 1)
        config = cls(
            num_layers=num_layers,
            hidden_size=hidden_size,
            num_heads=num_heads or target.num_heads,
            intermediate_size=intermediate_size or 4 * hidden_size,
            layer_types=tuple(layer_types or (SLIDING,) * (num_layers - 1) + (FULL,)),
            **vars(target.kv_geometry),
            rms_norm_eps=target.rms_norm_eps,
            backbone_hidden_size=target.hidden_size,
            vocab_size=target.vocab_size,
            **{"attention_impl": target.attention_impl} | kwargs,
        )
        config.validate_against(target)
        return config

    @property
    def attention_types(self) -> tuple[str, ...]:
        """The attention types the drafter's layers use, sliding first."""
        return tuple(t for t in ATTENTION_TYPES if t in self.layer_types)

    # The decoder-layer interface of ``Gemma4Config`` (``DecoderLayer``, ``decoder_layer_layouts``): every drafter
    # layer reads shared K/V, has a plain MLP, no experts and no per-layer embeddings.
    enable_moe = False
    per_layer_input_dim = 0

    def shares_kv(self, layer: int) -> bool:
        return True

    def keys_are_values(self, layer: int) -> bool:
        return False

    def mlp_width(self, layer: int) -> int:
        return self.intermediate_size

    def validate_against(self, target: Gemma4Config) -> None:
        """Raises ``DrafterConfigError`` naming every field where the drafter does not fit ``target``."""
        checks = [
            ("backbone_hidden_size", self.backbone_hidden_size, "hidden_size", target.hidden_size),
            ("vocab_size", self.vocab_size, "vocab_size", target.vocab_size),
            ("sliding_window", self.sliding_window, "sliding_window", target.sliding_window),
        ]
        for layer_type in self.attention_types:
            producer = target.producer_layers[layer_type]
            checks += [
                (
                    f"{layer_type} head dim",
                    self.head_dim_of(layer_type),
                    f"layer {producer} head dim",
                    target.head_dim_of(layer_type),
                ),
                (
                    f"{layer_type} KV heads",
                    self.kv_heads(layer_type),
                    f"layer {producer} KV heads",
                    target.kv_heads(layer_type),
                ),
                (f"{layer_type} RoPE", self.rope(layer_type), f"{layer_type} RoPE", target.rope(layer_type)),
            ]
        problems = [f"drafter {ours} = {a} but target {theirs} = {b}" for ours, a, theirs, b in checks if a != b]
        if problems:
            raise DrafterConfigError("The drafter does not fit the target: " + "; ".join(problems) + ".")

    def replace(self, **changes: Any) -> DrafterConfig:
        return dataclasses.replace(self, **changes)


_TOP_LEVEL_KEYS = {
    "text_config",
    "backbone_hidden_size",
    "use_ordered_embeddings",
    "num_centroids",
    "centroid_intermediate_top_k",
    "tie_word_embeddings",
    "model_type",
}

# HF assistant invariants (``Gemma4AssistantConfig.validate_architecture``) with transformers' defaults.
_TEXT_MUST_BE = {
    "hidden_size_per_layer_input": (256, 0),
    "vocab_size_per_layer_input": (262_144, 0),
    "enable_moe_block": (False, False),
    "use_double_wide_mlp": (False, False),
}


def config_from_hf(config: Mapping[str, Any], *, source: str = "config.json", max_draft_len: int = 8) -> DrafterConfig:
    """Reads a ``gemma4_assistant`` config.json dict (its ``text_config`` is parsed by the target's reader)."""
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        raise DrafterConfigError(
            f"{source}: model_type is {model_type!r}; a Gemma 4 MTP drafter has model_type {MODEL_TYPE!r} "
            "(targets, 'gemma4' / 'gemma4_text', load with mtp.gemma4)."
        )
    if unknown := sorted(set(config) - _TOP_LEVEL_KEYS - target_config_lib.IGNORED_TEXT_KEYS):
        raise DrafterConfigError(f"{source}: unsupported assistant config keys {unknown}; mtp would ignore them.")
    if not config.get("tie_word_embeddings", True):
        raise DrafterConfigError(f"{source}: tie_word_embeddings=False is not supported (the assistant ties them).")
    text = dict(config.get("text_config") or {})
    for key, (default, required) in _TEXT_MUST_BE.items():
        if (value := text.get(key, default)) != required:
            raise DrafterConfigError(
                f"{source}: text_config.{key} = {value!r}; a Gemma 4 assistant needs {required!r}."
            )
    num_layers = int(text.get("num_hidden_layers", 30))
    if (shared := text.get("num_kv_shared_layers") or num_layers) != num_layers:
        raise DrafterConfigError(
            f"{source}: text_config.num_kv_shared_layers = {shared}; every assistant layer reads the target's K/V "
            f"(expected {num_layers})."
        )
    # As a text config with no sharing, the target's reader checks and parses everything else.
    text |= {"model_type": "gemma4_text", "num_kv_shared_layers": 0}
    try:
        parsed = target_config_lib.config_from_hf(text, source=f"{source} text_config")
        return DrafterConfig(
            num_layers=parsed.num_layers,
            hidden_size=parsed.hidden_size,
            num_heads=parsed.num_heads,
            intermediate_size=parsed.intermediate_size,
            layer_types=parsed.layer_types,
            **vars(parsed.kv_geometry),
            rms_norm_eps=parsed.rms_norm_eps,
            backbone_hidden_size=int(config.get("backbone_hidden_size", 1536)),
            vocab_size=parsed.vocab_size,
            use_ordered_embeddings=bool(config.get("use_ordered_embeddings", False)),
            num_centroids=int(config.get("num_centroids", 2048)),
            centroid_intermediate_top_k=int(config.get("centroid_intermediate_top_k", 32)),
            max_draft_len=max_draft_len,
            final_logit_softcapping=parsed.final_logit_softcapping,
        )
    except DrafterConfigError as e:
        raise DrafterConfigError(f"{source}: {e}") from None
    except ConfigError as e:
        raise DrafterConfigError(str(e)) from None


def config_to_hf(config: DrafterConfig) -> dict[str, Any]:
    """The ``gemma4_assistant`` config.json dict (hub form: ``global_head_dim``, not ``per_layer_config``)."""
    text: dict[str, Any] = {
        "model_type": "gemma4_text",
        **decoder_fields_to_hf(config),
        "hidden_size_per_layer_input": 0,
        "vocab_size_per_layer_input": 0,
        "num_kv_shared_layers": config.num_layers,
        "enable_moe_block": False,
        "use_double_wide_mlp": False,
    }
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "backbone_hidden_size": config.backbone_hidden_size,
        "use_ordered_embeddings": config.use_ordered_embeddings,
        "num_centroids": config.num_centroids,
        "centroid_intermediate_top_k": config.centroid_intermediate_top_k,
        "tie_word_embeddings": True,
        "text_config": text,
    }
