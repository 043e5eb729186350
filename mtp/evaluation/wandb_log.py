"""The evaluation's tables and plots in Weights & Biases: one ``eval`` run in the training run's group."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import ml_collections

from mtp.evaluation.prompts import ALL
from mtp.evaluation.results import KEY

COLUMNS = (
    *KEY,
    "num_prompts",
    "num_tokens",
    "acceptance_length",
    "predicted_acceptance_length",
    "per_position_acceptance",
    "tokens_per_second",
    "ar_tokens_per_second",
    "speedup",
    "outputs_match_ar",
)


def _row(record: dict) -> list:
    """A table row; the per-position list as JSON text (W&B table cells hold scalars)."""
    return [json.dumps(record.get(c)) if isinstance(record.get(c), list) else record.get(c) for c in COLUMNS]


def run_group(config: ml_collections.ConfigDict, workdir: pathlib.Path | None, output_dir: pathlib.Path) -> str:
    """The training run's W&B group (``wandb.group``, else the workdir's name, as ``MetricsWriter`` uses)."""
    return config.wandb.group or (workdir or output_dir).name


def log_results(
    config: ml_collections.ConfigDict,
    *,
    group: str,
    directory: pathlib.Path,
    records: Sequence[dict],
    plots: Sequence[pathlib.Path],
) -> str | None:
    """Logs the records as a table, the best draft lengths and the PNGs; returns the run's directory (or None when
    ``wandb.mode`` is ``disabled``). Offline unless a project is named, as for training."""
    w = config.wandb
    if w.mode == "disabled":
        return None
    import wandb

    mode = "online" if w.project and w.mode == "offline" else w.mode
    run = wandb.init(
        project=w.project or "mtp",
        group=group,
        name=f"{w.name or group}-eval",
        job_type="eval",
        tags=[*w.tags, "eval"],
        config=json.loads(json.dumps(config.eval.to_dict(), default=list)),
        dir=str(directory),
        mode=mode,
    )
    best = {}
    for r in records:
        point = (r["prompt_set"], r["temperature"], r["batch_size"], r.get("max_new_tokens"))
        if r["category"] == ALL and r["speedup"] > best.get(point, {"speedup": -1})["speedup"]:
            best[point] = r
    run.log(
        {
            "eval/records": wandb.Table(columns=list(COLUMNS), data=[_row(r) for r in records]),
            "eval/best_draft_len": wandb.Table(columns=list(COLUMNS), data=[_row(r) for r in best.values()]),
            **{f"eval/{path.stem}": wandb.Image(str(path)) for path in plots},
        }
    )
    for r in best.values():
        name = f"{r['prompt_set']}/T={r['temperature']:g}/B={r['batch_size']}"
        run.summary[f"{name}/best_draft_len"] = r["draft_len"]
        run.summary[f"{name}/speedup"] = r["speedup"]
        run.summary[f"{name}/acceptance_length"] = r["acceptance_length"]
    directory_of_run = run.dir
    run.finish()
    return directory_of_run
