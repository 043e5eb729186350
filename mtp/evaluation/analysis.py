"""What ``notebooks/analysis.ipynb`` shows: training curves and evaluation comparisons of one or more workdirs."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence

from matplotlib.figure import Figure

from mtp.evaluation.prompts import ALL


@dataclasses.dataclass
class RunData:
    """One workdir's ``metrics.jsonl`` lines and ``eval/results.json`` (None where it has not been evaluated)."""

    name: str
    workdir: pathlib.Path
    metrics: list[dict]
    results: dict | None


def load_run(workdir: str | pathlib.Path, name: str | None = None) -> RunData:
    workdir = pathlib.Path(workdir).expanduser()
    lines = (workdir / "metrics.jsonl").read_text().splitlines() if (workdir / "metrics.jsonl").is_file() else []
    path = workdir / "eval" / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else None
    return RunData(name or workdir.name, workdir, [json.loads(line) for line in lines if line.strip()], results)


def _series(run: RunData, key: str) -> tuple[list[int], list]:
    rows = [m for m in run.metrics if key in m]
    return [m["step"] for m in rows], [m[key] for m in rows]


def training_curves(runs: Sequence[RunData]) -> Figure:
    """Loss, simulated τ (train and held-out) and held-out top-1 agreement per depth against step."""
    figure = Figure(figsize=(13, 3.6), layout="constrained")
    loss_ax, tau_ax, agree_ax = figure.subplots(1, 3)
    for run in runs:
        (line,) = loss_ax.plot(*_series(run, "loss"), label=f"{run.name} train")
        color = line.get_color()
        loss_ax.plot(*_series(run, "eval_loss"), "o--", color=color, label=f"{run.name} held-out")
        tau_ax.plot(*_series(run, "simulated_acceptance_length"), color=color, label=f"{run.name} train")
        tau_ax.plot(*_series(run, "eval_simulated_acceptance_length"), "o--", color=color, label=f"{run.name} held-out")
        steps, agreement = _series(run, "eval_top1_agreement")
        for depth in range(len(agreement[0]) if agreement else 0):
            alpha = 1.0 - 0.6 * depth / max(len(agreement[0]) - 1, 1)
            label = f"{run.name} depth {depth + 1}"
            agree_ax.plot(steps, [a[depth] for a in agreement], "o-", color=color, alpha=alpha, label=label)
    loss_ax.set(xlabel="step", ylabel="distillation loss", yscale="log", title="loss")
    tau_ax.set(xlabel="step", ylabel="1 + Σ Π agreement", title="simulated τ")
    agree_ax.set(xlabel="step", ylabel="top-1 agreement", title="held-out agreement per depth", ylim=(0, 1))
    for ax in (loss_ax, tau_ax, agree_ax):
        ax.legend(fontsize="x-small")
    return figure


def overall_records(run: RunData, **where) -> list[dict]:
    """A run's ``"all"`` records matching ``where`` (e.g. ``temperature=0.0, batch_size=1``), by draft length."""
    records = run.results["records"] if run.results else []
    keep = [r for r in records if r["category"] == ALL and all(r.get(k) == v for k, v in where.items())]
    return sorted(keep, key=lambda r: (r["prompt_set"], r["temperature"], r["batch_size"], r["draft_len"]))


def comparison(runs: Sequence[RunData], **where) -> Figure:
    """τ and speedup against draft length, one line per (run, prompt set, temperature, batch size)."""
    figure = Figure(figsize=(10, 3.8), layout="constrained")
    tau_ax, speed_ax = figure.subplots(1, 2)
    for run in runs:
        records = overall_records(run, **where)
        points = sorted({(r["prompt_set"], r["temperature"], r["batch_size"]) for r in records})
        for prompt_set, temperature, batch_size in points:
            rows = [
                r
                for r in records
                if (r["prompt_set"], r["temperature"], r["batch_size"]) == (prompt_set, temperature, batch_size)
            ]
            label = f"{run.name}: {prompt_set} T={temperature:g} B={batch_size}"
            ks = [r["draft_len"] for r in rows]
            tau_ax.plot(ks, [r["acceptance_length"] for r in rows], marker="o", label=label)
            speed_ax.plot(ks, [r["speedup"] for r in rows], marker="o", label=label)
    speed_ax.axhline(1.0, color="grey", lw=0.8)
    tau_ax.set(xlabel="draft length k", ylabel="τ", title="acceptance length")
    speed_ax.set(xlabel="draft length k", ylabel="speedup over plain decoding", title="speedup")
    for ax in (tau_ax, speed_ax):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize="x-small")
    return figure
