"""The sweep runner writes every finished point before an error, and refuses draft lengths above the maximum."""

import json
import types

import pytest

from mtp.errors import UserError
from mtp.evaluation import results, runner
from mtp.evaluation.config import SweepSettings
from mtp.evaluation.prompts import Prompt
from tests.evaluation.test_results import runs

DRAFTER = types.SimpleNamespace(config=types.SimpleNamespace(max_draft_len=4))
PROMPTS = [Prompt("code", [2, 3]), Prompt("docs", [2, 4])]


def run_sweeps(tmp_path, settings):
    return runner.run_sweeps(
        None,
        DRAFTER,
        PROMPTS,
        prompt_set="set",
        settings=settings,
        template=None,
        output_dir=tmp_path,
        target_dir=tmp_path / "target",
        drafter_dir=tmp_path / "drafter",
        progress=False,
    )


def test_finished_points_are_written_before_an_error(tmp_path, monkeypatch):
    calls = []

    def fake_sweep(target, drafter, prompts, *, temperature, **kwargs):
        calls.append(temperature)
        if len(calls) == 1:
            return list(prompts), runs()
        if len(calls) == 2:  # greedy, and the speculative tokens differ: written, then raised
            return list(prompts), runs(speculative_tokens=(1, 2, 3, 4, 6))
        raise AssertionError("no point runs after a greedy mismatch")

    monkeypatch.setattr(runner, "sweep", fake_sweep)
    settings = SweepSettings(draft_lens=(2,), temperatures=(0.7, 0.0), batch_sizes=(1,), max_new_tokens=(8, 16))
    with pytest.raises(results.OutputMismatchError):
        run_sweeps(tmp_path, settings)
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    assert [(r["temperature"], r["category"], r["outputs_match_ar"]) for r in records] == [
        (0.7, "all", True),
        (0.7, "code", True),
        (0.7, "docs", True),
        (0.0, "all", False),
        (0.0, "code", False),
        (0.0, "docs", True),
    ]
    assert (tmp_path / "results.md").is_file() and (tmp_path / "tau_and_speedup.png").is_file()


def test_a_draft_length_above_the_drafters_maximum_is_refused_before_decoding(tmp_path):
    settings = SweepSettings(draft_lens=(2, 5), temperatures=(0.0,), batch_sizes=(1,), max_new_tokens=(8,))
    with pytest.raises(UserError, match=r"draft_lens has \[5\], above the drafter's max_draft_len=4"):
        run_sweeps(tmp_path, settings)
    assert not (tmp_path / "results.json").exists()
