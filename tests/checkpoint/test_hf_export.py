"""save_target against transformers: exported directories load there bit-exactly and compute the same logits.

Equality. Export only moves bytes (a reshape and a transpose per tensor), so an HF checkpoint read by ``load_target``
and written back by ``save_target`` must give transformers the original state dict bit for bit, and a second
load/save cycle must reproduce the files byte for byte. Logits of a model that never saw transformers (random init
from our config) are float32 kernel noise apart and pass by ``assert_float32_close`` (tests/gemma4/test_oracle.py).
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

from mtp.checkpoint.hf_export import config_to_hf, save_target
from mtp.checkpoint.hf_target import load_target
from mtp.checkpoint.safetensors_io import SafetensorsCheckpoint
from mtp.gemma4.config import PRESETS, config_from_hf
from mtp.gemma4.model import Gemma4
from tests import hf_oracle
from tests.gemma4.test_oracle import assert_float32_close, references, token_ids

# Fields of transformers' Gemma4TextConfig that shape the model (per_layer_config carries global head dim / KV heads).
HF_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "per_layer_config",
    "layer_types",
    "sliding_window",
    "rope_parameters",
    "rms_norm_eps",
    "final_logit_softcapping",
    "hidden_size_per_layer_input",
    "vocab_size_per_layer_input",
    "num_kv_shared_layers",
    "use_double_wide_mlp",
    "attention_k_eq_v",
    "enable_moe_block",
    "num_experts",
    "top_k_experts",
    "moe_intermediate_size",
    "hidden_activation",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def flat_params(model: Gemma4) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def our_config(kind: str):
    return config_from_hf(hf_oracle.tiny_text_config_dict(kind) | {"model_type": "gemma4_text"})


@pytest.mark.parametrize("name", [*PRESETS, *hf_oracle.TARGET_KINDS])
def test_config_round_trip(name):
    config = PRESETS[name] if name in PRESETS else our_config(name)
    hf = json.loads(json.dumps(config_to_hf(config)))
    assert config_from_hf(hf) == config
    assert hf["model_type"] == "gemma4_text" and hf["architectures"] == ["Gemma4ForCausalLM"]
    # transformers turns per-layer embeddings on by default: "off" must be spelled out.
    assert hf["hidden_size_per_layer_input"] == config.per_layer_input_dim


@pytest.fixture(scope="module", params=hf_oracle.TARGET_KINDS)
def exported(request, tmp_path_factory):
    """An HF checkpoint of one kind, read into ours and written back with save_target."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"export-{kind}")
    hf_model = hf_oracle.build_target(kind, seed=2)
    hf_oracle.save_target(hf_model, root / "original")
    model = load_target(root / "original")
    save_target(model, root / "exported")
    return kind, hf_model, model, root


def test_transformers_reads_back_the_original_state_dict(exported):
    kind, hf_model, _, root = exported
    original, reloaded = hf_model.state_dict(), hf_oracle.load_target(root / "exported").state_dict()
    assert sorted(reloaded) == sorted(original), kind
    for key, tensor in original.items():
        assert reloaded[key].dtype == tensor.dtype and torch.equal(reloaded[key], tensor), f"{kind}: {key}"


def test_load_save_load_is_bit_exact(exported):
    kind, _, model, root = exported
    again = load_target(root / "exported")
    first, second = flat_params(model), flat_params(again)
    assert first.keys() == second.keys()
    for path, value in first.items():
        np.testing.assert_array_equal(second[path], value, err_msg=f"{kind} {path}")
    save_target(again, root / "exported_twice")
    for name in ("config.json", "model.safetensors"):
        assert (root / "exported_twice" / name).read_bytes() == (root / "exported" / name).read_bytes(), name


def test_config_json_is_complete(exported):
    kind, hf_model, model, root = exported
    written = json.loads((root / "exported" / "config.json").read_text())
    assert written["dtype"] == "float32"
    with SafetensorsCheckpoint.open(root / "exported") as checkpoint:
        assert "lm_head.weight" not in checkpoint  # tied: transformers does not write it either
        assert checkpoint.shape("model.layers.0.layer_scalar") == (1,)
    assert config_from_hf(written) == model.config
    # Every field transformers reads that shapes the model agrees with the original HF config.
    reloaded = hf_oracle.load_target(root / "exported").config.to_dict()
    original = hf_model.config.to_dict()
    for field in HF_FIELDS:
        if field == "vocab_size_per_layer_input" and not original["hidden_size_per_layer_input"]:
            continue  # no per-layer table to size: we write 0
        assert reloaded[field] == original[field], f"{kind}: {field}"


def _randomize(model: Gemma4, seed: int) -> None:
    """Moves every parameter off its init (norms and scalars away from 1, a small embedding: see hf_oracle Q7)."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    for path, variable in nnx.to_flat_state(state):
        shape, name = variable.get_value().shape, path[-1]
        if name in ("weight", "router_scale", "layer_scalar", "per_expert_scale"):
            value = rng.uniform(0.6, 1.4, shape)
        elif name in ("embed", "ple_embed"):
            value = rng.normal(0.0, 0.1 if name == "embed" else 0.25, shape)
        elif name == "router_proj":  # wide router scores: top-k choices with clear margins (hf_oracle)
            value = rng.normal(0.0, 0.5, shape)
        else:
            value = np.asarray(variable.get_value())
        variable.set_value(jnp.asarray(value, jnp.float32))
    nnx.update(model, state)


@pytest.mark.parametrize("kind", hf_oracle.TARGET_KINDS)
def test_exported_random_model_matches_transformers(kind, tmp_path):
    """A model built from our config alone (never loaded from HF) computes transformers' logits once exported."""
    model = Gemma4(our_config(kind), rngs=nnx.Rngs(3))
    _randomize(model, seed=3)
    save_target(model, tmp_path)
    ids = token_ids(2, 20, seed=11)
    ours = model(jnp.asarray(ids))[0].logits
    ref32, ref64 = references(hf_oracle.load_target(tmp_path), ids)
    assert_float32_close(ours, ref32["logits"], ref64["logits"], f"{kind} exported logits")


def test_bfloat16_export(exported, tmp_path):
    kind, _, model, _ = exported
    save_target(model, tmp_path, dtype=jnp.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = flat_params(load_target(tmp_path))
    for path, value in flat_params(model).items():
        assert loaded[path].dtype == ml_dtypes.bfloat16, path
        np.testing.assert_array_equal(loaded[path], value.astype(ml_dtypes.bfloat16), err_msg=f"{kind} {path}")
