"""HF ``gemma4_assistant`` import/export: exact layout, transformers runs our exports, bit-exact round trips, errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

from mtp import sharding
from mtp.checkpoint.hf_drafter import load_drafter, save_drafter
from mtp.checkpoint.safetensors_io import CheckpointError, SafetensorsCheckpoint, save_safetensors
from mtp.drafter.config import DrafterConfigError
from tests import hf_oracle
from tests.drafter.conftest import token_ids

CASES = [(kind, ordered) for kind in hf_oracle.TARGET_KINDS for ordered in (False, True)]
IDS = [f"{kind}-{'ordered' if ordered else 'plain'}" for kind, ordered in CASES]


def read_all(path) -> dict[str, np.ndarray]:
    with SafetensorsCheckpoint.open(path) as checkpoint:
        return {key: checkpoint.read(key) for key in checkpoint}


def all_variables(drafter) -> dict:
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(drafter, nnx.Variable))}


def assert_same_arrays(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert got[key].tobytes() == value.tobytes(), key


@pytest.mark.parametrize(("kind", "ordered"), CASES, ids=IDS)
def test_export_is_exactly_hf_layout_and_loads_in_transformers(kind, ordered, assistants, tmp_path):
    hf_assistant, path, drafter = assistants(kind, ordered)
    save_drafter(drafter, tmp_path, num_assistant_tokens=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert_same_arrays(read_all(tmp_path), read_all(path))  # names, dtypes (int64 ordering), shapes, bytes
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gemma4_assistant" and config["architectures"] == ["Gemma4AssistantForCausalLM"]
    assert json.loads((tmp_path / "generation_config.json").read_text())["num_assistant_tokens"] == 3

    reloaded = hf_oracle.load_assistant(tmp_path)
    assert reloaded.generation_config.num_assistant_tokens == 3
    want = hf_assistant.state_dict()
    assert reloaded.state_dict().keys() == want.keys()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, want[name]), name
    ours_text, theirs_text = reloaded.config.text_config, hf_assistant.config.text_config
    for i in range(4):  # the resolved per-layer attention shapes
        ours_layer, theirs_layer = ours_text.per_layer_config[i], theirs_text.per_layer_config[i]
        assert (ours_layer.head_dim, ours_layer.num_key_value_heads) == (
            theirs_layer.head_dim,
            theirs_layer.num_key_value_heads,
        )
    for field in (
        "layer_types",
        "rope_parameters",
        "sliding_window",
        "attention_k_eq_v",
        "num_kv_shared_layers",
        "final_logit_softcapping",
        "rms_norm_eps",
    ):
        assert getattr(ours_text, field) == getattr(theirs_text, field), field
    for field in ("backbone_hidden_size", "use_ordered_embeddings", "num_centroids", "centroid_intermediate_top_k"):
        assert getattr(reloaded.config, field) == getattr(hf_assistant.config, field), field


@pytest.mark.parametrize(("kind", "ordered"), [(kind, False) for kind in hf_oracle.TARGET_KINDS] + [("dense", True)])
def test_transformers_assisted_generation_with_our_export(kind, ordered, targets, assistants, tmp_path):
    hf_target, _ = targets(kind)
    _, _, drafter = assistants(kind, ordered)
    save_drafter(drafter, tmp_path)
    ids = token_ids(1, 12, seed=5)
    want = hf_oracle.reference_greedy(hf_target, ids, 10)
    got = hf_oracle.reference_assisted_greedy(hf_target, hf_oracle.load_assistant(tmp_path), ids, 10)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_import_export_import_is_bit_exact(dtype, assistants, tmp_path):
    _, path, _ = assistants("keqv_like", True)
    first = load_drafter(path, dtype=dtype)
    save_drafter(first, tmp_path / "a")
    second = load_drafter(tmp_path / "a")
    assert second.embed[...].dtype == dtype and second.token_ordering[...].dtype == jnp.int32
    assert second.config == first.config
    assert_same_arrays(all_variables(second), all_variables(first))
    save_drafter(second, tmp_path / "b")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    stored = read_all(tmp_path / "a")
    assert stored["model.embed_tokens.weight"].dtype == (np.float32 if dtype == jnp.float32 else ml_dtypes.bfloat16)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["dtype"] == np.dtype(dtype).name


def test_load_onto_a_mesh(assistants):
    _, path, drafter = assistants("dense", True)
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
    sharded = load_drafter(path, mesh=mesh)
    assert sharded.embed[...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert_same_arrays(all_variables(sharded), all_variables(drafter))


def rewrite(src, dst, *, config=None, tensors=None):
    """A copy of checkpoint ``src`` with config.json keys and tensors replaced (None deletes a tensor)."""
    shutil.copytree(src, dst)
    if config:
        data = json.loads((dst / "config.json").read_text())
        for key, value in config.items():
            *parents, last = key.split(".")
            node = data
            for parent in parents:
                node = node[parent]
            node[last] = value
        (dst / "config.json").write_text(json.dumps(data))
    if tensors:
        arrays = read_all(src) | tensors
        (dst / "model.safetensors").unlink()
        save_safetensors({k: v for k, v in arrays.items() if v is not None}, dst)
    return dst


BAD = {
    "unknown model_type": (
        dict(config={"model_type": "gemma4_text"}),
        DrafterConfigError,
        r"model_type is 'gemma4_text'.*'gemma4_assistant'",
    ),
    "vocab % centroids": (
        dict(config={"num_centroids": 24}),
        DrafterConfigError,
        "vocab_size=512 is not a multiple of num_centroids=24",
    ),
    "no token_ordering": (
        dict(tensors={"masked_embedding.token_ordering": None}),
        CheckpointError,
        "use_ordered_embeddings is set but masked_embedding.token_ordering is missing",
    ),
    "token id out of range": (
        dict(tensors={"masked_embedding.token_ordering": np.arange(1, 513)}),
        CheckpointError,
        r"ids in \[1, 512\], outside the vocabulary \[0, 512\)",
    ),
    "missing tensor": (
        dict(tensors={"model.norm.weight": None}),
        CheckpointError,
        r"1 tensors missing, e.g. \['model.norm.weight'\]",
    ),
    "unexpected tensor": (
        dict(tensors={"model.layers.0.extra.weight": np.zeros(2, np.float32)}),
        CheckpointError,
        r"1 unexpected tensors, e.g. \['model.layers.0.extra.weight'\]",
    ),
    "shape mismatch": (
        dict(tensors={"model.layers.3.self_attn.q_norm.weight": np.ones(16, np.float32)}),
        CheckpointError,
        r"model.layers.3.self_attn.q_norm.weight has shape \(16,\), expected \(32,\)",
    ),
    "PLE on": (
        dict(config={"text_config.hidden_size_per_layer_input": 16}),
        DrafterConfigError,
        "hidden_size_per_layer_input = 16; a Gemma 4 assistant needs 0",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoints_raise_clear_errors(case, assistants, tmp_path):
    _, path, _ = assistants("dense", True)
    changes, error, message = BAD[case]
    with pytest.raises(error, match=message):
        load_drafter(rewrite(path, tmp_path / "bad", **changes))


def test_drafter_that_does_not_fit_the_target(targets, assistants, tmp_path):
    _, path, _ = assistants("dense", False)
    e2b_target = targets("e2b_like")[1].config
    with pytest.raises(DrafterConfigError, match=r"config\.json.*sliding_attention KV heads = 2 but target layer 1"):
        load_drafter(path, target_config=e2b_target)
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_drafter(tmp_path)
