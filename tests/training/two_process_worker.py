"""One of the two processes of ``test_two_processes.py``: ``python -m tests.training.two_process_worker ID PORT
WORKDIR PREEMPT_AT`` self-distills, trains the test config over both processes' devices, is stopped during step
``PREEMPT_AT`` (computed, neither logged nor saved: a preemption between checkpoints), then makes the same ``train``
call again, which resumes from the workdir's last checkpoint. One launch does both, so each process compiles once;
the resumed run still builds everything anew from what is on disk (config, checkpoint, its own data-iterator state).

It writes ``WORKDIR/process_ID.json``: what the workdir held when it stopped and the step the second call resumed at.
"""

import json
import logging
import pathlib
import sys

import jax


class Preempted(Exception):
    pass


class ResumeLog(logging.Handler):
    """Remembers the trainer's "Resumed from the checkpoint at step N" line."""

    def __init__(self):
        super().__init__()
        self.steps = []

    def emit(self, record):
        if record.getMessage().startswith("Resumed from the checkpoint at step"):
            self.steps.append(int(record.args[0]))


def main(process_id: int, port: str, workdir: str, preempt_at: int) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from mtp.training import trainer
    from tests.training.test_two_processes import self_distill, two_process_config

    workdir = pathlib.Path(workdir)
    self_distill(workdir)

    real_advance, calls = trainer.MetricsWriter.advance, [0]

    def advance(self, steps=1):
        calls[0] += 1
        if calls[0] == preempt_at:
            raise Preempted
        real_advance(self, steps)

    trainer.MetricsWriter.advance = advance
    try:
        trainer.train(two_process_config(), workdir)
        raise AssertionError(f"training was not stopped at step {preempt_at}")
    except Preempted:
        pass
    trainer.MetricsWriter.advance = real_advance
    stopped = {
        "checkpoints": sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()),
        "logged": [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()],
    }

    resumes = ResumeLog()
    logging.getLogger(trainer.__name__).addHandler(resumes)
    logging.getLogger(trainer.__name__).setLevel(logging.INFO)
    trainer.train(two_process_config(), workdir)  # the same call again, as a restarted job would make it
    report = {"stopped": stopped, "resumed_at": resumes.steps}
    (workdir / f"process_{process_id}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))
