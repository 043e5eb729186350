"""``config.eval``: what ``eval.py`` (and the main job at its end) decodes, and how it sweeps.

Every training config has this section (``base_config``); override it from the command line, e.g.
``--config.eval.draft_lens='(1,2,4)' --config.eval.temperatures='(0.0,0.7)' --config.eval.batch_sizes='(1,4)'``.
A single value is a one-point sweep (``--config.eval.max_new_tokens=128``).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from mtp.errors import UserError


class EvalConfigError(UserError):
    """A ``config.eval`` value that cannot run."""


def eval_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "after_training": False,  # the main job (train.py) evaluates when it has trained
            "drafter_path": "",  # a gemma4_assistant directory; default WORKDIR/hf
            "target_path": "",  # a Gemma 4 directory; default the config's target
            "prompts_file": "",  # Spec-Bench question.jsonl, or JSONL of {"text"} / {"token_ids"}; default held-out
            "categories": "",  # comma-separated: only these categories of the prompt set
            "num_prompts": 64,  # of the default held-out set (a prompts file is used whole)
            "draft_lens": (1, 2, 3, 4),
            "temperatures": (0.0,),
            "batch_sizes": (1,),
            "max_new_tokens": (96,),
            "repeats": 1,  # timed decodes per batch and mode (the median counts), interleaved across modes
            # Prefill in chunks of this many tokens (0: one pass). A sweep pads every prompt to the longest one's
            # length (one compilation); chunks make each prompt cost its own length. Small chunks suit CPUs.
            "prefill_chunk": 0,
            "output_dir": "",  # default WORKDIR/eval
            "offline": True,  # also the held-out top-1 agreement of a training run's drafter
        }
    )


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """The validated sweep axes: every (max_new_tokens, batch size, temperature) is one point over all draft lengths."""

    draft_lens: tuple[int, ...]
    temperatures: tuple[float, ...]
    batch_sizes: tuple[int, ...]
    max_new_tokens: tuple[int, ...]
    repeats: int = 1
    prefill_chunk: int | None = None  # None: one pass

    def points(self) -> list[tuple[int, int, float]]:
        return [(n, b, t) for n in self.max_new_tokens for b in self.batch_sizes for t in self.temperatures]


def _tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _unique(values: tuple) -> tuple:
    return tuple(dict.fromkeys(values))  # order kept, duplicates dropped


def sweep_settings(ev: ml_collections.ConfigDict) -> SweepSettings:
    """``config.eval``'s axes, checked before anything is loaded."""
    draft_lens = tuple(int(k) for k in _tuple(ev.draft_lens))
    temperatures = tuple(float(t) for t in _tuple(ev.temperatures))
    batch_sizes = tuple(int(b) for b in _tuple(ev.batch_sizes))
    max_new_tokens = tuple(int(n) for n in _tuple(ev.max_new_tokens))
    for name, values, low in [("draft_lens", draft_lens, 1), ("batch_sizes", batch_sizes, 1)]:
        if not values or min(values) < low:
            raise EvalConfigError(f"eval.{name}={values}: give one or more values, each at least {low}.")
    if not max_new_tokens or min(max_new_tokens) < 1:
        raise EvalConfigError(f"eval.max_new_tokens={max_new_tokens}: give one or more values, each at least 1.")
    if not temperatures or min(temperatures) < 0:
        raise EvalConfigError(f"eval.temperatures={temperatures}: give one or more values >= 0 (0 is greedy).")
    if int(ev.repeats) < 1:
        raise EvalConfigError(f"eval.repeats={ev.repeats}: it must be at least 1.")
    if int(ev.prefill_chunk) < 0:
        raise EvalConfigError(f"eval.prefill_chunk={ev.prefill_chunk}: give a token count, or 0 for one pass.")
    return SweepSettings(
        tuple(sorted(set(draft_lens))),
        _unique(temperatures),
        _unique(batch_sizes),
        _unique(max_new_tokens),
        int(ev.repeats),
        int(ev.prefill_chunk) or None,
    )


def check_draft_lens(settings: SweepSettings, max_draft_len: int, drafter_dir: object) -> None:
    """A draft length above the drafter's maximum is refused before any decoding."""
    too_long = [k for k in settings.draft_lens if k > max_draft_len]
    if too_long:
        raise EvalConfigError(
            f"eval.draft_lens has {too_long}, above the drafter's max_draft_len={max_draft_len} ({drafter_dir}); "
            f"use draft lengths 1..{max_draft_len} (or raise --config.drafter.max_draft_len)."
        )
