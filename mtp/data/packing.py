"""Packs tokenised documents into fixed-length rows, in order, so the same documents always give the same rows.

A row holds ``tokens``, ``loss_mask``, ``segment_ids`` (1, 2, ... per document, 0 for padding) and ``positions``
(restarting at 0 per document), all int32 of length ``seq_len``. A document longer than ``seq_len`` keeps its first
``seq_len`` tokens and is counted as truncated. Packing is greedy: a document that does not fit in the current row
starts the next one. Every document starts with ``<bos>`` whose loss mask is 0, so no target crosses a document
boundary when the trainer predicts ``tokens[t]`` from ``tokens[:t]`` weighted by ``loss_mask[t]``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import grain
import numpy as np

FIELDS = ("tokens", "loss_mask", "segment_ids", "positions")
Example = Mapping[str, Any]  # {"tokens": int sequence, "loss_mask": int sequence} of equal length


def truncate(example: Example, seq_len: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(tokens, loss_mask) cut to ``seq_len``, and whether anything was cut."""
    tokens = np.asarray(example["tokens"], np.int32)
    loss_mask = np.asarray(example["loss_mask"], np.int32)
    if tokens.shape != loss_mask.shape or tokens.ndim != 1:
        raise ValueError(f"tokens {tokens.shape} and loss_mask {loss_mask.shape} must be equal-length vectors.")
    return tokens[:seq_len], loss_mask[:seq_len], len(tokens) > seq_len


class RowBuilder:
    """Accumulates documents into one row of ``seq_len`` tokens."""

    def __init__(self, seq_len: int):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}.")
        self.seq_len = seq_len
        self._documents: list[tuple[np.ndarray, np.ndarray]] = []
        self._used = 0

    @property
    def empty(self) -> bool:
        return not self._documents

    def fits(self, length: int) -> bool:
        return self._used + length <= self.seq_len

    def add(self, tokens: np.ndarray, loss_mask: np.ndarray) -> None:
        assert self.fits(len(tokens)), "caller checks fits() first"
        self._documents.append((tokens, loss_mask))
        self._used += len(tokens)

    def build(self) -> dict[str, np.ndarray]:
        """The padded row; the builder is empty afterwards."""
        row = {name: np.zeros(self.seq_len, np.int32) for name in FIELDS}
        start = 0
        for segment, (tokens, loss_mask) in enumerate(self._documents, start=1):
            end = start + len(tokens)
            row["tokens"][start:end] = tokens
            row["loss_mask"][start:end] = loss_mask
            row["segment_ids"][start:end] = segment
            row["positions"][start:end] = np.arange(len(tokens))
            start = end
        self._documents, self._used = [], 0
        return row


def pack(examples: Iterable[Example], seq_len: int) -> tuple[list[dict[str, np.ndarray]], int]:
    """All rows of ``examples`` packed in order, and how many documents were truncated."""
    builder, rows, num_truncated = RowBuilder(seq_len), [], 0
    for example in examples:
        tokens, loss_mask, cut = truncate(example, seq_len)
        num_truncated += cut
        if not len(tokens):
            continue
        if not builder.fits(len(tokens)):
            rows.append(builder.build())
        builder.add(tokens, loss_mask)
    if not builder.empty:
        rows.append(builder.build())
    return rows, num_truncated


class _PackIterator(grain.DatasetIterator):
    """Packs a stream of examples; its state is the parent's state before the first document of the next row."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int):
        super().__init__(parent)
        self._builder = RowBuilder(seq_len)
        # A document read from the parent that did not fit the last row, with the parent's state before reading it.
        self._pending: tuple[Example, Any] | None = None

    def __next__(self) -> dict[str, np.ndarray]:
        num_truncated = 0
        while True:
            if self._pending is None:
                state = copy.deepcopy(self._parent.get_state())
                try:
                    self._pending = (next(self._parent), state)
                except StopIteration:
                    if self._builder.empty:
                        raise
                    break
            tokens, loss_mask, cut = truncate(self._pending[0], self._builder.seq_len)
            if len(tokens) and not self._builder.fits(len(tokens)):
                break  # stays pending: it opens the next row
            if len(tokens):
                self._builder.add(tokens, loss_mask)
                num_truncated += cut
            self._pending = None
        row = self._builder.build()
        row["num_truncated"] = np.int32(num_truncated)  # per row, so the count survives batching and worker processes
        return row

    def get_state(self) -> dict[str, Any]:
        # Between rows the builder is empty, so the parent's position (rewound to the pending document) is all.
        parent = self._pending[1] if self._pending is not None else self._parent.get_state()
        return {"parent": copy.deepcopy(parent)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = None


class PackIterDataset(grain.IterDataset):
    """A grain stage: examples in, packed rows (plus a ``num_truncated`` scalar each) out."""

    def __init__(self, parent: grain.IterDataset, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._seq_len)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._seq_len})"
