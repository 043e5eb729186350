"""Self-distillation data: the frozen target answers the data set's prompts itself (drafters trained on the
target's own outputs accept more). Written as JSONL conversations the training pipeline reads."""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Sequence

from mtp.data.chat import ChatTemplate, prompt_messages
from mtp.decoding.generate import generate
from mtp.decoding.sampling import Sampling
from mtp.gemma4.model import Gemma4

log = logging.getLogger(__name__)


def prompts_of(rows: Sequence, max_prompts: int = 0) -> list[list[dict]]:
    """Each conversation up to (not including) its last model turn; plain-text rows have no prompt."""
    prompts = []
    for row in rows:
        if (messages := prompt_messages(row)) is None:
            continue
        prompts.append(messages)
        if max_prompts and len(prompts) == max_prompts:
            break
    return prompts


def regenerate(
    target: Gemma4,
    template: ChatTemplate,
    rows: Sequence,
    path: pathlib.Path,
    *,
    temperature: float = 0.0,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    max_prompts: int = 0,
    seed: int = 0,
) -> pathlib.Path:
    """Writes ``path`` (JSONL) once: every prompt with the target's own answer as the model turn."""
    if path.is_file():
        return path
    prompts = prompts_of(rows, max_prompts)
    if not prompts:
        raise ValueError("Self-distillation found no conversations with a model turn to regenerate.")
    stop = template.stop_tokens
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with partial.open("w") as f:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            ids = [template.prompt_ids(messages) for messages in batch]
            outputs, _ = generate(
                target,
                None,
                ids,
                max_new_tokens=max_new_tokens,
                stop_tokens=stop,
                sampling=Sampling(temperature=temperature),
                seed=seed,
                first_row=start,
            )
            for messages, output in zip(batch, outputs, strict=True):
                tokens = [t for t in output.token_ids if t not in stop]
                answer = template.tokenizer.decode(tokens, skip_special_tokens=True)
                f.write(json.dumps({"messages": [*messages, {"role": "model", "content": answer}]}) + "\n")
            log.info("self-distillation: %d / %d prompts answered", min(start + batch_size, len(prompts)), len(prompts))
    partial.rename(path)  # only a complete file is ever read as a finished data set
    return path
