"""train.py end to end on the embedded tiny default: it learns, resumes exactly, survives bad checkpoints."""

import json
import logging
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from mtp.training import step as step_lib
from mtp.training import trainer
from mtp.training.checkpoints import WorkdirError
from tests import hf_oracle

pytestmark = pytest.mark.slow


def tiny_config(**changes):
    from configs import tiny

    config = tiny.get_config("test")
    for key, value in changes.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def logged(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, embedded_cache):
    """One uninterrupted 12-step run: the reference for the other tests."""
    workdir = tmp_path_factory.mktemp("run")
    trainer.train(tiny_config(), workdir)
    return workdir


def test_a_tiny_run_learns_and_exports(finished_run):
    records = logged(finished_run)
    assert [r["step"] for r in records] == list(range(2, 13, 2))
    first, last = records[0], records[-1]
    for key in ("loss", "top1_agreement", "simulated_acceptance_length", "tokens_per_second", "learning_rate",
                "grad_norm"):  # fmt: skip
        assert key in first, key
    assert len(first["top1_agreement"]) == 3
    assert last["loss"] < first["loss"]
    assert last["top1_agreement"][0] > first["top1_agreement"][0]
    assert "eval_loss" in records[-1]
    assert (finished_run / "hf" / "config.json").is_file()
    assert json.loads((finished_run / "hf" / "generation_config.json").read_text())["num_assistant_tokens"] >= 1


def test_the_export_drives_transformers_assisted_generation(finished_run, embedded_cache):
    from mtp.training.setup import cache_root

    target = hf_oracle.load_target(cache_root() / "tiny_target")
    assistant = hf_oracle.load_assistant(finished_run / "hf")
    ids = np.array([[2, 105, 300, 301, 302, 106, 105]])
    expected = hf_oracle.reference_greedy(target, ids, 12)
    np.testing.assert_array_equal(hf_oracle.reference_assisted_greedy(target, assistant, ids, 12), expected)


def test_a_killed_run_resumes_and_reproduces_the_losses(finished_run, tmp_path, monkeypatch):
    workdir = tmp_path / "killed"
    real = trainer.MetricsWriter.advance
    calls = {"n": 0}

    def crash_after_seven(self, steps=1):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt("simulated kill after step 7 (last checkpoint: step 4)")
        real(self, steps)

    monkeypatch.setattr(trainer.MetricsWriter, "advance", crash_after_seven)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(tiny_config(), workdir)
    monkeypatch.setattr(trainer.MetricsWriter, "advance", real)
    trainer.train(tiny_config(), workdir)  # the same command again
    resumed, reference = logged(workdir), logged(finished_run)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]  # bit-exact: same data order and state


def test_a_corrupt_latest_checkpoint_falls_back_with_a_warning(finished_run, tmp_path, caplog):
    workdir = tmp_path / "corrupt"
    shutil.copytree(finished_run, workdir)
    latest = workdir / "checkpoints" / "12"
    for path in latest.rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "state" in str(path):
            path.write_bytes(b"\0" * 7)
    caplog.set_level(logging.WARNING)
    trainer.train(tiny_config(num_train_steps=14), workdir)
    assert any("step 12 could not be restored" in r.getMessage() for r in caplog.records)
    records = logged(workdir)
    assert records[-1]["step"] == 14
    reference = {r["step"]: r["loss"] for r in logged(finished_run)}
    assert {r["step"]: r["loss"] for r in records if r["step"] <= 8} == {s: v for s, v in reference.items() if s <= 8}


def test_a_nan_loss_stops_the_run_and_keeps_the_good_checkpoint(finished_run, tmp_path, monkeypatch):
    workdir = tmp_path / "nan"
    shutil.copytree(finished_run, workdir)
    real = step_lib.distill_loss

    def nan_loss(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * jnp.nan, metrics

    monkeypatch.setattr(step_lib, "distill_loss", nan_loss)
    with pytest.raises(trainer.NonFiniteLossError, match=r"at step 13.*last good checkpoint is step 12"):
        trainer.train(tiny_config(num_train_steps=16), workdir)
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[-1] == 12


def test_a_workdir_of_another_experiment_is_refused(finished_run, tmp_path):
    workdir = tmp_path / "other"
    shutil.copytree(finished_run, workdir)
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    with pytest.raises(WorkdirError, match=r"drafter\.hidden_size"):
        trainer.train(tiny_config(**{"drafter.hidden_size": 32}), workdir)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
