"""Plain and speculative decoding of one prompt set at one sweep point, alternating batch by batch so machine noise
hits every mode alike."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence

import tqdm
from flax import nnx

from mtp.data.chat import ChatTemplate
from mtp.data.tokenizer import GEMMA4_STOP_TOKENS
from mtp.decoding.generate import Decoder, Generation, padded_length
from mtp.decoding.sampling import Sampling
from mtp.evaluation.prompts import Prompt
from mtp.gemma4.model import Gemma4


@dataclasses.dataclass
class Run:
    """One decoding mode (``draft_len`` 0 is plain decoding) over a prompt set: outputs and seconds per prompt."""

    draft_len: int
    outputs: list[Generation] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)


def _rotated(modes: list[int], shift: int) -> list[int]:
    shift %= len(modes)
    return modes[shift:] + modes[:shift]


def sweep(
    target: Gemma4,
    drafter: nnx.Module | None,
    prompts: Sequence[Prompt],
    *,
    draft_lens: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    batch_size: int = 1,
    repeats: int = 1,
    prefill_chunk: int | None = None,
    stop_tokens: Sequence[int] = GEMMA4_STOP_TOKENS,
    template: ChatTemplate | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[Prompt], dict[int, Run]]:
    """Every batch is decoded plainly and at every draft length in turn (the order rotating from batch to batch),
    each call timed alone after one compiling warm-up per mode and batch shape.

    Multi-turn prompts (Spec-Bench) run turn by turn: turn t of every conversation that has one, then turn t+1 with
    plain decoding's answer appended (the same answer for every mode; under greedy decoding every mode gives it).
    Returns the decoded prompts (one per turn) and, per mode, their outputs and seconds in that order; a batch's
    seconds are split evenly over its rows. Batches hold prompts of one category where the counts allow (the prompts
    are ordered by category), and prompt i of the decoded order samples from its own stream (``first_row``), so
    its samples do not depend on the batch size.
    """
    if any(p.num_turns > 1 for p in prompts) and template is None:
        raise ValueError("multi-turn prompts need the chat template to append answers")
    modes = [0, *draft_lens]
    decoder = Decoder(target, drafter if draft_lens else None)
    sampling = Sampling(temperature)
    runs = {mode: Run(mode) for mode in modes}
    decoded: list[Prompt] = []
    answers: list[list[str]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: prompts[i].category)
    bar = tqdm.tqdm(
        total=sum(p.num_turns for p in prompts),
        desc=f"eval T={temperature:g} B={batch_size}",
        disable=not progress,
        dynamic_ncols=True,
    )
    for turn in range(max(p.num_turns for p in prompts)):
        rows = [i for i in order if turn < prompts[i].num_turns]
        ids = {i: prompts[i].turn_ids(turn, answers[i], template) for i in rows}
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            stop_tokens=tuple(stop_tokens),
            sampling=sampling,
            seed=seed,
            pad_multiple=padded_length(max(map(len, ids.values())), 64),  # one padded length: one compilation
            prefill_chunk=prefill_chunk,
        )
        batches = [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]
        for batch in {len(b): b for b in batches}.values():  # compile every batch shape outside the timing
            for mode in modes:
                decoder.generate([ids[i] for i in batch], draft_len=mode, **kwargs)
        for number, batch in enumerate(batches):
            first_row = len(decoded)
            outputs, seconds = {}, {mode: [] for mode in modes}
            for repeat in range(repeats):
                for mode in _rotated(modes, number + repeat):
                    start = time.perf_counter()
                    out, _ = decoder.generate([ids[i] for i in batch], draft_len=mode, first_row=first_row, **kwargs)
                    seconds[mode].append(time.perf_counter() - start)
                    outputs.setdefault(mode, out)
            for mode in modes:
                share = statistics.median(seconds[mode]) / len(batch)
                runs[mode].outputs += outputs[mode]
                runs[mode].seconds += [share] * len(batch)
            decoded += [Prompt(prompts[i].category, ids[i]) for i in batch]
            for i, plain in zip(batch, outputs[0], strict=True):
                if turn + 1 < prompts[i].num_turns:
                    answers[i].append(template.tokenizer.decode(plain.token_ids, skip_special_tokens=True))
            bar.update(len(batch))
            if draft_lens:
                bar.set_postfix(_progress(runs, max(draft_lens)))
    bar.close()
    return decoded, runs


def _progress(runs: dict[int, Run], k: int) -> dict:
    produced = sum(sum(o.produced_per_round) for o in runs[k].outputs)
    forwards = sum(o.target_forwards for o in runs[k].outputs)
    speedup = sum(runs[0].seconds) / max(sum(runs[k].seconds), 1e-9)
    return {f"tau@{k}": f"{produced / max(forwards, 1):.2f}", f"speedup@{k}": f"{speedup:.2f}x"}
