"""eval.py on the session's run of configs/tiny.py:test: a Spec-Bench file swept over temperatures at batch size 4,
merged into earlier results; τ against its per-position prediction; bad inputs as one-line errors."""

import json
import shutil

import pytest

from configs import tiny
from mtp.errors import UserError
from mtp.training.evaluate import evaluate

pytestmark = pytest.mark.slow

# Two categories, one two-turn conversation, prompts of different lengths (a ragged batch of 4).
QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["What does json.dumps do?", "And loads?"], "reference": []},
    {"question_id": 2, "category": "coding", "turns": ["Reverse a list."]},
    {"question_id": 3, "category": "coding", "turns": ["Write a function that returns the sum of the squares."]},
    {"question_id": 4, "category": "writing", "turns": ["Explain os.path.join, with an example of two paths."]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def config_for(**evaluation):
    config = tiny.get_config("test")
    config.eval.update(evaluation)
    return config


def assert_tau_matches_its_prediction(record):
    """τ = tokens after the prefill ÷ target forwards; 1 + Σ per-position = mean accepted + 1 over rounds. They differ
    only where a prompt's last round was cut by a stop token or the token limit: at most k + 1 tokens per prompt."""
    gap = record["predicted_acceptance_length"] - record["acceptance_length"]
    tolerance = (record["draft_len"] + 1) * record["num_prompts"] / record["target_forwards"]
    assert -1e-9 <= gap <= tolerance, record
    assert 1.0 <= record["acceptance_length"] <= record["draft_len"] + 1


def test_the_main_jobs_tau_matches_its_per_position_rates(tiny_run):
    workdir, _ = tiny_run
    for record in json.loads((workdir / "eval" / "results.json").read_text())["records"]:
        assert_tau_matches_its_prediction(record)


@pytest.fixture(scope="module")
def spec_bench(tiny_run, tmp_path_factory):
    """eval.py with a Spec-Bench file, greedy and T=0.7, batch 4, into a copy of the main job's results.json."""
    workdir, _ = tiny_run
    out = tmp_path_factory.mktemp("eval")
    shutil.copy(workdir / "eval" / "results.json", out / "results.json")
    before = json.loads((out / "results.json").read_text())["records"]
    config = config_for(
        prompts_file=str(write_jsonl(out / "question.jsonl", QUESTIONS)),
        draft_lens=(2,),
        temperatures=(0.0, 0.7),
        batch_sizes=(4,),
        max_new_tokens=(8,),
        output_dir=str(out),
    )
    return out, before, evaluate(config, workdir, progress=False)


def test_a_spec_bench_file_sweeps_categories_and_temperatures_at_batch_4(spec_bench):
    _, _, summary = spec_bench
    records = summary["records"]
    assert [(r["category"], r["temperature"]) for r in records] == [
        (c, t) for t in (0.0, 0.7) for c in ("all", "coding", "writing")
    ]
    for r in records:
        assert (r["prompt_set"], r["draft_len"], r["batch_size"], r["max_new_tokens"]) == ("question", 2, 4, 8)
        assert_tau_matches_its_prediction(r)
        assert all(0 <= a <= 1 for a in r["per_position_acceptance"]) and r["num_tokens"] > 0
    overall = {r["temperature"]: r for r in records if r["category"] == "all"}
    assert overall[0.0]["num_prompts"] == 5  # four first turns and one second turn
    assert overall[0.0]["outputs_match_ar"]  # greedy at batch 4, ragged prompts: identical to plain decoding
    assert overall[0.7]["ar_tokens_per_second"] > 0 and overall[0.7]["speedup"] > 0  # sampled: no identity required


def test_results_merge_with_earlier_runs_beside_a_table_and_plots(spec_bench):
    out, before, summary = spec_bench
    body = json.loads((out / "results.json").read_text())
    assert body["records"] == before + summary["records"]  # the main job's records kept, the new ones added
    report = (out / "results.md").read_text()
    assert "| question | 0.7 | 4 | 8 | 2 |" in report and "| embedded_held_out | 0 | 1 | 12 |" in report
    assert all((out / f"{name}.png").read_bytes().startswith(b"\x89PNG") for name in ("categories", "tau_and_speedup"))


def fitting_nothing(tmp_path, workdir):
    """A copy of the run's drafter that claims another target width."""
    drafter = tmp_path / "drafter"
    shutil.copytree(workdir / "hf", drafter)
    config = json.loads((drafter / "config.json").read_text())
    (drafter / "config.json").write_text(json.dumps(config | {"backbone_hidden_size": 48}))
    return drafter


@pytest.mark.parametrize(
    "case, message",
    [
        ("malformed", r"bad\.jsonl:2: not valid JSON"),
        ("unknown_category", r"unknown category \['math'\] in .*; it has \['coding', 'writing'\]"),
        ("empty", r"empty\.jsonl holds no prompts"),
        ("unfit_drafter", r"drafter/config\.json: .*backbone_hidden_size = 48 but target hidden_size = 64"),
        ("draft_len", r"draft_lens has \[5\], above the drafter's max_draft_len=4"),
        ("prefill_chunk", r"eval\.prefill_chunk=-8: give a token count, or 0 for one pass"),
    ],
)
def test_bad_input_is_one_clear_line_before_any_decoding(tiny_run, tmp_path, case, message):
    workdir, _ = tiny_run
    questions = str(write_jsonl(tmp_path / "question.jsonl", QUESTIONS))
    settings = {"output_dir": str(tmp_path / "out"), "prompts_file": questions}
    if case == "malformed":
        (tmp_path / "bad.jsonl").write_text(json.dumps(QUESTIONS[0]) + '\n{"turns": ["a"]\n')
        settings["prompts_file"] = str(tmp_path / "bad.jsonl")
    elif case == "unknown_category":
        settings["categories"] = "coding,math"
    elif case == "empty":
        (tmp_path / "empty.jsonl").write_text("\n\n")
        settings["prompts_file"] = str(tmp_path / "empty.jsonl")
    elif case == "unfit_drafter":
        settings["drafter_path"] = str(fitting_nothing(tmp_path, workdir))
    elif case == "prefill_chunk":
        settings["prefill_chunk"] = -8
    else:
        settings["draft_lens"] = (2, 5)
    with pytest.raises(UserError, match=message) as error:
        evaluate(config_for(**settings), workdir, progress=False)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out" / "results.json").exists()
