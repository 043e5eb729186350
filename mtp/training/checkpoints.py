"""Orbax checkpoints of the train state and the data iterator; resume picks the newest one that restores."""

from __future__ import annotations

import json
import logging
import os
import re

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from mtp.errors import UserError
from mtp.multihost import barrier
from mtp.training.state import TrainState

log = logging.getLogger(__name__)

# Config keys that may change between runs in one workdir (they do not change what is being trained).
RESUMABLE_KEYS = (
    "num_train_steps",
    "log_every_steps",
    "eval_every_steps",
    "eval_batches",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "steps_per_call",
    "mesh",
    "wandb",
    "data.num_workers",
    "eval",  # what eval.py / the main job's evaluation measures, not what is trained
    "evaluation",  # the same section's name in workdirs from before eval.py's sweeps
)
# Of those, the ones the saved data-iterator state depends on (grain's multiprocess prefetch keeps one reader state
# per worker): they may change only while the workdir holds no checkpoint.
ITERATOR_KEYS = ("data.num_workers",)


class WorkdirError(UserError):
    """The workdir belongs to another experiment, or its checkpoints cannot be resumed with this config."""


class CheckpointRestoreError(RuntimeError):
    """The latest checkpoint, and the one before it, failed to restore."""


def _flat(tree) -> dict:
    """Leaves by readable path ("params/layers/0/attn/q"), so checkpoints do not depend on container types."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in leaves}


def _unflat(template, flat: dict):
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree.unflatten(treedef, [flat[jax.tree_util.keystr(p, simple=True, separator="/")] for p, _ in paths])


def _identity(config: ml_collections.ConfigDict) -> dict:
    identity = config.to_dict()
    for key in RESUMABLE_KEYS:
        node = identity
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.get(parent, {})  # a config without that section (the tiny target's has no data.*)
        node.pop(leaf, None)
    return identity


def _lookup(tree: dict, key: str):
    """The value of a dotted key ("data.num_workers"), or None where the tree does not have it."""
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _has_checkpoint(workdir: epath.Path) -> bool:
    directory = workdir / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
    """A workdir as orbax's path type: local directories and remote ones (``gs://bucket/run``) alike."""
    path = epath.Path(workdir)
    return path if "://" in os.fspath(workdir) else path.absolute()


def check_workdir(workdir: epath.Path, config: ml_collections.ConfigDict) -> None:
    """Saves config.json; in a used workdir, refuses a config of another experiment or one that cannot resume it.

    Every process checks; process 0 alone writes, after all have read (a shared or remote workdir has one copy).
    """
    path = workdir / "config.json"
    mine = json.loads(json.dumps(_identity(config), default=list))
    if path.exists():
        saved = json.loads(path.read_text())
        theirs = json.loads(json.dumps(_identity(ml_collections.ConfigDict(saved)), default=list))
        if theirs != mine:
            diffs = sorted(_differences(theirs, mine))
            raise WorkdirError(
                f"{workdir} holds a checkpoint of a different experiment (differs in {diffs[:8]}); use a new "
                "--workdir, or the original config to resume it. Nothing was changed."
            )
        for key in ITERATOR_KEYS if _has_checkpoint(workdir) else ():
            before, now = _lookup(saved, key), _lookup(config.to_dict(), key)
            if before is not None and before != now:
                raise WorkdirError(
                    f"{workdir} has checkpoints whose data-iterator state was saved with {key}={before}, and that "
                    f"state cannot be resumed with {key}={now}: rerun with --config.{key}={before}, or use a new "
                    "--workdir. Nothing was changed."
                )
    barrier("config.json checked")
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config.to_dict(), indent=1, default=list))
    barrier("config.json written")


def _differences(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in set(a) | set(b):
            yield from _differences(a.get(key), b.get(key), f"{prefix}{key}.")
    elif a != b:
        yield prefix.rstrip(".")


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of (train state, data iterator state) under ``workdir/checkpoints``.

    The state is one sharded orbax checkpoint; the data iterator is saved by grain's own handler, each process
    writing and reading its own reader position (``data/process_<i>-of-<n>.json``).
    """

    def __init__(self, workdir: str | os.PathLike, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(workdir_path(workdir) / "checkpoints", options=options)

    def save(self, step: int, state: TrainState, iterator: grain.DatasetIterator) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_flat(state)), data=grain.checkpoint.CheckpointSave(iterator)
        )
        self.manager.save(step, args=args)

    def restore_latest(self, abstract: TrainState, iterator: grain.DatasetIterator) -> TrainState | None:
        """The newest checkpoint's state (None if there is none), ``iterator`` set to its data state; if it fails
        to restore, the one before it, with a warning.

        Only the latest may fall back (a write cut short by a preemption); when the previous one fails too, the
        cause is not one bad file (a changed model, a missing directory), so that is an error naming both.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        errors = []
        for step in steps[:2]:
            self._check_process_count(step)
            try:
                args = ocp.args.Composite(
                    state=ocp.args.StandardRestore(_flat(abstract)), data=grain.checkpoint.CheckpointRestore(iterator)
                )
                return _unflat(abstract, self.manager.restore(step, args=args)["state"])
            except Exception as e:  # any failure to read means this checkpoint is unusable
                errors.append(f"step {step} ({self.directory / str(step)}: {type(e).__name__}: {str(e)[:300]})")
                if len(errors) == 1 and len(steps) > 1:
                    log.warning("Checkpoint at %s could not be restored; trying the one before it.", errors[0])
        if errors:
            tried = ", nor at ".join(errors)
            raise CheckpointRestoreError(
                f"Could not restore the checkpoint at {tried}. Fix the cause or point --workdir elsewhere: training "
                "does not start again from step 0 on its own."
            )
        return None

    def _check_process_count(self, step: int) -> None:
        """Each process resumes its own share of the data: the checkpoint must come from as many processes."""
        data = self.directory / str(step) / "data"
        if not data.is_dir():
            return  # an incomplete checkpoint: restoring it fails, and may fall back
        counts = {m[1] for p in data.iterdir() if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", p.name))}
        if counts and counts != {str(jax.process_count())}:
            raise WorkdirError(
                f"{data} holds the data-iterator state of {'/'.join(sorted(counts))} processes, and this run has "
                f"{jax.process_count()}: each process resumes its own share of the data, so resume with the same "
                "number of processes, or use a new --workdir."
            )

    @property
    def directory(self) -> epath.Path:
        return epath.Path(self.manager.directory)

    @property
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
