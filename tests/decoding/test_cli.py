"""decode.py's command-line contract, run as users run it, on a tiny HF target and an exported drafter.

Five subprocesses (JAX takes seconds to start, so they run side by side): speculative and plain greedy decoding
of ragged token-id prompts in batches of 2, a sampled run, a text prompt through the tokenizer and chat template,
and one bad input. The other bad inputs go through ``mtp.decoding.cli.run_decode`` in-process, with decoding
itself patched to fail the test if it ever starts. References come from transformers' greedy decoding.
"""

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import hf_pair
from mtp.checkpoint import load_target
from mtp.checkpoint.hf_drafter import save_drafter
from mtp.data.chat import ChatTemplate
from mtp.data.tokenizer import GEMMA4_STOP_TOKENS, TokenizerError, load_tokenizer
from mtp.decoding import cli
from mtp.decoding.generate import DecodeInputError
from mtp.drafter.config import DrafterConfigError
from tests import hf_oracle
from tests.decoding.drafters import copy_drafter

REPO = pathlib.Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "mtp/embedded/assets/tiny_tokenizer.json"
KIND, OTHER_KIND = "e2b_like", "keqv_like"
DRAFT_LEN, MAX_NEW, BATCH = 3, 16, 2
PROMPT_LENGTHS = (12, 3, 7, 16)  # ragged; both batches pad to 16 tokens, so each run compiles once
TEXT = "Why is the sky blue?"
OUTPUT_KEYS = {"token_ids", "text", "drafted_per_round", "accepted_per_round", "target_forwards"}
SUMMARY_KEYS = {"acceptance_length", "per_position_acceptance", "tokens_per_second", "wall_seconds"}


@dataclasses.dataclass
class Setup:
    target: pathlib.Path  # HF target directory with the tiny tokenizer.json
    drafter: pathlib.Path  # our copying drafter, exported with save_drafter
    other_drafter: pathlib.Path  # an HF assistant built for another kind's target
    prompts_file: pathlib.Path
    prompts: list[list[int]]
    hf_target: object


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("cli")
    hf_model = hf_oracle.build_target(KIND, seed=1)
    hf_oracle.save_target(hf_model, root / "target")
    shutil.copy(TOKENIZER, root / "target/tokenizer.json")
    save_drafter(copy_drafter(load_target(root / "target")), root / "drafter")
    hf_oracle.save_assistant(hf_oracle.build_assistant(OTHER_KIND, ordered=False), root / "other_drafter")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, hf_oracle.VOCAB, n).tolist() for n in PROMPT_LENGTHS]
    write_jsonl(root / "prompts.jsonl", [{"token_ids": p} for p in prompts])
    return Setup(root / "target", root / "drafter", root / "other_drafter", root / "prompts.jsonl", prompts, hf_model)


def write_jsonl(path: pathlib.Path, rows: list) -> pathlib.Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@dataclasses.dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    output: pathlib.Path

    def document(self) -> dict:
        assert self.returncode == 0, self.stderr[-3000:]
        return json.loads(self.output.read_text())


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory) -> dict[str, Run]:
    """Every decode.py run of this module, started together."""
    root = tmp_path_factory.mktemp("runs")
    common = [f"--config.target.hf_path={setup.target}", f"--config.max_new_tokens={MAX_NEW}"]
    from_file = [f"--config.prompts_file={setup.prompts_file}", f"--config.batch_size={BATCH}"]
    speculative = [f"--config.drafter.hf_path={setup.drafter}", f"--config.draft_len={DRAFT_LEN}"]
    flags = {
        "speculative": [*common, *from_file, *speculative],
        "plain": [*common, *from_file, "--config.draft_len=0"],
        "sampled": [*common, *from_file, *speculative, "--config.temperature=1.0", "--config.seed=3"],
        "text": [*common, *speculative, f"--config.prompt={TEXT}"],
        "misfit": [*common, *from_file, f"--config.drafter.hf_path={setup.other_drafter}", "--config.draft_len=2"],
    }
    env = os.environ | {"JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1"}
    started = {}
    for name, args in flags.items():
        out, log = root / f"{name}.json", root / f"{name}.log"
        command = [sys.executable, "decode.py", "--config", "configs/hf_pair.py", *args, f"--config.output={out}"]
        stdout, stderr = open(log, "w"), open(root / f"{name}.err", "w")  # noqa: SIM115 (closed below)
        started[name] = (subprocess.Popen(command, cwd=REPO, env=env, stdout=stdout, stderr=stderr), stdout, stderr)
    results = {}
    for name, (process, stdout, stderr) in started.items():
        returncode = process.wait(timeout=600)
        stdout.close()
        stderr.close()
        results[name] = Run(
            returncode,
            pathlib.Path(stdout.name).read_text(),
            pathlib.Path(stderr.name).read_text(),
            root / f"{name}.json",
        )
    return results


