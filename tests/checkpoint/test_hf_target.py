"""load_target on real transformers checkpoints: every file form, bf16, streaming onto a mesh, and bad input.

Equality. The same weights through the same code give bit-identical logits, so every checkpoint form (layout,
sharding, config form) must reproduce the plain causal_lm single-file load exactly. Against transformers, and
wherever a different XLA program computes the logits (a sharded forward sums in another order: measured up to
3e-5 apart), results are float32 kernel noise and pass by ``assert_float32_close`` (tests/gemma4/test_oracle.py):
no further from the exact float64 answer than 2.5 times transformers' own float32 error. That also covers bf16 files
computed in float32, where a flat 1e-5 would fail on kernel noise alone (dense: 3.7e-5, as with f32 weights).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import NamedSharding
from transformers import Gemma4ForCausalLM

from mtp import sharding
from mtp.checkpoint.hf_target import load_target, target_layouts
from mtp.checkpoint.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    SafetensorsCheckpoint,
    save_safetensors,
)
from mtp.gemma4.config import ConfigError
from mtp.gemma4.model import Gemma4
from tests import hf_oracle
from tests.gemma4.test_oracle import assert_float32_close, max_err, references, token_ids

IDS = token_ids(2, 12, seed=7)
CG, CLM = "conditional_generation", "causal_lm"


@nnx.jit
def logits_of(model: Gemma4, tokens: jax.Array) -> jax.Array:
    return model(tokens)[0].logits


def flat_params(model: Gemma4) -> dict:
    return {path: variable.get_value() for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@dataclasses.dataclass
class Case:
    """One tiny HF target, its checkpoint directories, and our load of its plain causal_lm single f32 file."""

    kind: str
    hf_model: Gemma4ForCausalLM
    root: pathlib.Path
    base: Gemma4 | None = None
    logits: np.ndarray | None = None
    ref32: np.ndarray | None = None
    ref64: np.ndarray | None = None

    def checkpoint(self, layout=CLM, sharded=False, hub_form=False, dtype=torch.float32) -> pathlib.Path:
        """The HF model saved in one form (cached): 20KB shards give dozens of files and an index."""
        path = self.root / f"{layout}-{'sharded' if sharded else 'single'}-{'hub' if hub_form else 'plc'}-{dtype}"
        if not path.exists():
            hf_oracle.save_target(
                self.hf_model, path, layout=layout, max_shard_size="20KB" if sharded else None, dtype=dtype
            )
            if hub_form:
                hf_oracle.rewrite_config_hub_form(path)
        return path


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Callable[[str], Case]:
    """Builds each kind on first use only: a test that needs one kind does not pay for four."""
    built: dict[str, Case] = {}

    def get(kind: str) -> Case:
        if kind not in built:
            case = Case(kind, hf_oracle.build_target(kind, seed=2), tmp_path_factory.mktemp(kind))
            case.base = load_target(case.checkpoint())
            case.logits = np.asarray(logits_of(case.base, jnp.asarray(IDS)))
            ref32, ref64 = references(case.hf_model, IDS)
            case.ref32, case.ref64 = ref32["logits"], ref64["logits"]
            assert_float32_close(case.logits, case.ref32, case.ref64, f"{kind} plain causal_lm load")
            built[kind] = case
        return built[kind]

    return get


def copy_checkpoint(src: pathlib.Path, dst: pathlib.Path, *, tensors=None, config=None, max_shard_bytes=None):
    """``src`` rewritten to ``dst`` with ``tensors(dict)`` / ``config(dict)`` applied in place."""
    with SafetensorsCheckpoint.open(src) as checkpoint:
        arrays = {key: checkpoint.read(key) for key in checkpoint}
    if tensors:
        tensors(arrays)
    save_safetensors(arrays, dst, max_shard_bytes=max_shard_bytes)
    edit_config(src / "config.json", dst / "config.json", config)
    return dst


def edit_config(src: pathlib.Path, dst: pathlib.Path, edit=None) -> None:
    data = json.loads(src.read_text())
    if edit:
        edit(data)
    dst.write_text(json.dumps(data))


def tensor_keys(path: pathlib.Path) -> list[str]:
    with SafetensorsCheckpoint.open(path) as checkpoint:
        return checkpoint.keys()


# Every kind loads from a multimodal, a sharded and a hub-form file; every axis is varied against the plain form.
FORMS = [
    ("dense", CG, True, False),
    ("dense", CLM, False, True),
    ("e2b_like", CG, False, True),
    ("e2b_like", CLM, True, True),
    ("moe_like", CG, True, True),
    ("moe_like", CLM, True, False),
    ("keqv_like", CG, True, True),
    ("keqv_like", CLM, False, True),
]


@pytest.mark.parametrize("kind,layout,sharded,hub_form", FORMS, ids=["-".join(map(str, f)) for f in FORMS])
def test_every_checkpoint_form_loads_identically(cases, kind, layout, sharded, hub_form):
    case = cases(kind)
    path = case.checkpoint(layout, sharded, hub_form)
    files = {p.name for p in path.iterdir()}
    assert (INDEX_FILE in files and SINGLE_FILE not in files) == sharded, files
    assert sum(name.endswith(".safetensors") for name in files) > (5 if sharded else 0)
    keys = tensor_keys(path)
    assert all(k.startswith("model.") for k in keys)
    assert all(k.startswith("model.language_model.") for k in keys) == (layout == CG)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == ("gemma4" if layout == CG else "gemma4_text")
    text = config.get("text_config", config)
    assert ("per_layer_config" in text, "global_head_dim" in text) == (not hub_form, hub_form)

    model = load_target(path)
    assert model.config == case.base.config
    base = flat_params(case.base)
    for param_path, value in flat_params(model).items():
        np.testing.assert_array_equal(value, base[param_path], err_msg=str(param_path))
    logits = np.asarray(logits_of(model, jnp.asarray(IDS)))
    np.testing.assert_array_equal(logits, case.logits)
    assert_float32_close(logits, case.ref32, case.ref64, f"{kind} {layout} sharded={sharded} hub={hub_form}")


BF16_FORMS = [("dense", CLM, False), ("e2b_like", CLM, True), ("moe_like", CG, True), ("keqv_like", CG, False)]


@pytest.mark.parametrize("kind,layout,sharded", BF16_FORMS)
def test_bf16_checkpoint(cases, kind, layout, sharded):
    case = cases(kind)
    path = case.checkpoint(layout, sharded, dtype=torch.bfloat16)
    kept = flat_params(load_target(path))
    assert {value.dtype for value in kept.values()} == {jnp.dtype(jnp.bfloat16)}
    model = load_target(path, dtype=jnp.float32)
    for param_path, value in flat_params(model).items():
        assert value.dtype == jnp.float32, param_path
        np.testing.assert_array_equal(value, np.asarray(kept[param_path]).astype(np.float32), str(param_path))

    # Q9: from_pretrained(dtype=float32) of the bf16 file = bf16-rounded weights, f32 compute, f32 rotary buffers.
    reference = hf_oracle.load_target(path)
    assert reference.model.embed_tokens.weight.dtype == torch.float32
    ref32, ref64 = (r["logits"] for r in references(reference, IDS))
    logits = np.asarray(logits_of(model, jnp.asarray(IDS)))
    assert_float32_close(logits, ref32, ref64, f"{kind} bf16 file in float32")
    # The rounding moves logits far beyond the tolerance, so the f32 reference could not pass by accident.
    assert max_err(logits, case.ref64) > 1e-3


MESHES = [
    ("moe_like", {"data": 2, "fsdp": 2, "tensor": 2}),
    ("dense", {"fsdp": 8}),
    ("e2b_like", {"tensor": 4, "fsdp": 2}),
    ("keqv_like", {"tensor": 4, "fsdp": 2}),
]
MESH_IDS = [f"{kind}-" + "x".join(f"{a}{n}" for a, n in shape.items()) for kind, shape in MESHES]


def slice_size(index: tuple[slice, ...], shape: tuple[int, ...]) -> int:
    return math.prod(len(range(*s.indices(n))) for s, n in zip(index, shape, strict=True))


@pytest.mark.parametrize("kind,mesh_shape", MESHES, ids=MESH_IDS)
def test_mesh_load_streams_each_shard(cases, monkeypatch, kind, mesh_shape):
    """Logical-rule shardings, single-device values, and a split parameter is never read whole by one call."""
    case = cases(kind)
    path = case.checkpoint(CG, sharded=True)
    reads: dict[str, list] = {}
    original = SafetensorsCheckpoint.read

    def recording_read(self, key, index=None):
        reads.setdefault(key, []).append(index)
        return original(self, key, index)

    monkeypatch.setattr(SafetensorsCheckpoint, "read", recording_read)
    mesh = sharding.make_mesh(mesh_shape)
    model = load_target(path, mesh=mesh)

    base = flat_params(case.base)
    layouts = target_layouts(model.config, "model.language_model")
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert set(flat) == set(layouts) == set(base)
    split = 0
    for param_path, variable in flat.items():
        value, layout = variable.get_value(), layouts[param_path]
        spec = sharding.logical_spec(value.shape, variable.get_metadata()["axes"], mesh)
        assert value.sharding == NamedSharding(mesh, spec), param_path
        np.testing.assert_array_equal(value, base[param_path], err_msg=str(param_path))
        full = math.prod(layout.hf_shape)
        sizes = [slice_size(index, layout.hf_shape) for index in reads[layout.key]]
        if value.sharding.is_fully_replicated:
            assert set(sizes) == {full}, (param_path, sizes)
            continue
        split += 1
        shard = math.prod(value.sharding.shard_shape(value.shape))
        assert shard < full and set(sizes) == {shard}, (param_path, layout.key, shard, full, sizes)
        assert len(sizes) >= full // shard, (param_path, sizes)  # at least one read per distinct shard
    assert split >= len(flat) // 3, f"only {split} of {len(flat)} parameters split over {mesh_shape}"


@pytest.mark.parametrize("kind,mesh_shape", MESHES, ids=MESH_IDS)
def test_mesh_forward_matches(cases, kind, mesh_shape):
    case = cases(kind)
    model = load_target(case.checkpoint(CG, sharded=True), mesh=sharding.make_mesh(mesh_shape))
    logits = np.asarray(logits_of(model, jnp.asarray(IDS)))
    assert_float32_close(logits, case.ref32, case.ref64, f"{kind} on mesh {mesh_shape}")


def test_e2b_unused_shared_kv_tensors_are_skipped(cases, tmp_path):
    """Released E2B files carry K/V weights for the KV-shared layers; transformers ignores them, so do we."""
    case = cases("e2b_like")
    config, prefix = case.base.config, "model.language_model.layers"
    rng = np.random.default_rng(0)

    def add_shared_kv(arrays):
        for i in range(config.num_layers):
            if config.shares_kv(i):
                head_dim = config.head_dim_of(config.layer_types[i])
                kv = (config.kv_heads(config.layer_types[i]) * head_dim, config.hidden_size)
                for name, shape in (("k_proj.weight", kv), ("v_proj.weight", kv), ("k_norm.weight", (head_dim,))):
                    arrays[f"{prefix}.{i}.self_attn.{name}"] = rng.standard_normal(shape).astype(np.float32)

    path = copy_checkpoint(case.checkpoint(CG), tmp_path / "e2b", tensors=add_shared_kv, max_shard_bytes=20_000)
    assert f"{prefix}.5.self_attn.v_proj.weight" in tensor_keys(path) and (path / INDEX_FILE).is_file()
    np.testing.assert_array_equal(np.asarray(logits_of(load_target(path), jnp.asarray(IDS))), case.logits)
    hf_logits = hf_oracle.reference_forward(hf_oracle.load_target(path), IDS)["logits"]
    np.testing.assert_array_equal(hf_logits, case.ref32, err_msg="transformers does not ignore them after all")


@pytest.mark.parametrize(
    "kind,key",
    [
        ("e2b_like", "model.layers.3.self_attn.q_proj.bias"),  # on a shared layer, but not a K/V weight
        ("e2b_like", "model.layers.6.self_attn.k_proj.weight"),  # layer 6 of a 6-layer model
        ("e2b_like", "model.layers.1.self_attn.v_norm.weight"),  # K/V-shaped, but layer 1 owns its K/V
        ("keqv_like", "model.layers.5.self_attn.v_proj.weight"),  # V on a K=V layer
        ("dense", "lm_head.bias"),
    ],
)
def test_other_extra_tensors_are_errors(cases, tmp_path, kind, key):
    path = copy_checkpoint(cases(kind).checkpoint(), tmp_path / "extra", tensors=lambda a: a.update({key: np.ones(4)}))
    with pytest.raises(CheckpointError, match="1 unexpected tensors") as info:
        load_target(path)
    assert f"{key} (in {SINGLE_FILE})" in str(info.value) and str(path) in str(info.value)


def test_lm_head_equal_to_embedding_is_tied(cases, tmp_path):
    case = cases("dense")
    tie = lambda arrays: arrays.update({"lm_head.weight": arrays["model.embed_tokens.weight"]})
    path = copy_checkpoint(case.checkpoint(), tmp_path / "tied", tensors=tie)
    np.testing.assert_array_equal(np.asarray(logits_of(load_target(path), jnp.asarray(IDS))), case.logits)


def test_lm_head_differing_from_embedding_is_an_error(cases, tmp_path):
    """transformers unties a differing lm_head and uses it; dropping it silently would change the logits."""
    case = cases("dense")

    def untie(arrays):
        arrays["lm_head.weight"] = arrays["model.embed_tokens.weight"].copy()
        arrays["lm_head.weight"][300] += 1.0

    path = copy_checkpoint(case.checkpoint(), tmp_path / "untied", tensors=untie)
    with pytest.raises(CheckpointError, match=r"lm_head\.weight differs from model\.embed_tokens\.weight") as info:
        load_target(path)
    assert str(path / SINGLE_FILE) in str(info.value)
    hf_model = Gemma4ForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    assert max_err(hf_oracle.reference_forward(hf_model, IDS)["logits"], case.ref32) > 1e-3


def assert_error(path: pathlib.Path, error: type[ValueError], *fragments: str) -> None:
    with pytest.raises(error) as info:
        load_target(path)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in: {info.value}"


def test_wrong_model_type(cases, tmp_path):
    path = tmp_path / "llama"
    shutil.copytree(cases("dense").checkpoint(), path)
    edit_config(path / "config.json", path / "config.json", lambda c: c.update(model_type="llama"))
    assert_error(path, ConfigError, str(path / "config.json"), "model_type is 'llama'")


def test_missing_tensor(cases, tmp_path):
    key = "model.layers.1.mlp.up_proj.weight"
    path = copy_checkpoint(cases("dense").checkpoint(), tmp_path / "missing", tensors=lambda a: a.pop(key))
    assert_error(path, CheckpointError, str(path), "1 tensors missing", key)


def test_shape_mismatch_names_tensor_file_and_shapes(cases, tmp_path):
    path = tmp_path / "narrow"
    shutil.copytree(cases("dense").checkpoint(CLM, sharded=True), path)
    edit_config(path / "config.json", path / "config.json", lambda c: c.update(hidden_size=48))
    key = "model.embed_tokens.weight"
    shard = json.loads((path / INDEX_FILE).read_text())["weight_map"][key]
    assert_error(path, CheckpointError, f"{path / shard}: tensor {key}", "(512, 64)", "(512, 48)")


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_truncated_file(cases, tmp_path, sharded):
    path = tmp_path / "truncated"
    shutil.copytree(cases("dense").checkpoint(CLM, sharded=sharded), path)
    victim = sorted(path.glob("*.safetensors"))[-1]
    victim.write_bytes(victim.read_bytes()[:-10])
    assert_error(path, CheckpointError, str(victim), "not a readable safetensors file", "re-download")


UNSUPPORTED = {
    "attention_bias": (lambda t: t.update(attention_bias=True), "attention_bias=True"),
    "yarn": (lambda t: t["rope_parameters"]["full_attention"].update(rope_type="yarn", factor=8.0), "'yarn'"),
    "unknown_key": (lambda t: t.update(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    "activation": (lambda t: t.update(hidden_activation="silu"), "'silu'"),
    "untied": (lambda t: t.update(tie_word_embeddings=False), "untied"),
}


@pytest.mark.parametrize("layout", [CLM, CG])
@pytest.mark.parametrize("option", list(UNSUPPORTED))
def test_unsupported_config_option(cases, tmp_path, layout, option):
    edit, fragment = UNSUPPORTED[option]
    path = tmp_path / option
    shutil.copytree(cases("dense").checkpoint(layout), path)
    edit_config(path / "config.json", path / "config.json", lambda c: edit(c.get("text_config", c)))
    assert_error(path, ConfigError, str(path / "config.json"), fragment)


def test_pickle_only_directory(cases, tmp_path):
    case = cases("dense")
    shutil.copy(case.checkpoint() / "config.json", tmp_path / "config.json")
    torch.save(case.hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    assert_error(tmp_path, CheckpointError, str(tmp_path), "pickle", "pytorch_model.bin")


def test_no_config_json(cases, tmp_path):
    shutil.copy(cases("dense").checkpoint() / SINGLE_FILE, tmp_path / SINGLE_FILE)
    assert_error(tmp_path, CheckpointError, str(tmp_path / "config.json"), "no config.json")


def test_bf16_values_are_the_files_bits(cases):
    """dtype=None hands back the file's bf16 values untouched (no round trip through float32 rounding)."""
    path = cases("e2b_like").checkpoint(CG, sharded=True, dtype=torch.bfloat16)
    params = flat_params(load_target(path))
    with SafetensorsCheckpoint.open(path) as checkpoint:
        for param_path, layout in target_layouts(cases("e2b_like").base.config, "model.language_model").items():
            assert checkpoint.dtype(layout.key) == np.dtype(ml_dtypes.bfloat16)
            np.testing.assert_array_equal(layout.to_hf(np.asarray(params[param_path])), checkpoint.read(layout.key))
