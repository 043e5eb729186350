"""train.py end to end on the embedded tiny default: it logs, resumes exactly, survives bad checkpoints."""

import json
import logging
import pathlib
import shutil
import threading

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

# Every read of a device value on the host goes through this property (jax.transfer_guard does not fire on CPU).
from jax._src.array import ArrayImpl

from mtp.checkpoint import load_target
from mtp.checkpoint.hf_drafter import load_drafter
from mtp.training import objectives, setup, trainer
from mtp.training.checkpoints import WorkdirError, check_workdir
from mtp.training.config import loss_config
from mtp.training.loss import distill_loss, frozen_target
from mtp.training.metrics import mean_metrics
from tests import hf_oracle

# 12 steps; logs every 2, evaluates every 3 (and at the end), checkpoints every 4.
CADENCE = {"log_every_steps": 2, "eval_every_steps": 3}

pytestmark = pytest.mark.slow


def tiny_config(**changes):
    from configs import tiny

    config = tiny.get_config("test")
    for key, value in (CADENCE | changes).items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def logged(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, embedded_cache):
    """One uninterrupted run, and the steps after which its host read a device value."""
    workdir = tmp_path_factory.mktemp("run")
    reads, done = set(), [0]
    real_value, real_advance = ArrayImpl._value, trainer.MetricsWriter.advance

    def value(self):
        if threading.current_thread() is threading.main_thread():  # not orbax writing a checkpoint in the background
            reads.add(done[0])
        return real_value.fget(self)

    def advance(self, steps=1):
        done[0] += steps
        real_advance(self, steps)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ArrayImpl, "_value", property(value))
        patch.setattr(trainer.MetricsWriter, "advance", advance)
        trainer.train(tiny_config(), workdir)
    return workdir, reads


@pytest.fixture(scope="module")
def finished_run(reference):
    """The reference run's workdir."""
    return reference[0]


def test_a_tiny_run_logs_evaluates_and_exports(finished_run):
    records = logged(finished_run)
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6, 9, 12]
    assert [r["step"] for r in records] == [2, 3, 4, 6, 8, 9, 10, 12], "one line per step"
    first = records[0]
    for key in (
        "loss",
        "top1_agreement",
        "simulated_acceptance_length",
        "tokens_per_second",
        "learning_rate",
        "grad_norm",
    ):
        assert key in first, key
    assert len(first["top1_agreement"]) == tiny_config().loss.depth
    assert "finite" not in first, "the non-finite check is the trainer's, not a metric"
    assert (finished_run / "hf" / "config.json").is_file()
    assert json.loads((finished_run / "hf" / "generation_config.json").read_text())["num_assistant_tokens"] >= 1


def test_two_steps_per_call_train_the_same_steps(finished_run, tmp_path):
    """``steps_per_call=2``: one compiled call (a scan) per two steps logs what one call per step logged."""
    workdir = tmp_path / "two_per_call"
    trainer.train(tiny_config(steps_per_call=2, eval_every_steps=6), workdir)
    want = {r["step"]: r for r in logged(finished_run) if "loss" in r}
    got = {r["step"]: r for r in logged(workdir) if "loss" in r}
    assert sorted(got) == sorted(want) == [2, 4, 6, 8, 10, 12]
    for step, record in want.items():
        for key in ("loss", "top1_agreement", "grad_norm", "learning_rate", "trained_tokens"):
            np.testing.assert_allclose(got[step][key], record[key], rtol=1e-5, err_msg=f"{key} at step {step}")


def test_the_host_reads_device_values_only_to_log_evaluate_or_save(reference):
    """Between those steps the host only dispatches: it never waits for the device (steps 1, 5, 7 and 11)."""
    _, reads = reference
    assert reads <= {0, 2, 3, 4, 6, 8, 9, 10, 12}, sorted(reads)


