"""Self-distillation data: the frozen target answers the data set's prompts itself (drafters trained on the
target's own outputs accept more). Written as JSONL rows of token ids (``prompt_ids``: the prompt exactly as the
target saw it; ``answer_ids``: what it produced, through its ``<turn|>``; ``messages``: the prompt's turns, for
people and prompt sets), which the training pipeline reads as they are: no decoding to text and re-tokenising,
which need not give the same ids back.

On a mesh the rows of each batch are split over its data-parallel devices, so every process decodes its share;
the answers are gathered and process 0 alone writes the one file, which all processes then read.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtp import sharding as sharding_lib
from mtp.data.chat import ChatTemplate, prompt_messages
from mtp.decoding.engine import StaticGraph, decode_loop, stop_token_array
from mtp.decoding.generate import padded_length
from mtp.decoding.sampling import Sampling
from mtp.gemma4.model import Gemma4
from mtp.multihost import barrier, host_value

log = logging.getLogger(__name__)


def prompts_of(rows: Sequence, max_prompts: int = 0) -> list[list[dict]]:
    """Each conversation up to (not including) its last model turn; plain-text rows have no prompt.

    ``max_prompts``: at most this many, evenly spread over the data set (in order), so a file sorted by kind, as
    the embedded corpus is, keeps every kind in proportion.
    """
    prompts = [messages for row in rows if (messages := prompt_messages(row)) is not None]
    if max_prompts and len(prompts) > max_prompts:
        prompts = [prompts[i * len(prompts) // max_prompts] for i in range(max_prompts)]
    return prompts


def answer(
    target: Gemma4,
    prompts: Sequence[Sequence[int]],
    *,
    stop_tokens: Sequence[int],
    sampling: Sampling,
    max_new_tokens: int,
    seed: int,
    first_row: int,
    mesh: Mesh | None = None,
) -> list[list[int]]:
    """The target's answer ids to one batch of prompts (through its stop token when it produced one).

    Row i samples from the stream of ``first_row + i``, as ``generate`` does. With a mesh the batch, padded with
    one-token rows to a multiple of the data-parallel size, is split over the data-parallel devices.
    """
    parallel = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in sharding_lib.LOGICAL_RULES["batch"]]))
    rows = padded_length(len(prompts), parallel)
    prompts_BL = np.full((rows, padded_length(max(map(len, prompts)), 16)), 0, np.int32)
    prompts_BL[len(prompts) :, 0] = prompts[0][0]  # the padding rows: one token each, their answers dropped
    lengths_B = np.ones((rows,), np.int32)
    for i, prompt in enumerate(prompts):
        prompts_BL[i, : len(prompt)], lengths_B[i] = prompt, len(prompt)
    row_ids_B = np.arange(first_row, first_row + rows, dtype=np.int32)
    if mesh is not None:
        batch = sharding_lib.LOGICAL_RULES["batch"]

        def place(a: np.ndarray) -> jax.Array:
            spec = PartitionSpec(batch, *[None] * (a.ndim - 1))
            return jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda index: a[index])

        prompts_BL, lengths_B, row_ids_B = place(prompts_BL), place(lengths_B), place(row_ids_B)
    graph, state = nnx.split(target)
    result = decode_loop(
        StaticGraph(graph),
        state,
        None,
        None,
        prompts_BL,
        lengths_B,
        stop_token_array(tuple(stop_tokens)),
        np.uint32(seed),
        row_ids_B,
        draft_len=0,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        dtype=jnp.dtype(target.embed.get_value().dtype),
    )
    tokens, counts = host_value(result.tokens), host_value(result.num_generated)
    return [tokens[i, : counts[i]].tolist() for i in range(len(prompts))]


def regenerate(
    target: Gemma4,
    template: ChatTemplate,
    rows: Sequence,
    path: str | os.PathLike,
    *,
    temperature: float = 0.0,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    max_prompts: int = 0,
    seed: int = 0,
    mesh: Mesh | None = None,
) -> epath.Path:
    """Writes ``path`` (JSONL of ``prompt_ids`` / ``answer_ids``) once; every process calls it, process 0 writes."""
    path = epath.Path(path)
    if path.is_file():
        return path
    prompts = prompts_of(rows, max_prompts)
    if not prompts:
        raise ValueError("Self-distillation found no conversations with a model turn to regenerate.")
    writer = jax.process_index() == 0
    partial = path.with_suffix(".partial")
    if writer:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = partial.open("w")
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        ids = [template.prompt_ids(messages) for messages in batch]
        answers = answer(
            target,
            ids,
            stop_tokens=template.stop_tokens,
            sampling=Sampling(temperature=temperature),
            max_new_tokens=max_new_tokens,
            seed=seed,
            first_row=start,
            mesh=mesh,
        )
        if writer:
            for messages, prompt_ids, answer_ids in zip(batch, ids, answers, strict=True):
                f.write(json.dumps({"messages": messages, "prompt_ids": prompt_ids, "answer_ids": answer_ids}) + "\n")
            log.info("self-distillation: %d / %d prompts answered", min(start + batch_size, len(prompts)), len(prompts))
    if writer:
        f.close()
        partial.rename(path)  # only a complete file is ever read as a finished data set
    barrier(f"{path.name} written")
    return path
