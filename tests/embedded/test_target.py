"""The embedded tiny target: trained once (the seconds-long ``:test`` settings), loadable by mtp and transformers."""

import json
import math
import shutil
import time

import jax.numpy as jnp
import numpy as np
import pytest

from mtp.checkpoint import load_target
from mtp.data.chat import ChatTemplate
from mtp.data.tokenizer import load_tokenizer
from mtp.embedded import target as tiny_target
from tests import hf_oracle
from tests.gemma4.test_oracle import assert_float32_close, references

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtp_cache")
    config = tiny_target.default_config("test")
    return root, config, tiny_target.ensure_tiny_target(root, config)


def test_writes_a_complete_model_directory(built):
    root, _, path = built
    assert path == root / "tiny_target"
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json", "manifest.json"}
    assert sorted(p.name for p in root.iterdir()) == ["data", "tiny_target"], "staging directory left behind"
    assert (path / "tokenizer.json").read_bytes() == (root / "data" / "tokenizer.json").read_bytes()


def test_the_loss_went_down(built):
    _, config, path = built
    manifest = json.loads((path / "manifest.json").read_text())
    assert abs(manifest["initial_eval_loss"] - math.log(config.model.vocab_size)) < 0.2, "init is not near uniform"
    train_losses = list(manifest["train_loss"].values())
    assert len(train_losses) == config.num_train_steps // config.log_every_steps
    assert train_losses[-1] < train_losses[0] - 0.3, train_losses
    assert manifest["eval_loss"] < manifest["initial_eval_loss"] - 0.5, manifest


def test_mtp_and_transformers_load_it_with_the_same_logits(built):
    _, config, path = built
    model = load_target(path)
    assert model.config == tiny_target.model_config(config)
    template = ChatTemplate(load_tokenizer(path))  # decode.py tokenises text prompts this way
    ids = np.asarray([template.prompt_ids([{"role": "user", "content": "What does `json.dumps` do?"}])])
    ours = model(jnp.asarray(ids))[0].logits
    ref32, ref64 = references(hf_oracle.load_target(path), ids)
    assert_float32_close(ours, ref32["logits"], ref64["logits"], "tiny target logits")


def test_a_second_call_returns_without_training(built, monkeypatch):
    root, config, path = built

    def fail(*args, **kwargs):
        raise AssertionError("retrained a complete tiny target")

    monkeypatch.setattr(tiny_target, "train", fail)
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    start = time.perf_counter()
    assert tiny_target.ensure_tiny_target(root, config) == path
    assert time.perf_counter() - start < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before


def test_changed_settings_or_no_manifest_retrain(built, monkeypatch, tmp_path):
    root, config, path = built

    class Retrained(Exception):
        pass

    def train(*args, **kwargs):
        raise Retrained

    monkeypatch.setattr(tiny_target, "train", train)
    with pytest.raises(Retrained):
        tiny_target.ensure_tiny_target(root, config, steps=config.num_train_steps + 1)
    shutil.copytree(path, tmp_path / "tiny_target")
    (tmp_path / "tiny_target" / "manifest.json").unlink()  # an interrupted export has no manifest: not a model yet
    with pytest.raises(Retrained):
        tiny_target.ensure_tiny_target(tmp_path, config)
