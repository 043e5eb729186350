"""The embedded corpus: built once, deterministic, valid rows, a train/eval split by source file, the tokenizer."""

import json

from mtp.data.chat import parse_row
from mtp.data.tokenizer import load_tokenizer
from mtp.embedded import corpus as embedded


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_builds_train_eval_and_tokenizer(embedded_paths):
    train, held_out = _read(embedded_paths.train), _read(embedded_paths.eval)
    assert 5000 <= len(train) <= 40000 and 200 <= len(held_out) <= len(train) // 4
    for row in train + held_out:
        assert isinstance(parse_row(row), list)  # every row is a valid conversation with a model turn
    for rows in (train, held_out):
        assert {row["category"] for row in rows} == {"docs", "code"}
    tokenizer = load_tokenizer(embedded_paths.tokenizer)
    assert tokenizer.get_vocab_size() == embedded.VOCAB_SIZE and tokenizer.token_to_id("<turn|>") == 106


def test_the_split_is_by_source_file_and_disjoint(embedded_paths):
    train, held_out = _read(embedded_paths.train), _read(embedded_paths.eval)
    train_sources, held_out_sources = {r["source"] for r in train}, {r["source"] for r in held_out}
    assert not train_sources & held_out_sources  # held-out prompts come from files the target never saw
    assert {s for s in held_out_sources if s.endswith(".py")} and {s for s in held_out_sources if "." not in s}
    train_rows = {json.dumps(row, sort_keys=True) for row in train}
    assert not [row for row in held_out if json.dumps(row, sort_keys=True) in train_rows]


def test_ensure_is_idempotent(embedded_paths):
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in vars(embedded_paths).values()}
    assert embedded.ensure_embedded_dataset(embedded_paths.train.parent) == embedded_paths
    assert before == {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in vars(embedded_paths).values()}


def test_files_match_a_fresh_build(embedded_paths):
    """Deterministic: a second build in this process gives the same rows and the same split."""
    train, held_out = embedded.build_corpus(fresh=True)
    assert _read(embedded_paths.train) == train and _read(embedded_paths.eval) == held_out


def test_retrained_tokenizer_keeps_gemma4_ids(embedded_paths):
    tokenizer = embedded.build_tiny_tokenizer(embedded.corpus_texts(_read(embedded_paths.eval)), vocab_size=600)
    assert (tokenizer.token_to_id("<|turn>"), tokenizer.token_to_id("<eos>")) == (105, 1)
