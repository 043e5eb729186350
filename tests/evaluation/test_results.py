"""The results.json records: τ, per-position rates, speeds per category, and greedy mismatches as errors."""

import json

import pytest

from mtp.decoding.generate import Generation
from mtp.evaluation import results
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
