"""Packing invariants: documents intact and in order, segments 1.., positions restart, truncation counted."""

import json

import grain
import numpy as np

from mtp.data.packing import pack, pack_rows

SEQ_LEN = 16


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {"tokens": rng.integers(3, 500, n).astype(np.int32), "loss_mask": rng.integers(0, 2, n).astype(np.int32)}
        for n in lengths
    ]


def _documents(row):
    """(tokens, loss_mask) of each segment of a row, checking segment and position invariants on the way."""
    segments, positions = row["segment_ids"], row["positions"]
    used = int(np.sum(segments > 0))
    assert np.all(segments[:used] > 0) and np.all(segments[used:] == 0)  # padding only at the end
    assert np.all(row["tokens"][used:] == 0) and np.all(row["loss_mask"][used:] == 0) and np.all(positions[used:] == 0)
    ids = segments[:used]
    assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)  # 1, 1, 2, 2, 2, 3 ...
    documents = []
    for segment in range(1, int(ids.max()) + 1):
        where = np.flatnonzero(segments == segment)
        np.testing.assert_array_equal(positions[where], np.arange(len(where)))
        documents.append((row["tokens"][where], row["loss_mask"][where]))
    return documents


def test_rows_hold_every_document_whole_and_in_order():
    examples = _examples([5, 7, 4, 16, 1, 9, 9, 3, 2])
    rows, num_truncated = pack(examples, SEQ_LEN)
    assert num_truncated == 0
    for row in rows:
        assert {k: (v.shape, v.dtype) for k, v in row.items()} == {
            k: ((SEQ_LEN,), np.int32) for k in ("tokens", "loss_mask", "segment_ids", "positions")
        }
    unpacked = [d for row in rows for d in _documents(row)]
    assert len(unpacked) == len(examples)
    for (tokens, loss_mask), example in zip(unpacked, examples, strict=True):
        np.testing.assert_array_equal(tokens, example["tokens"])
        np.testing.assert_array_equal(loss_mask, example["loss_mask"])
    # Greedy in order: [5, 7, 4] fills a row, [16] fills one, [1, 9] + 9 > 16 spills, [9, 3, 2].
    assert [int(row["segment_ids"].max()) for row in rows] == [3, 1, 2, 3]


def test_long_documents_are_truncated_and_counted():
    examples = _examples([3, 40, 16, 17])
    rows, num_truncated = pack(examples, SEQ_LEN)
    assert num_truncated == 2
    documents = [d for row in rows for d in _documents(row)]
    np.testing.assert_array_equal(documents[1][0], examples[1]["tokens"][:SEQ_LEN])  # keeps the beginning
    assert [len(t) for t, _ in documents] == [3, 16, 16, 16]


def test_packing_is_deterministic():
    first, _ = pack(_examples(range(1, 30)), SEQ_LEN)
    second, _ = pack(_examples(range(1, 30)), SEQ_LEN)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(first, second, strict=True) for k in a)


def test_grain_stage_matches_pack_and_restores_mid_stream():
    examples = _examples([5, 12, 3, 30, 8, 8, 1, 15, 6, 6, 6, 20, 2])
    expected, num_truncated = pack(examples, SEQ_LEN)
    dataset = pack_rows(grain.MapDataset.source(examples).to_iter_dataset(), SEQ_LEN)
    streamed = list(dataset)
    assert sum(int(row.pop("num_truncated")) for row in streamed) == num_truncated == 2
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(streamed, expected, strict=True) for k in a)

    iterator = iter(dataset)
    for _ in range(3):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    rest = list(iterator)
    restored = iter(dataset)
    restored.set_state(state)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(list(restored), rest, strict=True) for k in a)
