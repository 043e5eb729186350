"""The embedded corpus: built once, deterministic, valid rows, a train/eval split, and the tiny tokenizer."""

import json

from mtp.data import embedded
from mtp.data.chat import parse_row
from mtp.data.tokenizer import load_tokenizer


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_builds_train_eval_and_tokenizer(embedded_paths):
    train, held_out = _read(embedded_paths.train), _read(embedded_paths.eval)
    assert 2000 <= len(train) <= 10000 and 50 <= len(held_out) <= len(train) // 10
    for row in train + held_out:
        assert isinstance(parse_row(row), list)  # every row is a valid conversation with a model turn
    assert not [row for row in held_out if row in train]  # held-out conversations are unseen
    assert load_tokenizer(embedded_paths.tokenizer).token_to_id("<turn|>") == 106


def test_is_deterministic():
    assert embedded.build_corpus() == embedded.build_corpus()


def test_ensure_is_idempotent(embedded_paths):
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in vars(embedded_paths).values()}
    assert embedded.ensure_embedded_dataset(embedded_paths.train.parent) == embedded_paths
    assert before == {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in vars(embedded_paths).values()}


def test_files_match_a_fresh_build(embedded_paths):
    train, held_out = embedded.build_corpus()
    assert _read(embedded_paths.train) == train and _read(embedded_paths.eval) == held_out


def test_retrained_tokenizer_keeps_gemma4_ids(tmp_path):
    paths = embedded.ensure_embedded_dataset(tmp_path, retrain_tokenizer=True)
    tokenizer = load_tokenizer(paths.tokenizer)
    assert (tokenizer.token_to_id("<|turn>"), tokenizer.token_to_id("<eos>")) == (105, 1)
