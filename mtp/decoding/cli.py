"""What decode.py does: load a target and a drafter, read prompts, decode in batches, write OUT.json."""

from __future__ import annotations

import json
import logging
import pathlib
import time

import jax.numpy as jnp
import ml_collections

from mtp.checkpoint import load_target
from mtp.decoding.generate import (
    DecodeInputError,
    check_inputs,
    generate,
    generate_in_batches,
    padded_length,
    summarize,
)
from mtp.decoding.sampling import Sampling

log = logging.getLogger(__name__)
PAD_MULTIPLE = 16  # prompts are right-padded to a multiple of this, so batches share compilations


def read_jsonl(path: str | pathlib.Path) -> list[tuple[int, dict]]:
    """The objects of a JSONL file with their line numbers (blank lines skipped); a bad line names file and line."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DecodeInputError(f"prompts file {path} does not exist.")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DecodeInputError(f"{path}:{number}: not valid JSON ({e}).") from None
        if not isinstance(row, dict):
            raise DecodeInputError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}.")
        rows.append((number, row))
    return rows


def read_prompts(config: ml_collections.ConfigDict) -> list[dict]:
    """Prompt rows from ``prompts_file`` (JSONL of token_ids or text) or the single ``prompt`` text."""
    if bool(config.prompts_file) == bool(config.prompt):
        raise DecodeInputError("Give exactly one of --config.prompts_file=F (JSONL) or --config.prompt='text'.")
    if config.prompt:
        return [{"text": config.prompt}]
    path = pathlib.Path(config.prompts_file)
    rows = []
    for number, row in read_jsonl(path):
        if ("token_ids" in row) == ("text" in row):
            raise DecodeInputError(f"{path}:{number}: each line needs exactly one of 'token_ids' or 'text'.")
        if "token_ids" in row and not all(isinstance(t, int) for t in row["token_ids"]):
            raise DecodeInputError(f"{path}:{number}: 'token_ids' must be a list of integers.")
        rows.append(row)
    if not rows:
        raise DecodeInputError(f"{path} holds no prompts.")
    return rows


def tokenize_prompts(rows: list[dict], target_dir: str) -> tuple[list[list[int]], object | None]:
    """token_ids verbatim; text through the target's tokenizer and the Gemma 4 chat template."""
    tokenizer = None
    if any("text" in row for row in rows):
        from mtp.data.chat import ChatTemplate
        from mtp.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(target_dir)
        template = ChatTemplate(tokenizer)
    ids = []
    for row in rows:
        if "token_ids" in row:
            ids.append(list(row["token_ids"]))
        else:
            ids.append(template.prompt_ids([{"role": "user", "content": row["text"]}]))
    return ids, tokenizer


def run_decode(config: ml_collections.ConfigDict) -> dict:
    """Decodes every prompt and writes ``config.output``; returns the JSON document."""
    if not config.target.hf_path:
        raise DecodeInputError("Set --config.target.hf_path to a Hugging Face Gemma 4 directory.")
    if config.batch_size < 1:
        raise DecodeInputError(f"batch_size={config.batch_size}; it must be at least 1.")
    if config.draft_len and not config.drafter.hf_path:
        raise DecodeInputError(f"draft_len={config.draft_len} needs --config.drafter.hf_path (or draft_len=0).")
    rows = read_prompts(config)
    target = load_target(config.target.hf_path, dtype=jnp.dtype(config.target.dtype))
    drafter = None
    if config.draft_len:
        from mtp.drafter import load_drafter  # any family

        drafter = load_drafter(
            config.drafter.hf_path, target_config=target.config, dtype=jnp.dtype(config.target.dtype)
        )
    prompts, tokenizer = tokenize_prompts(rows, config.target.hf_path)
    kwargs = dict(
        draft_len=config.draft_len,
        max_new_tokens=config.max_new_tokens,
        stop_tokens=tuple(config.stop_tokens),
        sampling=Sampling(config.temperature, config.top_k, config.top_p),
        seed=config.seed,
        max_cache_len=config.max_cache_len or None,
        pad_multiple=PAD_MULTIPLE,
    )
    check_inputs(
        target,
        drafter,
        prompts,
        draft_len=config.draft_len,
        max_new_tokens=config.max_new_tokens,
        max_cache_len=kwargs["max_cache_len"],
    )
    batches = [prompts[i : i + config.batch_size] for i in range(0, len(prompts), config.batch_size)]
    # Compile every batch shape outside the timed pass: the last batch often has fewer rows or another length.
    shapes = {(len(b), padded_length(max(map(len, b)), PAD_MULTIPLE)): b for b in batches}
    for batch in shapes.values():
        generate(target, drafter, batch, **kwargs)
    start = time.perf_counter()
    outputs = generate_in_batches(target, drafter, prompts, batch_size=config.batch_size, **kwargs)
    wall = time.perf_counter() - start
    document = {
        "outputs": [
            {
                "token_ids": o.token_ids,
                "text": tokenizer.decode(o.token_ids) if tokenizer else "",
                "drafted_per_round": o.drafted_per_round,
                "accepted_per_round": o.accepted_per_round,
                "target_forwards": o.target_forwards,
            }
            for o in outputs
        ],
        "summary": summarize(outputs, config.draft_len, wall),
    }
    if config.output:
        pathlib.Path(config.output).write_text(json.dumps(document, indent=1))
    s = document["summary"]
    print(
        f"{len(outputs)} prompts, {s['tokens_generated']} tokens in {s['wall_seconds']:.3f}s "
        f"({s['tokens_per_second']:.1f} tok/s), draft_len={config.draft_len}, "
        f"acceptance length τ={s['acceptance_length']:.3f}, per-position acceptance "
        f"{[round(a, 3) for a in s['per_position_acceptance']]}" + (f" -> {config.output}" if config.output else "")
    )
    return document