def check_document(document: dict, num_prompts: int, draft_len: int) -> None:
    """OUT.json's schema, and per-row statistics that agree with each other and with the summary."""
    assert set(document) == {"outputs", "summary"}
    assert len(document["outputs"]) == num_prompts
    for row in document["outputs"]:
        assert set(row) == OUTPUT_KEYS
        tokens, drafts, accepted = row["token_ids"], row["drafted_per_round"], row["accepted_per_round"]
        assert 1 <= len(tokens) <= MAX_NEW and all(0 <= t < hf_oracle.VOCAB for t in tokens)
        assert isinstance(row["text"], str)
        assert len(drafts) == len(accepted) == row["target_forwards"]
        assert all(len(d) == draft_len for d in drafts) and all(0 <= n <= draft_len for n in accepted)
        # Each round adds its accepted drafts + 1 target token (fewer only in the last round: a stop or the limit).
        assert len(tokens) - 1 <= sum(accepted) + row["target_forwards"]
        assert len(tokens) - 1 > sum(accepted[:-1]) + row["target_forwards"] - 1
    summary = document["summary"]
    assert set(summary) >= SUMMARY_KEYS
    produced = sum(len(row["token_ids"]) - 1 for row in document["outputs"])
    forwards = sum(row["target_forwards"] for row in document["outputs"])
    assert summary["acceptance_length"] == pytest.approx(produced / forwards)
    assert len(summary["per_position_acceptance"]) == draft_len
    assert summary["tokens_per_second"] > 0 and summary["wall_seconds"] > 0


def transformers_greedy(setup: Setup, prompt: list[int]) -> list[int]:
    """The target's greedy continuation, cut after the first stop token as decode.py does."""
    tokens = hf_oracle.reference_greedy(setup.hf_target, np.array([prompt]), MAX_NEW)[0].tolist()
    stops = [i for i, t in enumerate(tokens) if t in GEMMA4_STOP_TOKENS]
    return tokens[: stops[0] + 1] if stops else tokens


def test_greedy_token_id_prompts(setup, runs):
    """Verbatim token ids (nothing prepended), speculative output equal to plain, both the target's greedy."""
    speculative, plain = runs["speculative"].document(), runs["plain"].document()
    check_document(speculative, len(setup.prompts), DRAFT_LEN)
    check_document(plain, len(setup.prompts), 0)
    for prompt, spec_row, plain_row in zip(setup.prompts, speculative["outputs"], plain["outputs"], strict=True):
        assert spec_row["token_ids"] == plain_row["token_ids"] == transformers_greedy(setup, prompt)
        assert plain_row["target_forwards"] == len(plain_row["token_ids"]) - 1
        assert spec_row["text"] == ""  # no text prompt, so no tokenizer was loaded
    assert plain["summary"]["acceptance_length"] == 1.0
    assert speculative["summary"]["acceptance_length"] > 1.0, "the copying drafter should get drafts accepted"
    for name in ("speculative", "plain"):
        assert "tok/s" in runs[name].stdout and "τ=" in runs[name].stdout, runs[name].stdout  # the human summary


def test_sampled_run(setup, runs):
    sampled = runs["sampled"].document()
    check_document(sampled, len(setup.prompts), DRAFT_LEN)
    greedy = [row["token_ids"] for row in runs["plain"].document()["outputs"]]
    assert [row["token_ids"] for row in sampled["outputs"]] != greedy


def test_text_prompt_goes_through_the_chat_template(setup, runs):
    document = runs["text"].document()
    check_document(document, 1, DRAFT_LEN)
    (row,) = document["outputs"]
    tokenizer = load_tokenizer(setup.target)
    prompt = ChatTemplate(tokenizer).prompt_ids([{"role": "user", "content": TEXT}])
    assert row["token_ids"] == transformers_greedy(setup, prompt)
    assert row["text"] == tokenizer.decode(row["token_ids"]) and row["text"]


