"""Matplotlib figures of results.json records: acceptance by position, τ and speedup against draft length, categories.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot state), so they render the same in a script, in a
test and inline in a notebook.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence

from matplotlib.figure import Figure

from mtp.evaluation.prompts import ALL

PLOTS = ("acceptance_by_position", "tau_and_speedup", "categories")


def _group(record: dict) -> tuple:
    return record["prompt_set"], record["temperature"], record["batch_size"], record.get("max_new_tokens")


def _label(group: tuple) -> str:
    prompt_set, temperature, batch_size, max_new_tokens = group
    return f"{prompt_set} T={temperature:g} B={batch_size}" + (f" n={max_new_tokens}" if max_new_tokens else "")


def _groups(records: Sequence[dict]) -> list[tuple]:
    return sorted({_group(r) for r in records}, key=str)


def _grid(count: int, width: float = 4.2, height: float = 3.2) -> tuple[Figure, list]:
    cols = min(count, 3)
    rows = math.ceil(count / cols)
    figure = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).ravel().tolist()
    for unused in axes[count:]:
        unused.set_visible(False)
    return figure, axes[:count]


def acceptance_by_position(records: Sequence[dict]) -> Figure:
    """Per-position acceptance (fraction of rounds whose draft i was accepted), one line per draft length."""
    overall = [r for r in records if r["category"] == ALL]
    groups = _groups(overall)
    figure, axes = _grid(max(len(groups), 1))
    for ax, group in zip(axes, groups, strict=False):
        for r in sorted((r for r in overall if _group(r) == group), key=lambda r: r["draft_len"]):
            positions = range(1, r["draft_len"] + 1)
            ax.plot(positions, r["per_position_acceptance"], marker="o", label=f"k={r['draft_len']}")
        ax.set(title=_label(group), xlabel="draft position i", ylabel="rounds accepting draft i", ylim=(0, 1.02))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize="small")
    return figure


def tau_and_speedup(records: Sequence[dict]) -> Figure:
    """τ (measured, and predicted from the per-position rates, dashed) and speedup against draft length."""
    overall = [r for r in records if r["category"] == ALL]
    figure = Figure(figsize=(10, 3.8), layout="constrained")
    tau_ax, speed_ax = figure.subplots(1, 2)
    for group in _groups(overall):
        rows = sorted((r for r in overall if _group(r) == group), key=lambda r: r["draft_len"])
        ks = [r["draft_len"] for r in rows]
        (line,) = tau_ax.plot(ks, [r["acceptance_length"] for r in rows], marker="o", label=_label(group))
        tau_ax.plot(ks, [r["predicted_acceptance_length"] for r in rows], ls="--", color=line.get_color(), alpha=0.6)
        speed_ax.plot(ks, [r["speedup"] for r in rows], marker="o", color=line.get_color(), label=_label(group))
    speed_ax.axhline(1.0, color="grey", lw=0.8)
    tau_ax.set(xlabel="draft length k", ylabel="τ (tokens per target forward)", title="acceptance length")
    speed_ax.set(xlabel="draft length k", ylabel="speculative ÷ plain tokens/s", title="speedup")
    for ax in (tau_ax, speed_ax):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize="small")
    return figure


def categories(records: Sequence[dict]) -> Figure:
    """τ and speedup against draft length per category, one pair of panels per sweep point."""
    groups = _groups(records)
    figure = Figure(figsize=(10, 3.4 * max(len(groups), 1)), layout="constrained")
    axes = figure.subplots(max(len(groups), 1), 2, squeeze=False)
    for (tau_ax, speed_ax), group in zip(axes, groups, strict=False):
        rows = [r for r in records if _group(r) == group]
        for category in sorted({r["category"] for r in rows}, key=lambda c: (c != ALL, c)):
            mine = sorted((r for r in rows if r["category"] == category), key=lambda r: r["draft_len"])
            ks = [r["draft_len"] for r in mine]
            style = dict(marker="o", label=f"{category} ({mine[0]['num_prompts']})", lw=2.5 if category == ALL else 1)
            tau_ax.plot(ks, [r["acceptance_length"] for r in mine], **style)
            speed_ax.plot(ks, [r["speedup"] for r in mine], **style)
        speed_ax.axhline(1.0, color="grey", lw=0.8)
        tau_ax.set(xlabel="draft length k", ylabel="τ", title=_label(group))
        speed_ax.set(xlabel="draft length k", ylabel="speedup", title=_label(group))
        for ax in (tau_ax, speed_ax):
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.legend(fontsize="small")
    return figure


def save_plots(records: Sequence[dict], directory: str | pathlib.Path) -> list[pathlib.Path]:
    """The three figures as PNGs in ``directory``."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, make in zip(PLOTS, (acceptance_by_position, tau_and_speedup, categories), strict=True):
        path = directory / f"{name}.png"
        make(records).savefig(path, dpi=110)
        paths.append(path)
    return paths
