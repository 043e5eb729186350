"""A whole evaluation: every sweep point of one prompt set, written as it finishes; then the table, plots and W&B."""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Callable, Sequence

import jax.numpy as jnp
from flax import nnx

from mtp.data.chat import ChatTemplate
from mtp.evaluation import plots, results
from mtp.evaluation.config import SweepSettings, check_draft_lens
from mtp.evaluation.prompts import ALL, Prompt
from mtp.evaluation.sweep import sweep
from mtp.gemma4.model import Gemma4

log = logging.getLogger(__name__)
RESULTS, REPORT = "results.json", "results.md"


def load_drafter(
    path: str | pathlib.Path, target: Gemma4, *, max_draft_len: int, dtype: jnp.dtype | None = None
) -> nnx.Module:
    """The one place evaluation loads a drafter, of any family (gemma4_assistant or mtp's own format), checked against
    the target it drafts for."""
    from mtp.drafter import load_drafter as load_any_drafter

    return load_any_drafter(path, target_config=target.config, max_draft_len=max_draft_len, dtype=dtype)


def write_report(output_dir: pathlib.Path) -> tuple[str, list[pathlib.Path]]:
    """results.md and the PNG plots from every record in results.json (this run's and earlier ones)."""
    records = results.read(output_dir / RESULTS)["records"]
    report = results.report(records)
    (output_dir / REPORT).write_text(report)
    return report, plots.save_plots(records, output_dir)


def run_sweeps(
    target: Gemma4,
    drafter: nnx.Module,
    prompts: Sequence[Prompt],
    *,
    prompt_set: str,
    settings: SweepSettings,
    template: ChatTemplate | None,
    output_dir: pathlib.Path,
    target_dir: pathlib.Path,
    drafter_dir: pathlib.Path,
    extra: dict | None = None,
    seed: int = 0,
    progress: bool = True,
    after: Callable[[list[dict], list[pathlib.Path]], None] | None = None,
) -> list[dict]:
    """Decodes every (max_new_tokens, batch size, temperature) point at all draft lengths and merges each point's
    records into ``output_dir/results.json`` as soon as it is done, so an error later loses nothing finished.

    A greedy point whose speculative outputs differ from plain decoding's is written, then raised. At the end (also
    after an error, for what was finished) results.md and the plots are rewritten from the whole file; ``after``
    (W&B) gets the merged records and the plots when every point succeeded.
    """
    check_draft_lens(settings, drafter.config.max_draft_len, drafter_dir)
    path = output_dir / RESULTS
    finished: list[dict] = []
    stop_tokens = template.stop_tokens if template is not None else (1, 106)
    try:
        for max_new_tokens, batch_size, temperature in settings.points():
            decoded, runs = sweep(
                target,
                drafter,
                prompts,
                draft_lens=settings.draft_lens,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                batch_size=batch_size,
                repeats=settings.repeats,
                prefill_chunk=settings.prefill_chunk,
                stop_tokens=stop_tokens,
                template=template,
                seed=seed,
                progress=progress,
            )
            point = results.records(
                prompt_set,
                decoded,
                runs,
                temperature=temperature,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
            )
            results.write(path, target=target_dir, drafter=drafter_dir, records_=point, **(extra or {}))
            finished += point
            results.check_greedy_outputs(point)
    finally:
        if finished:
            _, pngs = write_report(output_dir)
    log.info(
        "%s: %d prompts, draft lengths %s\n%s\n\n%s\nwritten to %s (table: %s, plots: %s)",
        prompt_set,
        len(prompts),
        list(settings.draft_lens),
        results.best_table(finished),
        results.table([r for r in finished if r["category"] == ALL]),
        path,
        output_dir / REPORT,
        ", ".join(p.name for p in pngs),
    )
    if after is not None:
        after(results.read(path)["records"], pngs)
    return finished
