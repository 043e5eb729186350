"""Metrics to ``workdir/metrics.jsonl``, to Weights & Biases (offline unless a project is named) and a progress bar.

A local metrics.jsonl is appended to; a remote one (``gs://...``: object stores cannot append) is rewritten whole at
each logged step, and W&B keeps its files in a local directory."""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import tempfile

import jax
import ml_collections
import numpy as np
import tqdm
from etils import epath


def to_python(metrics: dict) -> dict:
    """Device arrays to JSON-able floats and lists."""
    out = {}
    for key, value in jax.device_get(metrics).items():
        value = np.asarray(value)
        out[key] = value.tolist() if value.ndim else float(value)
    return out


def mean_metrics(history: list[dict]) -> dict:
    """Means over steps or held-out batches, each weighted by its trained tokens: a batch padded with empty rows
    (small held-out sets) adds its real tokens, not a batch of zero agreement. ``trained_tokens`` stays the plain
    mean per step."""
    values = {key: np.stack([np.asarray(h[key], np.float64) for h in history]) for key in history[0]}
    weights = values.get("trained_tokens")
    if weights is None or not np.sum(weights) > 0:
        weights = np.ones(len(history))
    out = {key: np.average(value, axis=0, weights=weights) for key, value in values.items()}
    if "trained_tokens" in values:
        out["trained_tokens"] = np.mean(values["trained_tokens"])
    return out


class MetricsWriter:
    """One JSON object per logged step; the same numbers go to W&B and the progress bar."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        config: ml_collections.ConfigDict,
        *,
        start_step: int,
        total: int,
        is_main: bool = True,
        progress: bool = True,
        name: str = "train",
    ):
        workdir = epath.Path(workdir)
        self.path = workdir / "metrics.jsonl"
        self.is_main = is_main
        self.remote = is_remote(workdir)
        self.lines: list[str] = []  # a remote file's contents, rewritten whole at each write
        self.run = None
        if is_main and config.wandb.mode != "disabled":
            self.run = _init_wandb(workdir, config)
        self.bar = tqdm.tqdm(
            total=total, initial=start_step, disable=not (is_main and progress), desc=name, dynamic_ncols=True
        )
        if is_main:
            self._truncate_after(start_step)

    def _truncate_after(self, step: int) -> None:
        """Drops lines logged after the checkpoint the run starts from (all, without one): they will be logged again."""
        if self.path.exists():
            lines = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in lines))
            self.lines = lines

    def write(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        line = json.dumps({"step": step, **metrics})
        if self.remote:
            self.lines.append(line)
            self.path.write_text("".join(ln + "\n" for ln in self.lines))
        else:
            with self.path.open("a") as f:
                f.write(line + "\n")
        if self.run is not None:
            self.run.log(_for_wandb(metrics), step=step)
        shown = {"loss": "loss", "simulated_acceptance_length": "tau"}
        if postfix := {short: f"{metrics[key]:.4g}" for key, short in shown.items() if key in metrics}:
            self.bar.set_postfix(postfix)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def close(self) -> None:
        self.bar.close()
        if self.run is not None:
            self.run.finish()


def is_remote(path: str | os.PathLike) -> bool:
    """A path on an object store (``gs://``, ``s3://``...), where files are written whole and cannot be appended to."""
    return "://" in os.fspath(path)


def _for_wandb(metrics: dict) -> dict:
    """Lists (one value per draft depth) become one scalar per depth, so W&B can chart them."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, list):
            flat |= {f"{key}/depth_{i}": v for i, v in enumerate(value)}
        else:
            flat[key] = value
    return flat


def _init_wandb(workdir: epath.Path, config: ml_collections.ConfigDict):
    import wandb

    id_file = workdir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
    id_file.write_text(run_id)
    w = config.wandb
    return wandb.init(
        project=w.project or "mtp",
        group=w.group or workdir.name,  # eval.py logs its run to the same group
        name=w.name or workdir.name,
        tags=list(w.tags),
        config=config.to_dict(),
        dir=wandb_dir(workdir, run_id),
        mode=w.mode,
        id=run_id,
        resume="allow",
    )


def wandb_dir(workdir: epath.Path, run_id: str) -> str:
    """Where W&B keeps its files: the workdir when it is local; W&B writes only local files, so for a remote one
    a local directory named after the run."""
    if not is_remote(workdir):
        return os.fspath(workdir)
    directory = pathlib.Path(tempfile.gettempdir()) / "mtp_wandb" / run_id
    directory.mkdir(parents=True, exist_ok=True)
    return str(directory)
