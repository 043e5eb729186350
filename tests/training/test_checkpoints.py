"""Resuming: only a broken latest checkpoint falls back (to the one before it); any other failure is an error."""

import logging

import jax.numpy as jnp
import pytest

from mtp.training.checkpoints import Checkpointer, CheckpointRestoreError
from mtp.training.state import TrainState


def state(step: int, width: int = 3) -> TrainState:
    return TrainState(jnp.asarray(step), {"w": jnp.full((width,), float(step))}, {}, {"mu": jnp.zeros((width,))})


def corrupt(workdir, step: int) -> None:
    for path in (workdir / "checkpoints" / str(step)).rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "state" in str(path):
            path.write_bytes(b"\0" * 7)


@pytest.fixture
def saved(tmp_path):
    """A workdir with checkpoints at steps 2 and 4."""
    checkpointer = Checkpointer(tmp_path, keep=3)
    for step in (2, 4):
        checkpointer.save(step, state(step), {"position": step})
    checkpointer.close()
    return tmp_path


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(saved, caplog):
    corrupt(saved, 4)
    caplog.set_level(logging.WARNING)
    restored, data = Checkpointer(saved, keep=3).restore_latest(state(0))
    assert int(restored.step) == 2 and data == {"position": 2}
    assert any("step 4 (" in r.getMessage() and "could not be restored" in r.getMessage() for r in caplog.records)


def test_two_failing_checkpoints_are_an_error_naming_them(saved):
    corrupt(saved, 4)
    corrupt(saved, 2)
    with pytest.raises(CheckpointRestoreError, match=r"step 4 \(.*checkpoints/4.*nor at step 2 \("):
        Checkpointer(saved, keep=3).restore_latest(state(0))


def test_a_state_that_no_longer_fits_is_an_error_not_a_fresh_start(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep=3)
    checkpointer.save(2, state(2), {"position": 2})
    checkpointer.close()
    with pytest.raises(CheckpointRestoreError, match=r"step 2 \(.*checkpoints/2"):
        Checkpointer(tmp_path, keep=3).restore_latest(state(0, width=5))


def test_an_empty_workdir_starts_fresh(tmp_path):
    assert Checkpointer(tmp_path, keep=3).restore_latest(state(0)) is None
