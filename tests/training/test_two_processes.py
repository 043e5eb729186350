"""Training on two JAX processes (localhost, gloo collectives) is training on one: self-distillation is decoded
by both and written once, and a run stopped and resumed, each process with its own data-iterator state, logs the
one-process run's losses and exports the same drafter."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from mtp import sharding as sharding_lib
from mtp.checkpoint import load_target
from mtp.data.self_distill import regenerate
from mtp.training import setup, trainer
from tests.codegen import XLA_FLAGS

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).parents[2]


def two_process_config():
    """configs/tiny.py:test, shallower (to compile sooner), over 4 devices (2 per process): parameters and batches
    sharded across the processes. Its packed rows hold one example each (64 tokens), so one process's global
    batch holds the same examples as the two processes' halves."""
    from configs import tiny

    config = tiny.get_config("test")
    config.update(num_train_steps=4, log_every_steps=1, eval_every_steps=4, checkpoint_every_steps=2, eval_batches=1)
    # Trained on the corpus: this test self-distills on its own (``self_distill``) and compares that file; answers
    # decoded under the workers' and this process's compiler settings could differ on a near-tie of the test target.
    config.data.self_distill.enabled = False
    config.drafter.num_layers = 1
    config.loss.depth = 2
    config.mesh.update(data=1, fsdp=4, tensor=1)
    return config


def self_distill(workdir: pathlib.Path) -> None:
    """The target's answers to 6 held-out prompts (8 tokens each), decoded in batches of 4 split over the devices."""
    config = two_process_config()
    mesh = sharding_lib.make_mesh(config.mesh.to_dict())
    target_dir = setup.target_directory(config, workdir)
    target, template = load_target(target_dir, mesh=mesh), setup.chat_template(config, target_dir)
    rows = setup.data_rows(config, workdir, target, template)[1]
    regenerate(
        target, template, rows, workdir / "self_distill.jsonl", max_new_tokens=8, batch_size=4, max_prompts=6, mesh=mesh
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_processes(
    workdir: pathlib.Path, compile_cache: pathlib.Path, preempt_at: int
) -> list[tuple[subprocess.Popen, pathlib.Path]]:
    """One launch of both processes: self-distill, train until preempted during step ``preempt_at``, train again
    (resuming); the resumed run's compilations come from the shared compilation cache. Each process's stderr goes
    to a file (a pipe nobody reads until both are done could fill and stall it)."""
    env = os.environ | {
        # The suite's cheap code generation (tests/conftest.py); results move by ulps (~1e-7), far inside the
        # tolerances below.
        "XLA_FLAGS": XLA_FLAGS.replace("device_count=8", "device_count=2"),
        "OMP_NUM_THREADS": "1",
        "JAX_COMPILATION_CACHE_DIR": str(compile_cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    port = str(free_port())
    started = []
    for i in range(2):
        log = workdir.parent / f"process_{i}.stderr"
        with log.open("w") as stderr:
            command = [sys.executable, "-m", "tests.training.two_process_worker", str(i), port, str(workdir)]
            proc = subprocess.Popen(
                [*command, str(preempt_at)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr
            )
        started.append((proc, log))
    return started


def wait_for(started: list[tuple[subprocess.Popen, pathlib.Path]]) -> None:
    try:
        for proc, _ in started:
            proc.wait(timeout=420)
    finally:
        for proc, _ in started:
            proc.kill()
    for proc, log in started:
        assert proc.returncode == 0, log.read_text()[-3000:]


def logged(workdir: pathlib.Path) -> list[dict]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records]


def assert_same_run(two: list[dict], one: list[dict]) -> None:
    """The same steps and metrics; floats to the rounding of a different all-reduce order (gloo across processes)."""
    assert [sorted(r) for r in two] == [sorted(r) for r in one]
    for a, b in zip(two, one, strict=True):
        for key in b:
            np.testing.assert_allclose(a[key], b[key], rtol=2e-5, atol=1e-6, err_msg=f"step {b['step']}: {key}")


def tensors(workdir: pathlib.Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(workdir / "hf" / "model.safetensors")


def test_two_processes_stop_resume_and_match_one(embedded_cache, tmp_path):
    two = tmp_path / "two"
    procs = start_two_processes(two, tmp_path / "compile_cache", preempt_at=4)
    try:  # the one-process reference, while the two processes run
        one = tmp_path / "one"
        self_distill(one)
        trainer.train(two_process_config(), one)
    finally:
        wait_for(procs)
    for i in range(2):  # stopped with step 3 logged and the checkpoint of step 2, then resumed from it
        report = json.loads((two / f"process_{i}.json").read_text())
        assert report == {"stopped": {"checkpoints": [2], "logged": [1, 2, 3]}, "resumed_at": [2]}, i
    assert (two / "self_distill.jsonl").read_text() == (one / "self_distill.jsonl").read_text()
    data = two / "checkpoints" / "2" / "data"
    assert sorted(p.name for p in data.glob("process_*")) == ["process_0-of-2.json", "process_1-of-2.json"]
    assert [r["step"] for r in logged(two)] == [1, 2, 3, 4]  # step 3, logged before the stop, once
    assert_same_run(logged(two), logged(one))
    expected, exported = tensors(one), tensors(two)
    assert exported.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(exported[key], expected[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert (two / "hf" / "config.json").read_text() == (one / "hf" / "config.json").read_text()
