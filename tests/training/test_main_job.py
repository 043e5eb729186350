"""The main job's quick variant end to end: corpus, tokenizer, target, drafter, evaluation, results.json."""

import json
import shutil

import pytest

from configs import tiny
from mtp.training.checkpoints import WorkdirError, check_workdir
from mtp.training.run import TARGET_FILE, run

pytestmark = pytest.mark.slow

RECORD_KEYS = {
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


@pytest.fixture(scope="module")
def main_job(tiny_run, embedded_cache):
    """``train.py --config configs/tiny.py:test`` in the session's cache (shared with tests/evaluation): (workdir,
    what run returned, cache)."""
    return (*tiny_run, embedded_cache)


def test_the_quick_variant_writes_results_json(main_job):
    workdir, summary, cache = main_job
    body = json.loads((workdir / "eval" / "results.json").read_text())
    assert body["target"] == str((cache / "tiny_target_test").resolve()) and body["drafter"] == str(workdir / "hf")
    records = body["records"]
    assert {(r["category"], r["draft_len"]) for r in records} == {
        (c, k) for c in ("all", "code", "docs") for k in (1, 2, 3, 4)
    }
    for record in records:
        assert set(record) >= RECORD_KEYS, RECORD_KEYS - set(record)
        assert record["outputs_match_ar"]  # greedy: speculative output is plain output
        assert record["acceptance_length"] >= 1 and len(record["per_position_acceptance"]) == record["draft_len"]
        assert (record["temperature"], record["batch_size"], record["max_new_tokens"]) == (0.0, 1, 12)
    assert [r["num_prompts"] for r in records if r["category"] == "all"] == [4] * 4
    manifest = json.loads((cache / "tiny_target_test" / "manifest.json").read_text())
    assert manifest["eval_perplexity"] > 1 and manifest["recipe"]["tokenizer_sha256"]
    assert summary["eval"]["records"] == records
    assert len(summary["eval"]["offline"]["top1_agreement"]) == 4  # held-out agreement per depth, over real tokens
    assert {p.name for p in (workdir / "eval").glob("*.png")} == {
        "acceptance_by_position.png",
        "tau_and_speedup.png",
        "categories.png",
    }
    assert "## Best draft length" in (workdir / "eval" / "results.md").read_text()


def _snapshot(directory):
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("change", ["other_tokenizer", "no_record"])
def test_a_workdir_of_another_target_or_tokenizer_is_refused_untouched(main_job, tmp_path, change):
    workdir, _, _ = main_job
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    if change == "other_tokenizer":
        record = json.loads((copy / TARGET_FILE).read_text())
        (copy / TARGET_FILE).write_text(json.dumps(record | {"tokenizer_sha256": "0" * 64}))
    else:  # a workdir from before target.json existed
        (copy / TARGET_FILE).unlink()
    before = _snapshot(copy)
    with pytest.raises(WorkdirError, match="Nothing was changed"):
        run(tiny.get_config("test"), copy, progress=False)
    assert _snapshot(copy) == before


def test_other_evaluation_settings_keep_the_workdir(main_job, tmp_path):
    workdir, _, _ = main_job
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    config = tiny.get_config("test")
    config.eval.update(temperatures=(0.0, 0.7), batch_sizes=(1, 4))
    check_workdir(copy, config)  # what is measured is not what is trained: the run resumes
