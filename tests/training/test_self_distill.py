"""Self-distillation data: the frozen target's own answers, as conversations the training pipeline reads."""

import json
import os

import numpy as np
import pytest

from mtp import sharding as sharding_lib
from mtp.checkpoint import load_target
from mtp.data.chat import ChatTemplate
from mtp.data.pipeline import PipelineConfig, make_eval_batches
from mtp.data.self_distill import prompts_of, regenerate
from mtp.data.sources import load_rows
from mtp.data.tokenizer import load_tokenizer
from mtp.decoding.generate import generate
from mtp.embedded.corpus import ensure_embedded_dataset

pytestmark = pytest.mark.slow


def test_the_target_answers_its_prompts_and_the_pipeline_reads_its_ids(embedded_cache, tmp_path):
    """Rows split over 4 devices (6 prompts in batches of 4, padded to the data-parallel size) answer as
    ``generate`` does; the file keeps the target's own ids, and training reads exactly those."""
    target_dir = embedded_cache / "tiny_target_test"
    mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 4, "tensor": 1})
    target = load_target(target_dir, mesh=mesh)
    template = ChatTemplate(load_tokenizer(target_dir))
    rows = [load_rows([str(ensure_embedded_dataset(embedded_cache / "data").eval)])[i] for i in range(6)]
    path = regenerate(target, template, rows, tmp_path / "sd.jsonl", max_new_tokens=16, batch_size=4, mesh=mesh)

    written = [json.loads(line) for line in path.read_text().splitlines()]
    messages = prompts_of(rows)
    prompts = [template.prompt_ids(p) for p in messages]
    assert len(written) == len(prompts) == 6
    expected, _ = generate(load_target(target_dir), None, prompts, max_new_tokens=16, stop_tokens=template.stop_tokens)
    for row, turns, prompt, output in zip(written, messages, prompts, expected, strict=True):
        assert row == {"messages": turns, "prompt_ids": prompt, "answer_ids": output.token_ids}
    assert prompts_of(written) == messages, "evaluation finds the same prompts in the self-distilled rows"

    batches = make_eval_batches(
        load_rows([str(path)]), template, PipelineConfig(seq_len=256, global_batch_size=1), num_batches=1
    )
    tokens, mask = batches[0]["tokens"][0], batches[0]["loss_mask"][0]
    first = written[0]["prompt_ids"] + written[0]["answer_ids"]
    np.testing.assert_array_equal(tokens[: len(first)], first)
    np.testing.assert_array_equal(
        mask[: len(first)], [0] * len(written[0]["prompt_ids"]) + [1] * (len(first) - len(written[0]["prompt_ids"]))
    )
    mtime = os.stat(path).st_mtime_ns
    regenerate(target, template, rows, path, max_new_tokens=16, batch_size=4, mesh=mesh)
    assert os.stat(path).st_mtime_ns == mtime, "a finished data set is reused, not regenerated"


def test_a_prompt_budget_is_spread_over_the_data_set():
    """``max_prompts`` takes evenly spaced conversations in order, so a file sorted by kind keeps every kind."""
    rows = [
        {"messages": [{"role": "user", "content": f"{kind} {i}"}, {"role": "model", "content": "a"}]}
        for kind, count in (("docs", 6), ("code", 18))
        for i in range(count)
    ]
    rows.insert(3, {"text": "plain text has no prompt"})
    picked = [p[0]["content"] for p in prompts_of(rows, max_prompts=8)]
    assert picked == ["docs 0", "docs 3", "code 0", "code 3", "code 6", "code 9", "code 12", "code 15"]
    assert len(prompts_of(rows)) == len(prompts_of(rows, max_prompts=100)) == 24