def test_a_drafter_for_another_target_fails_on_the_command_line(runs):
    run = runs["misfit"]
    # A user's mistake: one line naming it, exit status 2, no traceback.
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "does not fit the target" in last, run.stderr[-2000:]
    assert not run.output.exists()


def no_tokenizer_target(setup: Setup, tmp_path: pathlib.Path) -> str:
    target = shutil.copytree(setup.target, tmp_path / "bare_target")
    (target / "tokenizer.json").unlink()
    return str(target)


BAD_INPUTS = {
    "prompt longer than the cache": ({"prompts": [[5] * 40], "max_cache_len": 32}, DecodeInputError, "max_cache_len"),
    "cache too small for the new tokens": (
        {"prompts": [[5] * 12], "max_cache_len": 31},
        DecodeInputError,
        "needs a cache of 32 > max_cache_len=31",
    ),
    "draft_len above the maximum": ({"draft_len": 9}, DecodeInputError, "above the drafter's max_draft_len=8"),
    "drafter for another target": ({"drafter": "other"}, DrafterConfigError, "does not fit the target"),
    "empty prompt": ({"prompts": [[5, 6], []]}, DecodeInputError, "prompt 1 is empty"),
    "token id = vocab size": ({"prompts": [[5, hf_oracle.VOCAB]]}, DecodeInputError, "outside the vocabulary"),
    "negative token id": ({"prompts": [[-1, 5]]}, DecodeInputError, "outside the vocabulary"),
    "non-integer token ids": ({"rows": [{"token_ids": [5, "6"]}]}, DecodeInputError, "list of integers"),
    "malformed JSONL": ({"raw": '{"token_ids": [5]}\n{"token_ids": [5\n'}, DecodeInputError, ":2: not valid JSON"),
    "both text and token_ids": ({"rows": [{"token_ids": [5], "text": "hi"}]}, DecodeInputError, "exactly one of"),
    "no prompts at all": ({"raw": "\n"}, DecodeInputError, "holds no prompts"),
    "prompt and prompts_file": ({"prompt": "hi"}, DecodeInputError, "exactly one of"),
    "missing prompts_file": ({"prompts_file": "/nonexistent.jsonl"}, DecodeInputError, "does not exist"),
    "draft_len without a drafter": ({"drafter": ""}, DecodeInputError, "needs --config.drafter.hf_path"),
    "text prompt without a tokenizer": (
        {"prompt": "hi", "no_file": True, "bare": True},
        TokenizerError,
        "has no tokenizer.json",
    ),
    "max_new_tokens 0": ({"max_new_tokens": 0}, DecodeInputError, "max_new_tokens=0"),
    "batch_size 0": ({"batch_size": 0}, DecodeInputError, "batch_size=0"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_before_any_work(case, setup, tmp_path, monkeypatch):
    changes, error, message = BAD_INPUTS[case]
    config = hf_pair.get_config()
    config.target.hf_path = no_tokenizer_target(setup, tmp_path) if changes.get("bare") else str(setup.target)
    config.drafter.hf_path = {"other": str(setup.other_drafter), "": ""}.get(changes.get("drafter"), str(setup.drafter))
    config.draft_len = changes.get("draft_len", DRAFT_LEN)
    config.max_new_tokens = changes.get("max_new_tokens", MAX_NEW)
    config.max_cache_len = changes.get("max_cache_len", 0)
    config.batch_size = changes.get("batch_size", BATCH)
    config.prompt = changes.get("prompt", "")
    config.output = str(tmp_path / "out.json")
    prompts_file = tmp_path / "prompts.jsonl"
    if "raw" in changes:
        prompts_file.write_text(changes["raw"])
    else:
        write_jsonl(prompts_file, changes.get("rows", [{"token_ids": p} for p in changes.get("prompts", [[5, 6]])]))
    config.prompts_file = "" if changes.get("no_file") else changes.get("prompts_file", str(prompts_file))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoding started before the bad input was reported")

    monkeypatch.setattr(cli, "generate", no_decoding)
    with pytest.raises(error, match=message):
        cli.run_decode(config)
    assert not (tmp_path / "out.json").exists()
