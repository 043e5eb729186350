"""Plain and speculative decoding of one prompt set, alternating per prompt so machine noise hits every mode alike."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import tqdm
from flax import nnx

from mtp.decoding.generate import GEMMA4_STOP_TOKENS, Generation, generate, padded_length
from mtp.evaluation.prompts import Prompt
from mtp.gemma4.model import Gemma4


@dataclasses.dataclass
class Run:
    """One decoding mode (``draft_len`` 0 is plain decoding) over a prompt set: outputs and seconds per prompt."""

    draft_len: int
    outputs: list[Generation] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)


def sweep(
    target: Gemma4,
    drafter: nnx.Module | None,
    prompts: Sequence[Prompt],
    *,
    draft_lens: Sequence[int],
    max_new_tokens: int,
    stop_tokens: Sequence[int] = GEMMA4_STOP_TOKENS,
    progress: bool = True,
) -> dict[int, Run]:
    """Greedy, batch 1: each prompt is decoded plainly and at every draft length in turn (the order rotating
    from prompt to prompt), each call timed alone after one compiling warm-up per mode.

    Every prompt is padded to one length, so each mode compiles once.
    """
    modes = [0, *draft_lens]
    pad = padded_length(max(len(p.token_ids) for p in prompts), 64)
    kwargs = dict(max_new_tokens=max_new_tokens, stop_tokens=tuple(stop_tokens), pad_multiple=pad)
    for mode in modes:  # compile
        generate(target, drafter if mode else None, [prompts[0].token_ids], draft_len=mode, **kwargs)
    runs = {mode: Run(mode) for mode in modes}
    bar = tqdm.tqdm(prompts, desc="eval", disable=not progress, dynamic_ncols=True)
    for index, prompt in enumerate(bar):
        for mode in modes[index % len(modes) :] + modes[: index % len(modes)]:
            start = time.perf_counter()
            outputs, _ = generate(
                target, drafter if mode else None, [prompt.token_ids], draft_len=mode, first_row=index, **kwargs
            )  # the prompt's own random stream when sampling
            runs[mode].seconds.append(time.perf_counter() - start)
            runs[mode].outputs.append(outputs[0])
        if draft_lens:
            k = max(draft_lens)
            produced = sum(sum(o.produced_per_round) for o in runs[k].outputs)
            forwards = sum(o.target_forwards for o in runs[k].outputs)
            speedup = sum(runs[0].seconds) / sum(runs[k].seconds)
            bar.set_postfix({f"tau@{k}": f"{produced / max(forwards, 1):.2f}", f"speedup@{k}": f"{speedup:.2f}x"})
    bar.close()
    return runs
