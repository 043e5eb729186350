"""Self-test of the Hugging Face oracle fixtures in tests/hf_oracle.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import Gemma4ForConditionalGeneration, Gemma4TextConfig

from tests import hf_oracle as oracle

KINDS = oracle.TARGET_KINDS
PROMPT_LEN = 12  # > sliding_window (8), so every test crosses the window
# Store (drafter-facing) layers per kind: last sliding / full layer before the shared block (doc §4.3, Q4).
STORE_LAYERS = {"dense": (4, 5), "e2b_like": (1, 2), "moe_like": (4, 5), "keqv_like": (4, 5)}
# Tensor counts listed in the reference doc §2.3: the tiny configs must be exactly those.
NUM_TENSORS = {"dense": 86, "e2b_like": 98, "moe_like": 132, "keqv_like": 84}
# [Hkv, D] of the shared sliding and full K/V per kind.
KV_SHAPES = {
    "dense": ((2, 16), (2, 32)),
    "e2b_like": ((1, 16), (1, 32)),
    "moe_like": ((2, 16), (1, 64)),
    "keqv_like": ((4, 16), (1, 32)),
}


@pytest.fixture(scope="module")
def targets() -> dict[str, torch.nn.Module]:
    """One seed-0 target per kind, shared by the tests of this module."""
    return {kind: oracle.build_target(kind) for kind in KINDS}


def _prompt(batch: int = 2, seed: int = 0) -> np.ndarray:
    """Random token ids [batch, PROMPT_LEN]."""
    return np.random.default_rng(seed).integers(0, oracle.VOCAB, size=(batch, PROMPT_LEN))


def _logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    """Uncached forward logits of any Gemma 4 causal LM class."""
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids), use_cache=False).logits.numpy()


def _assert_same_state(got: torch.nn.Module, want: dict[str, torch.Tensor]) -> None:
    """State dicts have the same keys and bit-identical values."""
    state = got.state_dict()
    assert set(state) == set(want)
    for name, tensor in want.items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("kind", KINDS)
def test_patched_kv_sharing_modes(kind: str) -> None:
    config = Gemma4TextConfig(**oracle.tiny_text_config_dict(kind))
    oracle.patch_kv_sharing_modes()  # idempotent: a second call changes nothing
    modes = config.kv_sharing_modes
    stores = [i for i, mode in enumerate(modes) if mode == "store"]
    assert tuple(stores) == STORE_LAYERS[kind]
    assert {config.layer_types[i] for i in stores} == {"sliding_attention", "full_attention"}
    if config.num_kv_shared_layers:
        upstream = oracle.UPSTREAM_KV_SHARING_MODES[0].fget(config)
        assert modes == upstream  # where upstream works, the patch agrees with it
    assistant_text = oracle.build_assistant(kind, ordered=False).config.text_config
    assert assistant_text.kv_sharing_modes == ["reuse"] * 4


@pytest.mark.parametrize("kind", KINDS)
def test_build_target_randomised_and_sane(kind: str, targets: dict[str, torch.nn.Module]) -> None:
    model = targets[kind]
    state = model.state_dict()
    assert len(state) == NUM_TENSORS[kind] + 1  # + the tied lm_head.weight alias
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config._attn_implementation == "eager"
    for name, tensor in state.items():
        assert tensor.dtype == torch.float32, name
        # Nothing left at an init constant (norms/scalars at 1, experts/router scales at 1, zeros).
        assert tensor.numel() == 1 or tensor.std() > 0, name
        assert not torch.all(tensor == 1.0), name
    assert oracle.reference_param_count(oracle.tiny_text_config_dict(kind)) == sum(
        p.numel() for p in model.parameters()
    )
    assert oracle.reference_buffer_count(oracle.tiny_text_config_dict(kind)) == 6  # one layer_scalar a layer
    again = oracle.build_target(kind, seed=0).state_dict()
    assert all(torch.equal(again[name], tensor) for name, tensor in state.items())
    other = oracle.build_target(kind, seed=1).state_dict()
    assert not torch.equal(other["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
    logits = oracle.reference_forward(model, _prompt())["logits"]
    assert 0.3 < logits.std() < 3.0 and np.abs(logits).max() < 0.5 * oracle.SOFTCAP


@pytest.mark.parametrize("kind", KINDS)
def test_reference_forward(kind: str, targets: dict[str, torch.nn.Module]) -> None:
    model = targets[kind]
    ids = _prompt()
    captured: dict[str, torch.Tensor] = {}
    handle = model.model.norm.register_forward_pre_hook(lambda _, args: captured.update(pre_norm=args[0]))
    try:
        out = oracle.reference_forward(model, ids)
    finally:
        handle.remove()
    batch, length = ids.shape
    assert out["logits"].shape == (batch, length, oracle.VOCAB)
    assert out["hidden"].shape == (batch, length, 64)
    (sliding_heads, sliding_dim), (full_heads, full_dim) = KV_SHAPES[kind]
    assert out["sliding_k"].shape == out["sliding_v"].shape == (batch, sliding_heads, length, sliding_dim)
    assert out["full_k"].shape == out["full_v"].shape == (batch, full_heads, length, full_dim)
    assert all(value.dtype == np.float32 for value in out.values())
    with torch.no_grad():
        post_norm = model.model.norm(captured["pre_norm"]).numpy()
    np.testing.assert_array_equal(out["hidden"], post_norm)  # hidden_states[-1] is post final norm
    assert not np.allclose(out["hidden"], captured["pre_norm"].numpy(), atol=1e-2)
    embed = model.model.embed_tokens.weight.detach().numpy()
    softcapped = np.tanh(out["hidden"] @ embed.T / oracle.SOFTCAP) * oracle.SOFTCAP
    np.testing.assert_allclose(out["logits"], softcapped, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["causal_lm", "conditional_generation"])
@pytest.mark.parametrize("kind", KINDS)
def test_save_and_reload(kind: str, layout: str, targets: dict[str, torch.nn.Module], tmp_path: Path) -> None:
    model = targets[kind]
    ids = _prompt()
    want_logits = _logits(model, ids)
    want_state = model.state_dict()
    prefix = "model.language_model." if layout == "conditional_generation" else "model."

    plain = tmp_path / "plain"
    oracle.save_target(model, plain, layout=layout)
    config = json.loads((plain / "config.json").read_text())
    with safe_open(str(plain / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and all(key.startswith(prefix) for key in keys)
    assert len(keys) == NUM_TENSORS[kind]
    if layout == "conditional_generation":
        assert config["model_type"] == "gemma4"
        assert config["architectures"] == ["Gemma4ForConditionalGeneration"]
        assert config["text_config"]["model_type"] == "gemma4_text" and config["vision_config"] is None
        full = Gemma4ForConditionalGeneration.from_pretrained(plain, attn_implementation="eager")
        oracle.realign_(full)
        np.testing.assert_array_equal(_logits(full.eval(), ids), want_logits)
    else:
        assert config["model_type"] == "gemma4_text" and "per_layer_config" in config
    reloaded = oracle.load_target(plain)
    _assert_same_state(reloaded, want_state)
    np.testing.assert_array_equal(_logits(reloaded, ids), want_logits)

    sharded = tmp_path / "sharded"
    oracle.save_target(model, sharded, layout=layout, max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and len(index["weight_map"]) == NUM_TENSORS[kind]
    np.testing.assert_array_equal(_logits(oracle.load_target(sharded), ids), want_logits)

    hub = tmp_path / "hub"
    oracle.save_target(model, hub, layout=layout)
    oracle.rewrite_config_hub_form(hub)
    text = json.loads((hub / "config.json").read_text())
    text = text.get("text_config", text)
    assert "per_layer_config" not in text
    assert text["global_head_dim"] == oracle.tiny_text_config_dict(kind)["global_head_dim"]
    assert text.get("num_global_key_value_heads") == oracle.tiny_text_config_dict(kind).get(
        "num_global_key_value_heads"
    )
    assert oracle.reference_param_count(text) == oracle.reference_param_count(oracle.tiny_text_config_dict(kind))
    np.testing.assert_array_equal(_logits(oracle.load_target(hub), ids), want_logits)

    bf16 = tmp_path / "bf16"
    oracle.save_target(model, bf16, layout=layout, dtype=torch.bfloat16)
    with safe_open(str(bf16 / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(key).dtype == torch.bfloat16 for key in f.keys())  # noqa: SIM118 (safe_open is no dict)
    # Round only the saved tensors: `.to(bf16)` on the module would also round the rotary inv_freq buffers.
    rounded = copy.deepcopy(model)
    rounded.load_state_dict({name: t.to(torch.bfloat16).to(torch.float32) for name, t in want_state.items()})
    reloaded = oracle.load_target(bf16)  # read back as f32
    _assert_same_state(reloaded, rounded.state_dict())
    np.testing.assert_array_equal(_logits(reloaded, ids), _logits(rounded, ids))
    assert model.model.embed_tokens.weight.dtype == torch.float32  # saving did not cast the caller's model


@pytest.mark.parametrize("kind", KINDS)
def test_reference_greedy(kind: str, targets: dict[str, torch.nn.Module]) -> None:
    model = targets[kind]
    ids = _prompt(batch=1)
    new_tokens = 10
    got = oracle.reference_greedy(model, ids, new_tokens)
    assert got.shape == (1, new_tokens) and got.dtype == np.int64
    assert len(set(got[0].tolist())) > 1  # the random model does not collapse onto one token (Q7)
    sequence = ids
    for _ in range(new_tokens):  # cache-free argmax loop: what cached generate must reproduce
        next_token = oracle.reference_forward(model, sequence)["logits"][:, -1].argmax(-1)
        sequence = np.concatenate([sequence, next_token[:, None]], axis=1)
    np.testing.assert_array_equal(got, sequence[:, PROMPT_LEN:])
    # EOS neither stops nor biases the oracle (Q1), and the model's own EOS setting is restored.
    saved_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = int(got[0, 0])
    try:
        np.testing.assert_array_equal(oracle.reference_greedy(model, ids, new_tokens), got)
        assert model.generation_config.eos_token_id == int(got[0, 0])
    finally:
        model.generation_config.eos_token_id = saved_eos


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_assistant(kind: str, ordered: bool, targets: dict[str, torch.nn.Module], tmp_path: Path) -> None:
    target = targets[kind]
    assistant = oracle.build_assistant(kind, ordered)
    config = assistant.config
    assert config.backbone_hidden_size == 64 and config.use_ordered_embeddings == ordered
    assert assistant.config._attn_implementation == "eager"
    assert assistant.generation_config.num_assistant_tokens == oracle.NUM_ASSISTANT_TOKENS
    if ordered:
        ordering = assistant.masked_embedding.token_ordering
        assert sorted(ordering.tolist()) == list(range(oracle.VOCAB))
        assert not torch.equal(ordering, torch.arange(oracle.VOCAB))
    ids = _prompt(batch=1)
    forward = oracle.reference_forward(target, ids)
    shared_kv = {
        "sliding_attention": (forward["sliding_k"], forward["sliding_v"]),
        "full_attention": (forward["full_k"], forward["full_v"]),
    }
    with torch.no_grad():
        token_embed = target.model.embed_tokens(torch.as_tensor(ids[:, -1:])).numpy()
    inputs_embeds = np.concatenate([token_embed, forward["hidden"][:, -1:]], axis=-1)
    position_ids = np.array([[PROMPT_LEN - 1]])
    out = oracle.reference_draft_step(assistant, inputs_embeds, position_ids, shared_kv)
    assert out["logits"].shape == (1, 1, oracle.VOCAB) and out["projected"].shape == (1, 1, 64)
    if ordered:  # only top_k clusters x V/C tokens get real logits, the rest share one fill value
        logits = out["logits"][0, 0]
        assert np.sum(logits > logits.min()) == 4 * oracle.VOCAB // 16
    oracle.save_assistant(assistant, tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["num_assistant_tokens"] == oracle.NUM_ASSISTANT_TOKENS
    reloaded = oracle.load_assistant(tmp_path)
    _assert_same_state(reloaded, assistant.state_dict())
    again = oracle.reference_draft_step(reloaded, inputs_embeds, position_ids, shared_kv)
    for name in out:
        np.testing.assert_array_equal(again[name], out[name])


@pytest.mark.parametrize(("kind", "ordered"), [(kind, False) for kind in KINDS] + [("dense", True), ("moe_like", True)])
def test_assisted_greedy_equals_greedy(kind: str, ordered: bool, targets: dict[str, torch.nn.Module]) -> None:
    target = targets[kind]
    ids = _prompt(batch=1, seed=1)
    want = oracle.reference_greedy(target, ids, 12)
    got = oracle.reference_assisted_greedy(target, oracle.build_assistant(kind, ordered), ids, 12)
    np.testing.assert_array_equal(got, want)


def test_config_dicts_are_json() -> None:
    for kind in KINDS:
        config = oracle.tiny_text_config_dict(kind)
        assert json.loads(json.dumps(config)) == config
        for ordered in (False, True):
            config = oracle.tiny_assistant_config_dict(kind, ordered)
            assert json.loads(json.dumps(config)) == config
    assert torch.get_num_threads() == 1  # set at import of hf_oracle (P8)