def test_the_last_eval_metrics_are_those_of_the_exported_drafter(finished_run):
    """The logged eval metrics, recomputed from the exported checkpoint on the same held-out batches."""
    config = tiny_config()
    target_dir = setup.target_directory(config, finished_run)
    target = load_target(target_dir)
    drafter = load_drafter(finished_run / "hf", target_config=target.config, max_draft_len=config.drafter.max_draft_len)
    template = setup.chat_template(config, target_dir)
    batches = setup.eval_batches(config, setup.data_rows(config, finished_run, target, template)[1], template)

    @nnx.jit
    def evaluate(drafter, target, batch):
        return distill_loss(drafter, target, frozen_target(target, batch, jnp.float32), batch, loss_config(config))

    results = [evaluate(drafter, target, {k: jnp.asarray(v) for k, v in b.items()}) for b in batches]
    last = logged(finished_run)[-1]
    # Batches weighted by their trained tokens, as the trainer averages them.
    weighted = [
        {"loss": loss, **m, "trained_tokens": b["loss_mask"].sum()}
        for (loss, m), b in zip(results, batches, strict=True)
    ]
    expected = mean_metrics(weighted)
    np.testing.assert_allclose(last["eval_loss"], expected["loss"], rtol=1e-5)
    np.testing.assert_allclose(last["eval_top1_agreement"], expected["top1_agreement"], rtol=1e-5)


def test_the_export_drives_transformers_assisted_generation(finished_run, embedded_cache):
    from mtp.training.setup import cache_root

    target = hf_oracle.load_target(cache_root() / "tiny_target_test")
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
    # Bit-exact, train and eval metrics alike: the same data order and state.
    assert comparable(logged(workdir)) == comparable(logged(finished_run))


def test_a_corrupt_latest_checkpoint_falls_back_with_a_warning(finished_run, tmp_path, caplog):
    workdir = tmp_path / "corrupt"
    shutil.copytree(finished_run, workdir)
    latest = workdir / "checkpoints" / "12"
    for path in latest.rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "state" in str(path):
            path.write_bytes(b"\0" * 7)
    caplog.set_level(logging.WARNING)
    trainer.train(tiny_config(num_train_steps=14), workdir)
    warnings = [r.getMessage() for r in caplog.records if "could not be restored" in r.getMessage()]
    assert any("checkpoints/12" in w for w in warnings), warnings
    records = logged(workdir)
    assert records[-1]["step"] == 14
    assert comparable([r for r in records if r["step"] <= 8]) == comparable(
        [r for r in logged(finished_run) if r["step"] <= 8]
    )


def test_a_nan_loss_stops_the_run_before_it_saves(finished_run, tmp_path, monkeypatch):
    workdir = tmp_path / "nan"
    shutil.copytree(finished_run, workdir)
    real = objectives.distill_loss

    def nan_loss(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * jnp.nan, metrics

    monkeypatch.setattr(objectives, "distill_loss", nan_loss)
    # Resumed at 12: steps 13 and 14 are NaN, and the host first looks at 14, to save a checkpoint.
    cadence = dict(num_train_steps=20, log_every_steps=5, eval_every_steps=5, checkpoint_every_steps=2)
    with pytest.raises(trainer.NonFiniteLossError, match=r"at step 13;.*last good checkpoint is step 12"):
        trainer.train(tiny_config(**cadence), workdir)
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[-1] == 12


def test_a_changed_worker_count_is_refused_where_checkpoints_hold_the_data_state(finished_run, tmp_path):
    workdir = tmp_path / "workers"
    shutil.copytree(finished_run, workdir)
    saved = (workdir / "config.json").read_text()
    with pytest.raises(
        WorkdirError,
        match=r"saved with data\.num_workers=0, .* resumed with data\.num_workers=2: "
        r"rerun with --config\.data\.num_workers=0",
    ):
        trainer.train(tiny_config(**{"data.num_workers": 2}), workdir)
    assert (workdir / "config.json").read_text() == saved
    fresh = tmp_path / "fresh"  # no checkpoint yet: nothing to resume, so the worker count may change
    check_workdir(fresh, tiny_config())
    check_workdir(fresh, tiny_config(**{"data.num_workers": 2}))


def test_a_workdir_of_another_experiment_is_refused(finished_run, tmp_path):
    workdir = tmp_path / "other"
    shutil.copytree(finished_run, workdir)
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    with pytest.raises(WorkdirError, match=r"drafter\.hidden_size"):
        trainer.train(tiny_config(**{"drafter.hidden_size": 16}), workdir)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
