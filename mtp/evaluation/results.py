"""The results.json schema: one record per (prompt set, category, draft length, temperature, batch size, max new
tokens), merged by that key with the records of earlier runs, and its tables.

``results.json`` is ``{"target": DIR, "drafter": DIR, "records": [...]}`` (plus optional extra keys). A record:

- ``prompt_set``, ``category`` (``"all"`` for the whole set), ``draft_len``, ``temperature``, ``batch_size``,
  ``max_new_tokens``
- ``num_prompts`` (decoded prompts: every turn of a multi-turn conversation counts), ``num_tokens`` (tokens the
  speculative run generated)
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
from mtp.errors import UserError
from mtp.evaluation.prompts import ALL, Prompt
from mtp.evaluation.sweep import Run

KEY = ("prompt_set", "category", "draft_len", "temperature", "batch_size", "max_new_tokens")


class OutputMismatchError(AssertionError):
    """Greedy speculative decoding produced other tokens than plain decoding: a bug, never averaged away."""


def predicted_acceptance_length(per_position: Sequence[float]) -> float:
    return 1.0 + float(sum(per_position))


def records(
    prompt_set: str,
    prompts: Sequence[Prompt],
    runs: dict[int, Run],
    *,
    temperature: float = 0.0,
    batch_size: int = 1,
    max_new_tokens: int | None = None,
) -> list[dict]:
    """One record per category (``"all"`` first) and draft length, from ``sweep``'s runs (key 0: plain decoding)."""
    plain = runs[0]
    categories = [ALL, *sorted({p.category for p in prompts} - {ALL})]
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
                    "max_new_tokens": max_new_tokens,
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


class ResultsFileError(UserError):
    """results.json belongs to another target / drafter pair, or is not a results file."""


def read(path: str | pathlib.Path) -> dict | None:
    path = pathlib.Path(path)
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ResultsFileError(
            f"{path} is not valid JSON ({e}); move it away or use another output directory."
        ) from None
    if not isinstance(body, dict) or not isinstance(body.get("records"), list):
        raise ResultsFileError(f"{path} is not a results.json (no 'records' list); use another output directory.")
    return body


def check_pair(path: str | pathlib.Path, *, target: str | pathlib.Path, drafter: str | pathlib.Path) -> None:
    """Refuses (before any decoding) to merge into a results.json measured with another target or drafter."""
    body = read(path)
    if body is None:
        return
    mine = {"target": str(pathlib.Path(target).resolve()), "drafter": str(pathlib.Path(drafter).resolve())}
    differs = [k for k in mine if body.get(k) != mine[k]]
    if differs:
        raise ResultsFileError(
            f"{path} holds results of another pair ({', '.join(f'{k} {body.get(k)}' for k in differs)}); "
            "give --config.eval.output_dir=another directory."
        )


def key(record: dict) -> tuple:
    return tuple(record.get(k) for k in KEY)


def merge(old: Sequence[dict], new: Sequence[dict]) -> list[dict]:
    """Earlier records, each replaced by a new one of the same key; then the new keys, in their order."""
    fresh = {key(r): r for r in new}
    merged = [fresh.pop(key(r), r) for r in old]
    return merged + [r for r in new if key(r) in fresh]


def write(
    path: str | pathlib.Path,
    *,
    target: str | pathlib.Path,
    drafter: str | pathlib.Path,
    records_: Sequence[dict],
    **extra,
) -> pathlib.Path:
    """Merges ``records_`` (and ``extra``) into ``path`` by key; a record of the same key is replaced."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = read(path) or {}
    body = {
        **old,
        "target": str(pathlib.Path(target).resolve()),
        "drafter": str(pathlib.Path(drafter).resolve()),
        "records": merge(old.get("records", []), records_),
        **extra,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    tmp.replace(path)  # never a half-written file, even if the run is killed
    return path


def _group(record: dict) -> tuple:
    return record["prompt_set"], record["temperature"], record["batch_size"], record.get("max_new_tokens")


def best_table(records_: Sequence[dict]) -> str:
    """The draft length with the highest speedup per (prompt set, temperature, batch size, max new tokens)."""
    lines = [
        "| prompt set | T | batch | max new | best k | τ | speedup | plain tok/s | speculative tok/s | identical |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    overall = [r for r in records_ if r["category"] == ALL]
    for group in sorted({_group(r) for r in overall}, key=str):
        r = max((r for r in overall if _group(r) == group), key=lambda r: r["speedup"])
        lines.append(
            f"| {group[0]} | {group[1]:g} | {group[2]} | {group[3]} | {r['draft_len']} | "
            f"{r['acceptance_length']:.2f} | {r['speedup']:.2f}x | {r['ar_tokens_per_second']:.0f} | "
            f"{r['tokens_per_second']:.0f} | {_identical(r)} |"
        )
    return "\n".join(lines)


def _identical(record: dict) -> str:
    if record["outputs_match_ar"]:
        return "yes"
    return "NO" if record["temperature"] == 0 else "no (sampled)"


def table(records_: Sequence[dict]) -> str:
    """A Markdown table: one line per record."""
    lines = [
        "| prompt set | T | batch | prompts | k | τ | predicted τ | per-position acceptance | plain tok/s | "
        "speculative tok/s | speedup | identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records_:
        per_position = " / ".join(f"{a:.2f}" for a in r["per_position_acceptance"])
        lines.append(
            f"| {r['prompt_set']} | {r['temperature']:g} | {r['batch_size']} | "
            f"{r['category']} ({r['num_prompts']}, {r['num_tokens']} tok) | {r['draft_len']} | "
            f"{r['acceptance_length']:.2f} | {r['predicted_acceptance_length']:.2f} | {per_position} | "
            f"{r['ar_tokens_per_second']:.0f} | {r['tokens_per_second']:.0f} | {r['speedup']:.2f}x | {_identical(r)} |"
        )
    return "\n".join(lines)


def report(records_: Sequence[dict]) -> str:
    """What results.md holds: the best draft lengths, then every record."""
    return f"## Best draft length\n\n{best_table(records_)}\n\n## All records\n\n{table(records_)}\n"
