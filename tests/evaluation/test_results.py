"""The results.json records: τ, per-position rates, speeds per category, and greedy mismatches as errors."""

import json

import pytest

from mtp.decoding.generate import Generation
from mtp.evaluation import plots, results
from mtp.evaluation.prompts import Prompt
from mtp.evaluation.sweep import Run

SCHEMA = {
    "prompt_set",
    "category",
    "draft_len",
    "temperature",
    "batch_size",
    "num_prompts",
    "num_tokens",
    "acceptance_length",
    "predicted_acceptance_length",
    "per_position_acceptance",
    "tokens_per_second",
    "ar_tokens_per_second",
    "speedup",
    "outputs_match_ar",
}


def generation(tokens, accepted):
    produced = [a + 1 for a in accepted]
    return Generation(tokens, [[0, 0]] * len(accepted), accepted, produced, target_forwards=len(accepted))


def runs(speculative_tokens=(1, 2, 3, 4, 5)):
    plain = Run(0, [generation([1, 2, 3, 4, 5], [0] * 5), generation([7, 8], [0, 0])], [1.0, 1.0])
    spec = Run(2, [generation(list(speculative_tokens), [2, 0, 1]), generation([7, 8], [1])], [0.5, 0.5])
    return {0: plain, 2: spec}


PROMPTS = [Prompt("code", [2, 3]), Prompt("docs", [2, 4])]


def test_records_follow_the_schema_per_category():
    records = results.records("set", PROMPTS, runs())
    assert [r["category"] for r in records] == ["all", "code", "docs"]
    assert all(set(r) >= SCHEMA for r in records)
    overall = records[0]
    assert overall["per_position_acceptance"] == [0.75, 0.25]  # rounds accepting 2, 0, 1, 1 drafts
    assert overall["acceptance_length"] == pytest.approx(8 / 4)
    assert overall["predicted_acceptance_length"] == pytest.approx(2.0)
    assert overall["num_tokens"] == 7 and overall["speedup"] == pytest.approx(2.0)
    assert overall["ar_tokens_per_second"] == pytest.approx(3.5) and overall["outputs_match_ar"]
    json.dumps(records)


def test_a_greedy_mismatch_is_an_error_not_an_average():
    records = results.records("set", PROMPTS, runs(speculative_tokens=(1, 2, 3, 4, 6)))
    assert [r["outputs_match_ar"] for r in records] == [False, False, True]
    with pytest.raises(results.OutputMismatchError):
        results.check_greedy_outputs(records)


def test_table_has_one_line_per_record():
    records = results.records("set", PROMPTS, runs())
    assert len(results.table(records).splitlines()) == 2 + len(records)


def test_records_merge_by_key_and_refuse_another_pair(tmp_path):
    path = tmp_path / "results.json"
    first = results.records("set", PROMPTS, runs(), max_new_tokens=8)
    results.write(path, target=tmp_path / "t", drafter=tmp_path / "d", records_=first, offline={"x": 1})
    again = [r | {"acceptance_length": 9.0} for r in first[:1]]
    other = [r | {"temperature": 0.7} for r in first]
    results.write(path, target=tmp_path / "t", drafter=tmp_path / "d", records_=again + other)
    body = json.loads(path.read_text())
    assert len(body["records"]) == 2 * len(first) and body["offline"] == {"x": 1}  # earlier keys are kept
    assert body["records"][0]["acceptance_length"] == 9.0 and body["records"][1:3] == first[1:]
    results.check_pair(path, target=tmp_path / "t", drafter=tmp_path / "d")
    with pytest.raises(results.ResultsFileError, match=r"another pair .*output_dir"):
        results.check_pair(path, target=tmp_path / "t", drafter=tmp_path / "other")


def test_the_best_table_names_the_fastest_draft_length_per_point():
    two = {**runs(), 3: Run(3, runs()[2].outputs, [0.2, 0.2])}  # same tokens in less time
    records = results.records("set", PROMPTS, two, max_new_tokens=8)
    lines = results.best_table(records).splitlines()
    assert len(lines) == 3 and lines[2].startswith("| set | 0 | 1 | 8 | 3 |")
    assert "## All records" in results.report(records)


def test_plots_are_written_as_pngs(tmp_path):
    records = results.records("set", PROMPTS, runs(), max_new_tokens=8)
    records += [r | {"temperature": 0.7, "outputs_match_ar": False} for r in records]
    paths = plots.save_plots(records, tmp_path)
    assert [p.name for p in paths] == [f"{name}.png" for name in plots.PLOTS]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
