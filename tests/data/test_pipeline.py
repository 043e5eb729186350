"""The grain pipeline: deterministic by seed, epochs reshuffled, processes partition the data, state restores."""

import json
from collections import Counter

import numpy as np
import pytest

from mtp.data.chat import RowError
from mtp.data.packing import FIELDS
from mtp.data.pipeline import PipelineConfig, make_eval_batches, make_train_iterator
from mtp.data.sources import load_rows

DOCS = [{"text": f"doc {i}"} for i in range(60)]


def _doc_numbers(template, batches):
    """The document numbers in stream order: every segment of every row decodes to 'doc N'."""
    numbers = []
    for batch in batches:
        for tokens, segments in zip(batch["tokens"], batch["segment_ids"], strict=True):
            for segment in range(1, int(segments.max()) + 1):
                ids = tokens[segments == segment].tolist()
                assert ids[0] == template.ids.bos and ids[-1] == template.ids.eos
                numbers.append(int(template.tokenizer.decode(ids[1:-1]).removeprefix("doc ")))
    return numbers


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _same(batches_a, batches_b):
    return len(batches_a) == len(batches_b) and all(
        np.array_equal(a[k], b[k]) for a, b in zip(batches_a, batches_b, strict=True) for k in FIELDS
    )


def test_batches_have_the_documented_fields_and_shapes(template, embedded_paths):
    rows = load_rows(str(embedded_paths.train))
    iterator = make_train_iterator(rows, template, PipelineConfig(seq_len=64, global_batch_size=8), process_count=1)
    batch = next(iterator)
    iterator.close()
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: ((8, 64), np.int32) for k in FIELDS}
    assert iterator.num_truncated > 0  # some embedded conversations are longer than 64 tokens


def test_same_seed_same_stream_and_different_seeds_differ(template):
    def first_batches(seed):
        config = PipelineConfig(seq_len=32, global_batch_size=4, seed=seed)
        iterator = make_train_iterator(DOCS, template, config, process_index=0, process_count=1)
        batches = _take(iterator, 5)
        iterator.close()
        return batches

    assert _same(first_batches(7), first_batches(7))
    assert not _same(first_batches(7), first_batches(8))


def test_each_epoch_is_a_new_permutation_of_all_rows(template):
    config = PipelineConfig(seq_len=32, global_batch_size=1, seed=3, num_epochs=2)
    numbers = _doc_numbers(template, make_train_iterator(DOCS, template, config, process_index=0, process_count=1))
    first, second = numbers[: len(DOCS)], numbers[len(DOCS) :]
    assert sorted(first) == sorted(second) == list(range(len(DOCS)))
    assert first != second and first != sorted(first)


def test_processes_partition_the_rows(template):
    config = PipelineConfig(seq_len=32, global_batch_size=2, seed=5, num_epochs=1)
    per_process = [
        _doc_numbers(template, make_train_iterator(DOCS, template, config, process_index=p, process_count=2))
        for p in range(2)
    ]
    assert not set(per_process[0]) & set(per_process[1])
    assert sorted(per_process[0] + per_process[1]) == list(range(len(DOCS)))
    with pytest.raises(ValueError, match="multiple of 2 processes"):
        make_train_iterator(DOCS, template, PipelineConfig(seq_len=32, global_batch_size=3), process_count=2)


@pytest.mark.parametrize("num_workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_restored_state_resumes_the_same_batches(template, embedded_paths, num_workers):
    rows = load_rows(str(embedded_paths.train))
    config = PipelineConfig(seq_len=48, global_batch_size=4, seed=11, num_workers=num_workers)
    iterator = make_train_iterator(rows, template, config, process_index=0, process_count=1)
    _take(iterator, 6)
    state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint stores
    expected, expected_truncated = _take(iterator, 5), iterator.num_truncated
    iterator.close()

    restored = make_train_iterator(rows, template, config, process_index=0, process_count=1)
    restored.set_state(state)
    assert _same(_take(restored, 5), expected)
    assert restored.num_truncated == expected_truncated > 0
    restored.close()


def test_eval_batches_are_fixed_padded_and_sharded(template):
    config = PipelineConfig(seq_len=32, global_batch_size=4)
    batches = make_eval_batches(DOCS, template, config, num_batches=5, process_index=0, process_count=1)
    assert _same(batches, make_eval_batches(DOCS, template, config, num_batches=5, process_count=1))
    assert _doc_numbers(template, batches) == list(range(len(DOCS)))  # in order, all of them
    assert not np.any(batches[-1]["segment_ids"][-1])  # ran out: padded with an empty row
    shards = [
        make_eval_batches(DOCS, template, config, num_batches=5, process_index=p, process_count=2) for p in range(2)
    ]
    assert all(len(s) == 5 and s[0]["tokens"].shape == (2, 32) for s in shards)
    assert sorted(_doc_numbers(template, shards[0]) + _doc_numbers(template, shards[1])) == list(range(len(DOCS)))


def test_a_bad_row_met_in_the_pipeline_names_its_file_and_row(template, tmp_path):
    path = tmp_path / "late.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*DOCS[:4], {"messages": [{"role": "x", "content": ""}]}]))
    rows = load_rows(str(path), check=False)
    config = PipelineConfig(seq_len=32, global_batch_size=2, num_epochs=1)
    with pytest.raises(RowError, match=r"late\.jsonl row 5: message 1 has role 'x'"):
        Counter(_doc_numbers(template, make_train_iterator(rows, template, config, process_count=1)))
