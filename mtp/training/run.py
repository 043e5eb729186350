"""``run(config, workdir)``: what ``train.py`` does: check the workdir's target, train, then evaluate if asked.

A workdir remembers the target and tokenizer it was trained against (``WORKDIR/target.json``: the target
directory's config.json and tokenizer.json digests); a later run with another target or tokenizer (say, after the
embedded target was rebuilt) is refused before anything in the workdir changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib

import jax
import ml_collections

from mtp.checkpoint.safetensors_io import CheckpointError
from mtp.multihost import barrier
from mtp.training import setup
from mtp.training.checkpoints import WorkdirError, workdir_path

log = logging.getLogger(__name__)
TARGET_FILE = "target.json"


def _digest(path: pathlib.Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def target_identity(config: ml_collections.ConfigDict, target_dir: pathlib.Path) -> dict:
    """What the drafter is trained against: the target's config.json and the tokenizer's digests."""
    if not (target_dir / "config.json").is_file():  # before the workdir records anything about it
        raise CheckpointError(f"{target_dir / 'config.json'}: no config.json; point at a Hugging Face model directory.")
    tokenizer = pathlib.Path(config.data.tokenizer or target_dir)
    tokenizer = tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer
    return {"target_config_sha256": _digest(target_dir / "config.json"), "tokenizer_sha256": _digest(tokenizer)}


def check_target(workdir: pathlib.Path, identity: dict, target_dir: pathlib.Path) -> None:
    """Records ``identity`` in a new workdir; refuses a used workdir made for another target or tokenizer."""
    path = workdir / TARGET_FILE
    if path.is_file():
        theirs = json.loads(path.read_text())
        differs = sorted(k for k in identity if theirs.get(k) != identity[k])
        if differs:
            raise WorkdirError(
                f"{workdir} was trained against another target or tokenizer ({', '.join(differs)} differ: it was "
                f"{theirs.get('target_dir')}, now {target_dir}). Its drafter does not fit this target; use a new "
                "--workdir. Nothing was changed."
            )
        return
    if (workdir / "config.json").is_file():
        raise WorkdirError(
            f"{workdir} holds a run that does not say which target it was trained against (no {TARGET_FILE}); it may "
            "predate the current embedded target. Use a new --workdir. Nothing was changed."
        )
    barrier("target.json checked")  # every process has read, one writes
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"target_dir": str(target_dir), **identity}, indent=1) + "\n")


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, progress: bool = True) -> dict:
    """Trains (resuming where the workdir left off), then evaluates when ``config.eval.after_training``."""
    from mtp.training.trainer import train

    workdir = workdir_path(workdir)  # gs:// and other remote workdirs too
    target_dir = setup.target_directory(config, workdir)
    check_target(workdir, target_identity(config, target_dir), target_dir)
    summary = {"train": train(config, workdir)}
    if config.eval.after_training:
        from mtp.training.evaluate import evaluate

        summary["eval"] = evaluate(config, workdir, progress=progress)
    return summary
