"""Self-distillation data: the frozen target's own answers, as conversations the training pipeline reads."""

import json

import pytest

from mtp.checkpoint import load_target
from mtp.data.chat import ChatTemplate
from mtp.data.pipeline import PipelineConfig, make_eval_batches
from mtp.data.self_distill import prompts_of, regenerate
from mtp.data.sources import load_rows
from mtp.data.tokenizer import load_tokenizer
from mtp.decoding.generate import generate
from mtp.embedded.corpus import ensure_embedded_dataset

pytestmark = pytest.mark.slow


def test_the_target_answers_its_prompts_and_the_pipeline_reads_them(embedded_cache, tmp_path):
    target_dir = embedded_cache / "tiny_target_test"
    target = load_target(target_dir)
    template = ChatTemplate(load_tokenizer(target_dir))
    rows = [load_rows([str(ensure_embedded_dataset(embedded_cache / "data").eval)])[i] for i in range(6)]
    path = regenerate(target, template, rows, tmp_path / "sd.jsonl", max_new_tokens=16, batch_size=4)

    written = [json.loads(line) for line in path.read_text().splitlines()]
    prompts = prompts_of(rows)
    assert len(written) == len(prompts) == 6
    expected, _ = generate(
        target, None, [template.prompt_ids(p) for p in prompts], max_new_tokens=16, stop_tokens=template.stop_tokens
    )
    for row, prompt, output in zip(written, prompts, expected, strict=True):
        assert row["messages"][:-1] == prompt
        assert row["messages"][-1]["role"] == "model"
        answer = [t for t in output.token_ids if t not in template.stop_tokens]
        assert row["messages"][-1]["content"] == template.tokenizer.decode(answer, skip_special_tokens=True)

    batches = make_eval_batches(
        load_rows([str(path)]), template, PipelineConfig(seq_len=64, global_batch_size=2), num_batches=1
    )
    assert batches[0]["loss_mask"].sum() > 0
    mtime = path.stat().st_mtime_ns
    regenerate(target, template, rows, path, max_new_tokens=16, batch_size=4)
    assert path.stat().st_mtime_ns == mtime, "a finished data set is reused, not regenerated"
