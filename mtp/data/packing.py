"""Packs tokenised documents into fixed-length rows, in order, with grain's first-fit packing.

A row holds ``tokens``, ``loss_mask``, ``segment_ids`` (1, 2, ... per document, 0 for padding) and ``positions``
(restarting at 0 per document), all int32 of length ``seq_len``, plus ``num_truncated`` (documents of that row
longer than ``seq_len``, which keep their first ``seq_len`` tokens). ``grain.experimental.FirstFitPackIterDataset``
with one bin and no bin shuffling is greedy in-order packing: a document that does not fit the current row starts
the next one, so the same documents always give the same rows, and its iterator state is checkpointable. Every
document starts with ``<bos>`` whose loss mask is 0, so no target crosses a document boundary when the trainer
predicts ``tokens[t]`` from ``tokens[:t]`` weighted by ``loss_mask[t]``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import grain
import numpy as np

FIELDS = ("tokens", "loss_mask", "segment_ids", "positions")
Example = Mapping[str, Any]  # {"tokens": int sequence, "loss_mask": int sequence} of equal length


def _truncate(seq_len: int, example: Example) -> dict[str, np.ndarray]:
    tokens = np.asarray(example["tokens"], np.int32)
    loss_mask = np.asarray(example["loss_mask"], np.int32)
    if tokens.shape != loss_mask.shape or tokens.ndim != 1:
        raise ValueError(f"tokens {tokens.shape} and loss_mask {loss_mask.shape} must be equal-length vectors.")
    # A one-token "sequence" per document, packed beside it, so each row can count its truncated documents.
    truncated = np.array([len(tokens) > seq_len], np.int32)
    return {"tokens": tokens[:seq_len], "loss_mask": loss_mask[:seq_len], "truncated": truncated}


def _not_empty(example: dict[str, np.ndarray]) -> bool:
    return len(example["tokens"]) > 0


def _row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "tokens": packed["tokens"].astype(np.int32),
        "loss_mask": packed["loss_mask"].astype(np.int32),
        "segment_ids": packed["tokens_segment_ids"].astype(np.int32),
        "positions": packed["tokens_positions"].astype(np.int32),
        "num_truncated": np.int32(packed["truncated"].sum()),
    }


def pack_rows(examples: grain.IterDataset, seq_len: int) -> grain.IterDataset:
    """A grain stage: examples in, packed rows (each with its ``num_truncated``) out; empty documents are dropped."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}.")
    examples = examples.map(functools.partial(_truncate, seq_len)).filter(_not_empty)
    lengths = {"tokens": seq_len, "loss_mask": seq_len, "truncated": seq_len}
    packed = grain.experimental.FirstFitPackIterDataset(
        examples, length_struct=lengths, num_packing_bins=1, shuffle_bins=False
    )
    return packed.map(_row)


def pack(examples: Iterable[Example], seq_len: int) -> tuple[list[dict[str, np.ndarray]], int]:
    """All rows of ``examples`` packed in order, and how many documents were truncated."""
    rows = list(pack_rows(grain.MapDataset.source(list(examples)).to_iter_dataset(), seq_len))
    return [{k: row[k] for k in FIELDS} for row in rows], sum(int(row["num_truncated"]) for row in rows)


def empty_row(seq_len: int) -> dict[str, np.ndarray]:
    """A row of padding (segment 0 everywhere), for topping up a fixed number of batches."""
    return {name: np.zeros(seq_len, np.int32) for name in FIELDS}
