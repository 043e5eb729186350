"""The embedded tiny target: trained once per session (the seconds-long ``:test`` settings, by conftest), with the
trainer's checkpoints; loadable by mtp and transformers."""

import json
import math
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from mtp.checkpoint import load_target
from mtp.data.chat import ChatTemplate
from mtp.data.tokenizer import load_tokenizer
from mtp.embedded import target as tiny_target
from mtp.training.checkpoints import Checkpointer
from tests import hf_oracle
from tests.gemma4.test_oracle import assert_float32_close, references

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(embedded_cache):
    """The session's cache, where conftest built the test variant: (root, its config, its directory)."""
    config = tiny_target.default_config("test")
    return embedded_cache, config, tiny_target.ensure_tiny_target(embedded_cache, config, name="test")


def test_writes_a_complete_model_directory(built):
    root, _, path = built
    assert path == root / "tiny_target_test"
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json", "manifest.json"}
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")], "staging or training directory left behind"
    assert (path / "tokenizer.json").read_bytes() == (root / "data" / "tokenizer.json").read_bytes()


def test_the_loss_went_down(built):
    _, config, path = built
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["train_seconds"] > 0 and manifest["train_tokens_per_second"] > 0
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
    assert tiny_target.ensure_tiny_target(root, config, name="test") == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before


def test_changed_settings_or_no_manifest_retrain(built, monkeypatch, tmp_path):
    root, config, path = built

    class Retrained(Exception):
        pass

    def train(*args, **kwargs):
        raise Retrained

    monkeypatch.setattr(tiny_target, "train", train)
    with pytest.raises(Retrained):
        tiny_target.ensure_tiny_target(root, config, steps=config.num_train_steps + 1, name="test")
    shutil.copytree(path, tmp_path / "tiny_target")
    (tmp_path / "tiny_target" / "manifest.json").unlink()  # an interrupted export has no manifest: not a model yet
    with pytest.raises(Retrained):
        tiny_target.ensure_tiny_target(tmp_path, config)


def test_a_killed_build_resumes_from_its_checkpoint_to_the_same_model(built, monkeypatch, tmp_path):
    """The trainer's checkpoints make the build resumable: killed after step 10's checkpoint, the next call trains
    steps 11-20 only and exports the bytes an uninterrupted build exported."""
    _, config, path = built
    shutil.copytree(path.parent / "data", tmp_path / "data")  # the corpus is built already; the model is not

    class Killed(Exception):
        pass

    save = Checkpointer.save

    def save_then_die(self, step, *args):
        save(self, step, *args)
        if step == 10:
            raise Killed

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(Killed):
        tiny_target.ensure_tiny_target(tmp_path, config, progress=False)
    assert not (tmp_path / "tiny_target").exists()
    workdir = tmp_path / ".tiny_target.training"
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["10"]
    saved = []

    def save_and_note(self, step, *args):
        save(self, step, *args)
        saved.append(step)

    monkeypatch.setattr(Checkpointer, "save", save_and_note)
    resumed = tiny_target.ensure_tiny_target(tmp_path, config, progress=False)
    assert saved == [20], "the build started again instead of resuming at step 10"

    assert (resumed / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()
    ours, theirs = (json.loads((p / "manifest.json").read_text()) for p in (resumed, path))
    assert ours["train_loss"] == theirs["train_loss"] and ours["eval_loss"] == theirs["eval_loss"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "tiny_target"], "training workdir left behind"
