"""The grain input pipeline: shuffle by seed, shard by process, tokenise, pack, batch and prefetch, with saveable state.

Order of stages (``MapDataset`` up to the shard, ``IterDataset`` after)::

    rows -> chat template (lazy: only rows this process reads are tokenised) -> shuffle(seed; a new order each
         epoch) -> repeat(num_epochs) -> [process_index::process_count] -> pack to seq_len
         -> batch(global_batch / process_count) -> prefetch (a thread, or worker processes)

Every process computes the same global order and takes every ``process_count``-th row, so processes read disjoint
rows. The stream is a function of (rows, seed, seq_len, batch size, process count, num_workers): restore a saved
state only into an iterator built with the same arguments.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from mtp.data.chat import ChatTemplate, RowError
from mtp.data.packing import FIELDS, empty_row, pack_rows

log = logging.getLogger(__name__)
Batch = dict[str, np.ndarray]  # FIELDS -> int32 [local_batch, seq_len]


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What shapes the token stream."""

    seq_len: int
    global_batch_size: int
    seed: int = 0
    num_epochs: int | None = None  # None repeats forever
    num_workers: int = 0  # > 0: prefetch batches in that many processes; 0: in a thread
    prefetch_batches: int = 2
    read_threads: int = 4  # threads tokenising rows ahead of the packer


class _Format(grain.transforms.MapWithIndex):
    """Row ``index`` to {tokens, loss_mask}; a bad row raises naming its file and row when the rows can say."""

    def __init__(self, rows: Sequence, template: ChatTemplate):
        self._locate = getattr(rows, "locate", None)
        self._template = template

    def map_with_index(self, index: int, row: Mapping) -> dict[str, np.ndarray]:
        try:
            tokens, loss_mask = self._template.format_row(row)
        except RowError as e:
            where = "{} row {}".format(*self._locate(index)) if self._locate else f"row {index + 1}"
            raise RowError(f"{where}: {e}") from None
        return {"tokens": np.asarray(tokens, np.int32), "loss_mask": np.asarray(loss_mask, np.int32)}


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} is not in [0, {count}).")
    return index, count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of {process_count} processes."
        )
    return global_batch_size // process_count


def ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags, which raise if never parsed (as when not started by absl.app)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _packed(
    rows: Sequence,
    template: ChatTemplate,
    config: PipelineConfig,
    *,
    shuffle: bool,
    num_epochs: int | None,
    process_index: int,
    process_count: int,
) -> grain.IterDataset:
    """Rows -> packed rows for this process (before batching)."""
    if not len(rows):
        raise ValueError("No rows to build a pipeline from.")
    # Formatting is lazy (done when a row is read), so only this process's rows are tokenised; placing it before
    # the shuffle lets it see each row's own index, to name the file and row of a bad one.
    ds = grain.MapDataset.source(rows).map_with_index(_Format(rows, template))
    if shuffle:
        ds = ds.shuffle(seed=config.seed)  # grain folds the epoch into the seed: every epoch has its own order
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds[process_index::process_count]
    read = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=max(64, 8 * config.read_threads))
    return pack_rows(ds.to_iter_dataset(read), config.seq_len)


class BatchIterator(grain.DatasetIterator):
    """Train batches with the running count of truncated documents; a grain iterator, so orbax saves its state
    with grain's own checkpoint handler (one file per process: ``process_<i>-of-<n>.json``)."""

    def __init__(self, iterator: grain.DatasetIterator):
        super().__init__(iterator)
        self.num_truncated = 0

    def __next__(self) -> Batch:
        batch = next(self._parent)
        self.num_truncated += int(np.sum(batch.pop("num_truncated")))
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable: this process's reader position and truncation count."""
        return {"pipeline": self._parent.get_state(), "num_truncated": self.num_truncated}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self.num_truncated = int(state["num_truncated"])


def make_train_iterator(
    rows: Sequence[Mapping],
    template: ChatTemplate,
    config: PipelineConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> BatchIterator:
    """This process's share of each global batch: {tokens, loss_mask, segment_ids, positions} int32 [B/P, seq_len]."""
    index, count = _process(process_index, process_count)
    batch_size = _local_batch_size(config.global_batch_size, count)
    ds = _packed(
        rows, template, config, shuffle=True, num_epochs=config.num_epochs, process_index=index, process_count=count
    ).batch(batch_size, drop_remainder=True)
    if config.num_workers > 0:
        ensure_absl_flags_parsed()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=config.num_workers, per_worker_buffer_size=config.prefetch_batches)
        )
    else:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=config.prefetch_batches)
    return BatchIterator(iter(ds))


def make_eval_batches(
    rows: Sequence[Mapping],
    template: ChatTemplate,
    config: PipelineConfig,
    *,
    num_batches: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> list[Batch]:
    """A fixed held-out set: rows in order, one pass, exactly ``num_batches`` batches (padded with empty rows)."""
    index, count = _process(process_index, process_count)
    batch_size = _local_batch_size(config.global_batch_size, count)
    # Every process returns the same number of batches, so collective eval steps never wait on one that ran out.
    iterator = iter(
        _packed(rows, template, config, shuffle=False, num_epochs=1, process_index=index, process_count=count)
    )
    packed, num_truncated = [], 0
    for row in iterator:
        num_truncated += int(row.pop("num_truncated"))
        packed.append(row)
        if len(packed) == num_batches * batch_size:
            break
    iterator.close()
    if num_truncated:
        log.info("eval: %d documents longer than seq_len=%d were truncated", num_truncated, config.seq_len)
    empty = empty_row(config.seq_len)
    packed += [empty] * (num_batches * batch_size - len(packed))
    return [
        {name: np.stack([row[name] for row in packed[b * batch_size : (b + 1) * batch_size]]) for name in FIELDS}
        for b in range(num_batches)
    ]
