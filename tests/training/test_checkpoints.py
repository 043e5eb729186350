"""Resuming: only a broken latest checkpoint falls back (to the one before it); any other failure is an error."""

import logging

import grain
import jax.numpy as jnp
import pytest

from mtp.training.checkpoints import Checkpointer, CheckpointRestoreError, WorkdirError
from mtp.training.state import TrainState


def state(step: int, width: int = 3) -> TrainState:
    return TrainState(jnp.asarray(step), {"w": jnp.full((width,), float(step))}, {}, {"mu": jnp.zeros((width,))})


def reader(position: int = 0) -> grain.DatasetIterator:
    """A data iterator that has yielded ``position`` elements (its next one is ``position``)."""
    iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
    for _ in range(position):
        next(iterator)
    return iterator


def corrupt(workdir, step: int) -> None:
    for path in (workdir / "checkpoints" / str(step)).rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "state" in str(path):
            path.write_bytes(b"\0" * 7)


@pytest.fixture
def saved(tmp_path):
    """A workdir with checkpoints at steps 2 and 4."""
    checkpointer = Checkpointer(tmp_path, keep=3)
    for step in (2, 4):
        checkpointer.save(step, state(step), reader(step))
    checkpointer.close()
    return tmp_path


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(saved, caplog):
    corrupt(saved, 4)
    caplog.set_level(logging.WARNING)
    iterator = reader()
    restored = Checkpointer(saved, keep=3).restore_latest(state(0), iterator)
    assert int(restored.step) == 2 and next(iterator) == 2
    assert any("step 4 (" in r.getMessage() and "could not be restored" in r.getMessage() for r in caplog.records)


def test_two_failing_checkpoints_are_an_error_naming_them(saved):
    corrupt(saved, 4)
    corrupt(saved, 2)
    with pytest.raises(CheckpointRestoreError, match=r"step 4 \(.*checkpoints/4.*nor at step 2 \("):
        Checkpointer(saved, keep=3).restore_latest(state(0), reader())


def test_a_state_that_no_longer_fits_is_an_error_not_a_fresh_start(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep=3)
    checkpointer.save(2, state(2), reader(2))
    checkpointer.close()
    with pytest.raises(CheckpointRestoreError, match=r"step 2 \(.*checkpoints/2"):
        Checkpointer(tmp_path, keep=3).restore_latest(state(0, width=5), reader())


def test_an_empty_workdir_starts_fresh(tmp_path):
    assert Checkpointer(tmp_path, keep=3).restore_latest(state(0), reader()) is None


def test_each_process_saves_its_own_data_state_and_resumes_only_with_as_many(saved):
    data = saved / "checkpoints" / "4" / "data"
    assert (data / "process_0-of-1.json").is_file()
    for i in range(2):  # as if two processes had saved it
        (data / f"process_{i}-of-2.json").write_text((data / "process_0-of-1.json").read_text())
    (data / "process_0-of-1.json").unlink()
    with pytest.raises(WorkdirError, match=r"data-iterator state of 2 processes, and this run has 1"):
        Checkpointer(saved, keep=3).restore_latest(state(0), reader())
