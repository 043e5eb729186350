"""The results.json schema: one record per (prompt set, category, draft length, temperature, batch size), and its table.

``results.json`` is ``{"target": DIR, "drafter": DIR, "records": [...]}`` (plus optional extra keys). A record:

- ``prompt_set``, ``category`` (``"all"`` for the whole set), ``draft_len``, ``temperature``, ``batch_size``
- ``num_prompts``, ``num_tokens`` (tokens the speculative run generated)
- ``acceptance_length`` τ: tokens generated after the prefill ÷ target forwards after it (the bonus token included)
- ``predicted_acceptance_length``: 1 + Σ per-position acceptance, what τ would be without stop tokens and limits
- ``per_position_acceptance``: fraction of rounds whose draft i (1-based) was accepted, i = 1 … draft_len
- ``tokens_per_second``, ``ar_tokens_per_second`` (plain decoding of the same prompts), ``speedup`` (ratio of the two)
- ``outputs_match_ar``: every prompt's output equals plain decoding's (under greedy decoding, required)
- ``wall_seconds``, ``ar_wall_seconds``, ``target_forwards``
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

from mtp.decoding.generate import summarize
from mtp.evaluation.prompts import Prompt
from mtp.evaluation.sweep import Run

ALL = "all"


class OutputMismatchError(AssertionError):
    """Greedy speculative decoding produced other tokens than plain decoding: a bug, never averaged away."""


def predicted_acceptance_length(per_position: Sequence[float]) -> float:
    return 1.0 + float(sum(per_position))


def records(
    prompt_set: str, prompts: Sequence[Prompt], runs: dict[int, Run], *, temperature: float = 0.0, batch_size: int = 1
) -> list[dict]:
    """One record per category (``"all"`` first) and draft length, from ``sweep``'s runs (key 0: plain decoding)."""
    plain = runs[0]
    categories = [ALL, *sorted({p.category for p in prompts})]
    out = []
    for category in categories:
        rows = [i for i, p in enumerate(prompts) if category in (ALL, p.category)]
        ar_tokens = sum(len(plain.outputs[i].token_ids) for i in rows)
        ar_seconds = sum(plain.seconds[i] for i in rows)
        for draft_len in sorted(k for k in runs if k):
            run = runs[draft_len]
            seconds = sum(run.seconds[i] for i in rows)
            summary = summarize([run.outputs[i] for i in rows], draft_len, seconds)
            ar_per_second = ar_tokens / ar_seconds if ar_seconds > 0 else 0.0
            out.append(
                {
                    "prompt_set": prompt_set,
                    "category": category,
                    "draft_len": draft_len,
                    "temperature": temperature,
                    "batch_size": batch_size,
                    "num_prompts": len(rows),
                    "num_tokens": summary["tokens_generated"],
                    "acceptance_length": summary["acceptance_length"],
                    "predicted_acceptance_length": predicted_acceptance_length(summary["per_position_acceptance"]),
                    "per_position_acceptance": summary["per_position_acceptance"],
                    "tokens_per_second": summary["tokens_per_second"],
                    "ar_tokens_per_second": ar_per_second,
                    "speedup": summary["tokens_per_second"] / ar_per_second if ar_per_second else 0.0,
                    "outputs_match_ar": all(run.outputs[i].token_ids == plain.outputs[i].token_ids for i in rows),
                    "wall_seconds": seconds,
                    "ar_wall_seconds": ar_seconds,
                    "target_forwards": summary["target_forwards"],
                }
            )
    return out


def check_greedy_outputs(records_: Sequence[dict]) -> None:
    """Raises if a greedy record's outputs differ from plain decoding's."""
    bad = [r for r in records_ if r["temperature"] == 0 and not r["outputs_match_ar"] and r["category"] == ALL]
    if bad:
        raise OutputMismatchError(
            "greedy speculative output differs from plain greedy output at draft lengths "
            f"{[r['draft_len'] for r in bad]} ({bad[0]['prompt_set']}): please report this bug."
        )


def write(
    path: str | pathlib.Path,
    *,
    target: str | pathlib.Path,
    drafter: str | pathlib.Path,
    records_: Sequence[dict],
    **extra,
) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "target": str(pathlib.Path(target).resolve()),
        "drafter": str(pathlib.Path(drafter).resolve()),
        "records": list(records_),
        **extra,
    }
    path.write_text(json.dumps(body, indent=1) + "\n")
    return path


def table(records_: Sequence[dict]) -> str:
    """A Markdown table: one line per category and draft length."""
    lines = [
        "| prompts | k | τ | per-position acceptance | plain tok/s | speculative tok/s | speedup | identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records_:
        per_position = " / ".join(f"{a:.2f}" for a in r["per_position_acceptance"])
        lines.append(
            f"| {r['category']} ({r['num_prompts']}, {r['num_tokens']} tok) | {r['draft_len']} | "
            f"{r['acceptance_length']:.2f} | {per_position} | {r['ar_tokens_per_second']:.0f} | "
            f"{r['tokens_per_second']:.0f} | {r['speedup']:.2f}x | {'yes' if r['outputs_match_ar'] else 'NO'} |"
        )
    return "\n".join(lines)
