"""Tiny random Hugging Face Gemma 4 targets and MTP assistants, and their reference outputs, for oracle tests.

transformers 5.23.0 + torch (CPU) are test-only; nothing under `mtp/` imports this module. Importing it
sets torch to one thread and applies the `kv_sharing_modes` patch (P1 of
shared/reference/gemma4_transformers.md).

Quirks found while writing this module (beyond the reference doc's P1-P13):
* Q1 `generate(min_new_tokens=N)` does not just disable EOS stopping: it sets the EOS logit to -inf for N
  steps, so the output stops being the plain argmax wherever EOS would win. Passing `eos_token_id=None` (as
  a kwarg or in a GenerationConfig) does not help either: generate refills every None field from
  `model.generation_config` (`update(defaults_only=True)`, generation/utils.py:2108). `reference_greedy`
  therefore clears `model.generation_config.eos_token_id` for the call (then min_new_tokens adds no
  processor either).
* Q2 `Gemma4ForConditionalGeneration` builds with `vision_config=None, audio_config=None` (no towers), so
  the "conditional_generation" layout is written by transformers' own save_pretrained, not by hand.
* Q3 `save_pretrained` writes `per_layer_config` (string layer keys), not `global_head_dim`; a config dict
  that carries `per_layer_config` makes `Gemma4TextConfig` ignore any `global_head_dim` kwarg.
* Q4 with the patched `kv_sharing_modes`, targets without KV sharing store the K/V of the LAST layer of
  each type (tiny dense/moe/keqv: layers 4 and 5); that is what `shared_kv_states` hands the drafter.
* Q5 `from_pretrained` leaves tensors in the safetensors mmap at offsets that are not 64-byte aligned (e.g.
  20 mod 64; sharding moves them), and torch's CPU kernels then take other SIMD paths: bit-identical
  weights give logits differing by up to ~9e-6 (MoE target, sharded) and drafter logits by ~7e-6.
  `load_target` and `load_assistant` clone every tensor into fresh memory, after which reloads reproduce
  logits exactly. HF's MoE kernels disagree among themselves too: `experts_implementation="batched_mm"` vs
  the default "grouped_mm" differ by ~2.5e-5 in logits.
* Q6 `Gemma4ForCausalLM.from_pretrained` on a hub-style (Gemma4ForConditionalGeneration) checkpoint does
  not map `model.language_model.*` to `model.*`: it prints a load report and returns a randomly initialised
  model. `AutoModelForCausalLM` maps model_type "gemma4" to Gemma4ForConditionalGeneration; `load_target`
  copies that one's language model into a Gemma4ForCausalLM.
* Q7 tied embeddings make a random model copy its input: the residual stream starts as `sqrt(H) *
  embed[token]` and the logits are its dot products with the same table, so with a large embedding std
  greedy decoding repeats one token. The embedding std here is 0.1 (logit std ~0.8, |logit| < ~4), which
  keeps greedy outputs varied.
* Q8 bf16 checkpoints move logits by up to ~2 for the MoE kind (top-2 routing flips on 4-12% of the tokens
  in layers 3-5, even with bf16-rounded weights computed in f32), ~0.3 for the other kinds.
* Q9 `model.to(torch.bfloat16)` also rounds the non-persistent rotary `*_inv_freq` buffers, whereas
  `from_pretrained(dtype=torch.bfloat16)` keeps them f32 (and makes `embed_scale` bf16). A bf16 HF reference
  must come from from_pretrained; a "bf16-rounded f32" reference must round the state dict only. Without
  `dtype`, from_pretrained loads in the checkpoint's dtype; `load_target` always asks for f32.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from transformers import (
    Gemma4AssistantConfig,
    Gemma4AssistantForCausalLM,
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
)
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

# These models are tiny: more threads only add sync overhead on a shared 2-core machine (P8, 4-20x slower).
torch.set_num_threads(1)

TARGET_KINDS = ("dense", "e2b_like", "moe_like", "keqv_like")

VOCAB = 512
SLIDING_WINDOW = 8
SOFTCAP = 30.0
_S, _F = "sliding_attention", "full_attention"
ROPE_PARAMETERS = {
    _S: {"rope_type": "default", "rope_theta": 10000.0},
    _F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
}
NUM_ASSISTANT_TOKENS = 4

# Init scales (std of N(0, std)): activations stay O(1), softcap 30 stays far from saturation, and greedy
# decoding does not collapse onto one token (Q7).
_LINEAR_STD = 0.08
_EMBED_STD = 0.1
_PLE_EMBED_STD = 0.25  # times sqrt(P)=4 -> O(1) per-layer token embeddings
_ROUTER_STD = 0.5  # wide router/centroid scores: top-k choices with clear margins, robust to 1e-6 noise
_NORM_SPREAD = 0.3


def _patched_kv_sharing_modes(self: Gemma4TextConfig) -> list[str | None]:
    """KV sharing mode per layer: None, "store" (producer) or "reuse" (consumer)."""
    num_layers = self.num_hidden_layers
    # A drafter shares every layer: it has no producer of its own and reads the target's K/V.
    if self.num_kv_shared_layers >= num_layers:
        return ["reuse"] * num_layers
    first_shared = num_layers - self.num_kv_shared_layers
    modes: list[str | None] = [None if i < first_shared else "reuse" for i in range(num_layers)]
    prefix = self.layer_types[:first_shared]
    if set(prefix) != set(self.layer_types):
        raise ValueError("The set of layer types producing a cache is different than the set of layer types using them")
    for layer_type in set(self.layer_types):
        modes[first_shared - 1 - prefix[::-1].index(layer_type)] = "store"
    return modes


# transformers' own property, kept so tests can check that the patch agrees with upstream where upstream works.
UPSTREAM_KV_SHARING_MODES: list[property] = []


def patch_kv_sharing_modes() -> None:
    """Idempotently replace `Gemma4TextConfig.kv_sharing_modes` by the fixed rule (reference doc P1)."""
    # 5.23.0 is broken in two cases. (a) Assistants share all layers: the producer prefix is empty, the
    # upstream property raises, and no Gemma4AssistantForCausalLM can be built or loaded. (b) Targets
    # without sharing (num_kv_shared_layers == 0: the 31B / 26B-A4B layout) return all-None, so no layer
    # stores K/V, `shared_kv_states` is empty and the drafter dies with KeyError 'full_attention'. The
    # patch restores the rule of earlier transformers code (store on the last layer of each type before
    # the shared block, also when nothing is shared) and makes a fully shared model all-"reuse". Target
    # numerics are unchanged: storing only keeps a reference to K/V the layer computes anyway.
    if getattr(Gemma4TextConfig, "_mtp_kv_sharing_patched", False):
        return
    UPSTREAM_KV_SHARING_MODES.append(Gemma4TextConfig.kv_sharing_modes)
    Gemma4TextConfig.kv_sharing_modes = property(_patched_kv_sharing_modes)
    Gemma4TextConfig._mtp_kv_sharing_patched = True


patch_kv_sharing_modes()


def layer_pattern(num_layers: int, full_layers: tuple[int, ...]) -> list[str]:
    """Explicit layer_types list with the given full-attention layers."""
    return [_F if i in full_layers else _S for i in range(num_layers)]


def tiny_text_config_dict(kind: str) -> dict[str, Any]:
    """Gemma4TextConfig kwargs (JSON-able) of one tiny target kind."""
    if kind not in TARGET_KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {TARGET_KINDS}")
    config: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "global_head_dim": 32,
        "layer_types": layer_pattern(6, (2, 5)),
        "sliding_window": SLIDING_WINDOW,
        "final_logit_softcapping": SOFTCAP,
        "rms_norm_eps": 1e-6,
        "rope_parameters": copy.deepcopy(ROPE_PARAMETERS),
        # PLE defaults to ON (256) with a 262144-row table: switch it off explicitly unless a kind wants it.
        "hidden_size_per_layer_input": 0,
        "vocab_size_per_layer_input": VOCAB,
        "tie_word_embeddings": True,
    }
    if kind == "e2b_like":
        # KV sharing needs PLE in HF (P3): plain generate crashes on per_layer_inputs=None otherwise.
        config |= {
            "hidden_size_per_layer_input": 16,
            "num_key_value_heads": 1,
            "num_kv_shared_layers": 3,
            "use_double_wide_mlp": True,
        }
    elif kind == "moe_like":
        config |= {
            "intermediate_size": 96,
            "enable_moe_block": True,
            "num_experts": 8,
            "top_k_experts": 2,
            "moe_intermediate_size": 32,
            "attention_k_eq_v": True,
            "global_head_dim": 64,
            "num_global_key_value_heads": 1,
        }
    elif kind == "keqv_like":
        config |= {
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "attention_k_eq_v": True,
            "num_global_key_value_heads": 1,
        }
    return config


def _persistent_buffer_names(model: torch.nn.Module) -> set[str]:
    """Qualified names of the buffers that go into the state dict."""
    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        for name, _ in module.named_buffers(recurse=False)
        if name not in module._non_persistent_buffers_set
    }


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter and persistent buffer with seeded random values far from their init."""
    gen = torch.Generator().manual_seed(seed)
    norm_weights = {
        id(module.weight) for module in model.modules() if isinstance(module, Gemma4RMSNorm) and module.with_scale
    }
    persistent_buffers = _persistent_buffer_names(model)

    def normal(shape: torch.Size, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std

    def uniform(shape: torch.Size, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=gen)

    with torch.no_grad():
        # Sorted names make the draw order (hence the values) independent of module registration details.
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            shape = param.shape
            if id(param) in norm_weights:
                # Norms init to 1, which hides a port that ignores w; a spread around 1 exposes it.
                value = uniform(shape, 1.0 - _NORM_SPREAD, 1.0 + _NORM_SPREAD)
            elif name.endswith("router.scale"):
                value = uniform(shape, 1.0 - _NORM_SPREAD, 1.0 + _NORM_SPREAD)
            elif name.endswith("router.per_expert_scale"):
                value = uniform(shape, 0.5, 1.5)
            elif name.endswith("embed_tokens_per_layer.weight"):
                value = normal(shape, _PLE_EMBED_STD)
            elif name.endswith("embed_tokens.weight"):
                value = normal(shape, _EMBED_STD)
            elif name.endswith(("router.proj.weight", "centroids.weight")):
                value = normal(shape, _ROUTER_STD)
            else:
                # nn.Linear weights and the 3D expert tensors (gate_up_proj, down_proj).
                value = normal(shape, _LINEAR_STD)
            param.copy_(value.to(param.dtype))
        for name, buf in sorted(model.named_buffers(), key=lambda item: item[0]):
            if name not in persistent_buffers:
                continue  # derived buffers (rotary inv_freq, embed_scale) are recomputed, never saved
            if name.endswith("layer_scalar"):
                buf.copy_(uniform(buf.shape, 0.5, 1.5))
            elif name.endswith("token_ordering"):
                # HF zero-inits it (P4): every cluster would map to token 0.
                buf.copy_(torch.randperm(buf.numel(), generator=gen))
            else:
                raise AssertionError(f"unexpected persistent buffer {name}: teach _randomize_ about it")


def build_target(kind: str, seed: int = 0) -> Gemma4ForCausalLM:
    """Tiny f32 eager Gemma4ForCausalLM of `kind` with every weight randomised (seeded)."""
    config = Gemma4TextConfig(**tiny_text_config_dict(kind), attn_implementation="eager")
    model = Gemma4ForCausalLM(config).to(torch.float32).eval()
    randomize_(model, seed)  # overwrites every saved tensor, so HF's own (global-RNG) init does not matter
    return model


def save_target(
    model: Gemma4ForCausalLM,
    path: str | os.PathLike[str],
    *,
    layout: str = "causal_lm",
    max_shard_size: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Save a target as Gemma4ForCausalLM (keys model.*) or hub-style Gemma4ForConditionalGeneration."""
    if layout == "causal_lm":
        to_save: torch.nn.Module = copy.deepcopy(model)
    elif layout == "conditional_generation":
        # Q2: transformers builds the multimodal wrapper without towers, so no hand-written files are needed.
        config = Gemma4Config(
            text_config=copy.deepcopy(model.config),
            vision_config=None,
            audio_config=None,
            tie_word_embeddings=True,
        )
        config._attn_implementation = "eager"
        to_save = Gemma4ForConditionalGeneration(config)
        to_save.model.language_model.load_state_dict(model.model.state_dict(), strict=True)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    to_save = to_save.to(dtype)
    kwargs: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    to_save.save_pretrained(os.fspath(path), **kwargs)


def rewrite_config_hub_form(path: str | os.PathLike[str]) -> None:
    """Rewrite a saved config.json to carry global_head_dim (+ global KV heads) like hub configs do."""
    config_file = os.path.join(os.fspath(path), "config.json")
    with open(config_file) as f:
        config = json.load(f)
    text = config.get("text_config", config)
    per_layer = text.pop("per_layer_config")
    overrides = {json.dumps(v, sort_keys=True) for v in per_layer.values()}
    if len(overrides) != 1:
        raise ValueError(f"full layers disagree, no single global_head_dim: {per_layer}")
    override = next(iter(per_layer.values()))
    text["global_head_dim"] = override["head_dim"]
    if "num_key_value_heads" in override:
        text["num_global_key_value_heads"] = override["num_key_value_heads"]
    with open(config_file, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def realign_(model: torch.nn.Module) -> None:
    """Move every tensor out of the safetensors mmap into fresh aligned memory (Q5)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()


def load_target(path: str | os.PathLike[str]) -> Gemma4ForCausalLM:
    """Reload a saved target of either layout as an f32 eager Gemma4ForCausalLM (bit-exact for f32 files)."""
    path = os.fspath(path)
    with open(os.path.join(path, "config.json")) as f:
        model_type = json.load(f)["model_type"]
    if model_type == "gemma4_text":
        model = Gemma4ForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    elif model_type == "gemma4":
        # Q6: Gemma4ForCausalLM cannot read this layout itself; go through the multimodal class.
        full = Gemma4ForConditionalGeneration.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
        text_config = copy.deepcopy(full.config.text_config)
        text_config._attn_implementation = "eager"
        model = Gemma4ForCausalLM(text_config).to(torch.float32)
        model.model.load_state_dict(full.model.language_model.state_dict(), strict=True)
    else:
        raise ValueError(f"not a Gemma 4 target checkpoint: model_type {model_type!r}")
    realign_(model)
    return model.eval()


def load_assistant(path: str | os.PathLike[str]) -> Gemma4AssistantForCausalLM:
    """Reload a saved assistant as an f32 eager model (needs the P1 patch, applied at import)."""
    model = Gemma4AssistantForCausalLM.from_pretrained(
        os.fspath(path), attn_implementation="eager", dtype=torch.float32
    )
    realign_(model)
    return model.eval()


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Detached numpy copy: float64 stays float64 (the exact references), any other float becomes float32."""
    tensor = tensor.detach().cpu()
    return (tensor if tensor.dtype == torch.float64 else tensor.to(torch.float32)).numpy()


def reference_forward(model: Gemma4ForCausalLM, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """One uncached forward: logits, post-final-norm hidden and the drafter-facing shared K/V."""
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long),
            use_cache=False,
            output_hidden_states=True,
            return_shared_kv_states=True,
        )
    result = {"logits": to_numpy(out.logits), "hidden": to_numpy(out.hidden_states[-1])}
    for short, layer_type in (("sliding", _S), ("full", _F)):
        k, v = out.shared_kv_states[layer_type]
        result[f"{short}_k"], result[f"{short}_v"] = to_numpy(k), to_numpy(v)
    return result


@contextlib.contextmanager
def _without_eos(model: torch.nn.Module) -> Iterator[None]:
    """Clear the model's EOS for one generate call: no stopping and no EOS suppression (Q1)."""
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        yield
    finally:
        model.generation_config.eos_token_id = saved


def _greedy_kwargs(ids: torch.Tensor, max_new_tokens: int) -> dict[str, Any]:
    """generate() kwargs for exactly `max_new_tokens` plain-argmax tokens."""
    # min_new_tokens is a no-op without an EOS id (Q1); kept so that no EOS default can shorten the output.
    return {
        "attention_mask": torch.ones_like(ids),
        "do_sample": False,
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": max_new_tokens,
        "pad_token_id": 0,
    }


def reference_greedy(model: Gemma4ForCausalLM, input_ids: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """HF cached greedy generation; returns only the new tokens [B, max_new_tokens]."""
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    with torch.no_grad(), _without_eos(model):
        out = model.generate(ids, **_greedy_kwargs(ids, max_new_tokens))
    return out[:, ids.shape[1] :].numpy()


def tiny_assistant_config_dict(target_kind: str, ordered: bool) -> dict[str, Any]:
    """Gemma4AssistantConfig kwargs (JSON-able) of a drafter matching the tiny target of `target_kind`."""
    target = tiny_text_config_dict(target_kind)
    text: dict[str, Any] = {
        "model_type": "gemma4_text",
        "vocab_size": target["vocab_size"],
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        # 4 is a multiple of every tiny target's KV-head count per layer type (eager GQA needs it exactly).
        "num_attention_heads": 4,
        "num_key_value_heads": target["num_key_value_heads"],
        "head_dim": target["head_dim"],
        "global_head_dim": target["global_head_dim"],
        "layer_types": layer_pattern(4, (3,)),
        "sliding_window": target["sliding_window"],
        # Copied from the target like a real drafter config; HF's assistant never applies it (doc §3.3).
        "final_logit_softcapping": target["final_logit_softcapping"],
        "rms_norm_eps": target["rms_norm_eps"],
        "rope_parameters": copy.deepcopy(target["rope_parameters"]),
        "hidden_size_per_layer_input": 0,
        "vocab_size_per_layer_input": 0,
        "num_kv_shared_layers": 4,
        "tie_word_embeddings": True,
    }
    if target.get("attention_k_eq_v"):
        # Without these the drafter's full layers would expect num_key_value_heads heads (P6).
        text["attention_k_eq_v"] = True
        text["num_global_key_value_heads"] = target["num_global_key_value_heads"]
    return {
        "text_config": text,
        "backbone_hidden_size": target["hidden_size"],
        "use_ordered_embeddings": ordered,
        "num_centroids": 16,
        "centroid_intermediate_top_k": 4,
        "tie_word_embeddings": True,
    }


def build_assistant(target_kind: str, ordered: bool, seed: int = 0) -> Gemma4AssistantForCausalLM:
    """Tiny f32 eager Gemma4AssistantForCausalLM matching `target_kind`, every weight randomised (seeded)."""
    config_dict = tiny_assistant_config_dict(target_kind, ordered)
    config = Gemma4AssistantConfig(**config_dict, attn_implementation="eager")  # reaches text_config too
    model = Gemma4AssistantForCausalLM(config).to(torch.float32).eval()
    randomize_(model, seed)
    # P2: the candidate generator reads this from the assistant's own generation config and crashes on None.
    model.generation_config.num_assistant_tokens = NUM_ASSISTANT_TOKENS
    return model


def save_assistant(
    model: Gemma4AssistantForCausalLM,
    path: str | os.PathLike[str],
    num_assistant_tokens: int = NUM_ASSISTANT_TOKENS,
) -> None:
    """save_pretrained with generation_config.num_assistant_tokens set (P2)."""
    to_save = copy.deepcopy(model)
    to_save.generation_config.num_assistant_tokens = num_assistant_tokens
    to_save.save_pretrained(os.fspath(path))


def reference_draft_step(
    assistant: Gemma4AssistantForCausalLM,
    inputs_embeds: np.ndarray,
    position_ids: np.ndarray,
    shared_kv: dict[str, tuple[np.ndarray, np.ndarray]],
) -> dict[str, np.ndarray]:
    """One drafter forward as generate runs it (attention_mask=None): logits [B,1,V], projected [B,1,Ht]."""
    kv = {
        layer_type: (torch.as_tensor(np.asarray(k)), torch.as_tensor(np.asarray(v)))
        for layer_type, (k, v) in shared_kv.items()
    }
    with torch.no_grad():
        out = assistant(
            inputs_embeds=torch.as_tensor(np.asarray(inputs_embeds)),
            position_ids=torch.as_tensor(np.asarray(position_ids), dtype=torch.long),
            attention_mask=None,
            shared_kv_states=kv,
            use_cache=False,
        )
    return {"logits": to_numpy(out.logits), "projected": to_numpy(out.last_hidden_state)}


def reference_assisted_greedy(
    target: Gemma4ForCausalLM,
    assistant: Gemma4AssistantForCausalLM,
    input_ids: np.ndarray,
    max_new_tokens: int,
) -> np.ndarray:
    """HF MTP-assisted greedy generation (batch 1); returns only the new tokens [1, max_new_tokens]."""
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    if ids.shape[0] != 1:
        raise ValueError(f"HF assisted generation needs batch size 1, got {ids.shape[0]} (P11)")
    if assistant.generation_config.num_assistant_tokens is None:
        raise ValueError("assistant.generation_config.num_assistant_tokens must be set (P2)")
    with torch.no_grad(), _without_eos(target):
        out = target.generate(ids, assistant_model=assistant, **_greedy_kwargs(ids, max_new_tokens))
    return out[:, ids.shape[1] :].numpy()


def reference_param_count(config_dict: dict[str, Any]) -> int:
    """Parameter count of Gemma4ForCausalLM(config) (tied lm_head counted once, buffers excluded), on meta."""
    with torch.device("meta"):
        model = Gemma4ForCausalLM(Gemma4TextConfig(**copy.deepcopy(config_dict)))
    return sum(p.numel() for p in model.parameters())


def reference_buffer_count(config_dict: dict[str, Any]) -> int:
    """Element count of the persistent (saved) buffers, i.e. the per-layer `layer_scalar`s."""
    with torch.device("meta"):
        model = Gemma4ForCausalLM(Gemma4TextConfig(**copy.deepcopy(config_dict)))
    buffers = dict(model.named_buffers())
    return sum(buffers[name].numel() for name in _persistent_buffer_names(model))
