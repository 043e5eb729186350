"""``compare(config, workdir)``: train and evaluate every drafter family of ``config.compare`` alike, one table.

    python -m mtp.training.compare --config configs/compare_tiny.py --workdir /tmp/mtp_compare

Each family trains in ``WORKDIR/FAMILY`` with the same data, steps, batch and sequence length (``mtp.training.run``:
resumable, evaluated at its end by ``mtp.training.evaluate``); then ``WORKDIR/compare.json`` and ``compare.md``
hold parameters, train tokens/s, τ, per-position acceptance and speedup per draft length and temperature, and the
best draft length.
"""

from __future__ import annotations

import copy
import json
import pathlib
import statistics
import time

import jax
import ml_collections
from flax import nnx

from mtp.drafter import load_drafter


def family_config(config: ml_collections.ConfigDict, family: str) -> ml_collections.ConfigDict:
    """``config`` with the drafter of ``family`` in the shape ``config.compare`` gives it."""
    out = copy.deepcopy(config)
    out.drafter.update(family=family, **config.compare[family].to_dict())
    return out


def train_tokens_per_second(workdir: pathlib.Path) -> float:
    """Median training throughput over the logged windows after the first (which includes compilation)."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    rates = [r["tokens_per_second"] for r in map(json.loads, lines) if "tokens_per_second" in r]
    return statistics.median(rates[1:] or rates)


def summary(family: str, workdir: pathlib.Path, seconds: float) -> dict:
    drafter = load_drafter(workdir / "hf")
    records = json.loads((workdir / "eval" / "results.json").read_text())["records"]
    runs = {}
    for r in (r for r in records if r["category"] == "all"):
        runs.setdefault(str(r["temperature"]), []).append(
            {k: r[k] for k in ("draft_len", "acceptance_length", "per_position_acceptance", "speedup")}
        )
    best = {t: max(rows, key=lambda r: r["speedup"]) for t, rows in runs.items()}
    return {
        "family": family,
        "parameters": sum(x.size for x in jax.tree.leaves(nnx.state(drafter, nnx.Param))),
        "train_tokens_per_second": train_tokens_per_second(workdir),
        "seconds": seconds,
        "runs": runs,
        "best": {t: r["draft_len"] for t, r in best.items()},
    }


def table(rows: list[dict]) -> str:
    """The summary (best k per temperature) and every (family, temperature, k) row, as Markdown."""
    temps = sorted({t for r in rows for t in r["runs"]}, key=float)
    head = "| family | params | train tok/s | " + " | ".join(f"T={t}: best k, τ, speedup" for t in temps) + " |"
    lines = [head, "|" + "---|" * (3 + len(temps))]
    for r in rows:
        cells = []
        for t in temps:
            b = next(x for x in r["runs"][t] if x["draft_len"] == r["best"][t])
            cells.append(f"{b['draft_len']}, {b['acceptance_length']:.2f}, {b['speedup']:.2f}×")
        size, speed = f"{r['parameters'] / 1e6:.2f}M", f"{r['train_tokens_per_second']:,.0f}"
        lines.append(f"| {r['family']} | {size} | {speed} | {' | '.join(cells)} |")
    lines += ["", "| family | T | k | τ | per-position acceptance | speedup |", "|---|---|---|---|---|---|"]
    for r in rows:
        for t in temps:
            for x in r["runs"][t]:
                accept = " / ".join(f"{a:.2f}" for a in x["per_position_acceptance"])
                lines.append(
                    f"| {r['family']} | {t} | {x['draft_len']} | {x['acceptance_length']:.2f} | {accept} | "
                    f"{x['speedup']:.2f}× |"
                )
    return "\n".join(lines) + "\n"


def compare(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, progress: bool = True) -> list[dict]:
    """Trains and evaluates each family in turn (a rerun resumes each), then writes the comparison."""
    from mtp.training.run import run

    workdir = pathlib.Path(workdir)
    rows = []
    for family in config.compare.families:
        start = time.perf_counter()
        run(family_config(config, family), workdir / family, progress=progress)
        rows.append(summary(family, workdir / family, time.perf_counter() - start))
        (workdir / "compare.json").write_text(json.dumps(rows, indent=1) + "\n")
    (workdir / "compare.md").write_text(table(rows))
    print(table(rows))
    return rows


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "A comparison config (configs/compare_tiny.py).")
    _WORKDIR = flags.DEFINE_string("workdir", None, "One subdirectory per family, and the comparison table.")
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv):
        del argv
        from mtp.logs import setup_logging

        setup_logging(verbose=False)
        compare(_CONFIG.value, _WORKDIR.value)

    app.run(main)
