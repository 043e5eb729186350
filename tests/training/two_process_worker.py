"""One of the two processes of ``test_two_processes.py``: ``python -m tests.training.two_process_worker ID PORT
WORKDIR STOP_AFTER`` trains the test config over both processes' devices, stopping after ``STOP_AFTER`` steps
when it is positive (as a preempted job would, between checkpoints); that first launch self-distills first."""

import pathlib
import sys

import jax


def main(process_id: int, port: str, workdir: str, stop_after: int) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from mtp.training import trainer
    from tests.training.test_two_processes import self_distill, two_process_config

    if stop_after:
        self_distill(pathlib.Path(workdir))
        real, calls = trainer.MetricsWriter.advance, [0]

        def advance(self, steps=1):
            calls[0] += 1
            if calls[0] == stop_after:
                raise SystemExit(f"stopped after step {stop_after}")
            real(self, steps)

        trainer.MetricsWriter.advance = advance
    trainer.train(two_process_config(), workdir)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))
