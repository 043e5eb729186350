"""Workdirs on object stores (``gs://...``): metrics are rewritten whole (nothing is appended), W&B keeps its files
on the local disk, and what reads only local files says so, naming the copy to make, before it loads anything."""

import json

import ml_collections
import pytest
from etils import epath

from configs import tiny
from mtp.checkpoint import load_target
from mtp.drafter import load_drafter
from mtp.errors import UserError
from mtp.training import metrics
from mtp.training.evaluate import evaluate


def write_and_resume(workdir) -> str:
    """Logs steps 1-3, then resumes from a checkpoint at step 2 and logs steps 3-4; the file's text."""
    epath.Path(workdir).mkdir()
    config = ml_collections.ConfigDict({"wandb": {"mode": "disabled"}})
    writer = metrics.MetricsWriter(workdir, config, start_step=0, total=4)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step, "simulated_acceptance_length": 1.0})
    writer.close()
    writer = metrics.MetricsWriter(workdir, config, start_step=2, total=4)
    for step in (3, 4):
        writer.write(step, {"loss": 2.0 / step, "simulated_acceptance_length": 1.5})
    writer.close()
    return (epath.Path(workdir) / "metrics.jsonl").read_text()


def test_a_remote_workdirs_metrics_are_rewritten_not_appended(tmp_path, monkeypatch):
    local = write_and_resume(tmp_path / "local")
    records = [json.loads(line) for line in local.splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 0.5), (3, 2 / 3), (4, 0.5)]

    remote = tmp_path / "remote"  # a local directory that MetricsWriter takes for an object store
    monkeypatch.setattr(metrics, "is_remote", lambda path: True)
    path_type, real_open = type(epath.Path(remote)), type(epath.Path(remote)).open

    def open_without_append(self, mode="r", *args, **kwargs):
        assert "a" not in mode, "object stores cannot append"
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(path_type, "open", open_without_append)
    assert write_and_resume(remote) == local


def test_wandb_writes_a_remote_runs_files_to_a_local_directory(tmp_path):
    local = metrics.wandb_dir(epath.Path("gs://bucket/run"), "abc123")
    assert not metrics.is_remote(local) and epath.Path(local).is_dir() and local.endswith("abc123")
    assert metrics.wandb_dir(epath.Path(tmp_path), "abc123") == str(tmp_path)


@pytest.mark.parametrize("load", [load_target, load_drafter])
def test_loading_a_remote_checkpoint_says_to_copy_it(load):
    with pytest.raises(UserError, match=r"gs://bucket/model: .*gcloud storage cp -r gs://bucket/model"):
        load("gs://bucket/model")


def test_evaluating_a_remote_workdir_says_what_to_copy_before_loading_anything():
    with pytest.raises(UserError, match=r"gs://bucket/run/hf: .*--config.eval.drafter_path"):
        evaluate(tiny.get_config("test"), "gs://bucket/run")
    config = tiny.get_config("test")
    config.eval.update(drafter_path="/local/drafter", output_dir="gs://bucket/run/eval")
    with pytest.raises(UserError, match=r"gs://bucket/run/eval: .*local --config.eval.output_dir"):
        evaluate(config, "gs://bucket/run")
