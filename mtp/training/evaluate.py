"""``evaluate(config, workdir)``: what ``eval.py`` does: a drafter's held-out agreement and its real speculative
decoding, swept as ``config.eval`` says (``mtp.evaluation.config``).

The drafter is a training run's (``WORKDIR/hf``) or any ``gemma4_assistant`` directory (``eval.drafter_path``),
against the config's target or any Gemma 4 directory (``eval.target_path``). Results merge into
``WORKDIR/eval/results.json`` (or ``eval.output_dir``; schema in ``mtp.evaluation.results``), beside results.md and
the plots.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from mtp.checkpoint import load_target
from mtp.checkpoint.safetensors_io import CheckpointError
from mtp.data.chat import ChatTemplate
from mtp.data.sources import load_rows
from mtp.evaluation import prompts as prompt_sets
from mtp.evaluation import results, runner, wandb_log
from mtp.evaluation.config import EvalConfigError, check_draft_lens, sweep_settings
from mtp.training import setup
from mtp.training.checkpoints import workdir_path
from mtp.training.config import loss_config
from mtp.training.loss import simulated_acceptance_length
from mtp.training.metrics import is_remote, mean_metrics
from mtp.training.objectives import Distillation
from mtp.training.state import TrainState, split_trainable
from mtp.training.step import eval_step

log = logging.getLogger(__name__)


def held_out_agreement(config: ml_collections.ConfigDict, target, drafter, rows, template: ChatTemplate) -> dict:
    """Top-1 agreement per depth on the held-out batches, by the trainer's eval step, averaged over real tokens
    (a batch padded with empty rows weighs what its tokens weigh, not a whole batch of zeros)."""
    graph, params, extra = split_trainable(drafter)
    target_graph, target_state = nnx.split(target)
    state = TrainState(jnp.zeros((), jnp.int32), params, extra, ())
    step = jax.jit(
        functools.partial(
            eval_step,
            graph=graph,
            objective=Distillation(target_graph, loss_config(config), jnp.dtype(config.compute_dtype)),
        )
    )
    batches = setup.eval_batches(config, rows, template)
    metrics = mean_metrics([step(state, target_state, batch) for batch in batches])
    agreement = np.asarray(metrics["top1_agreement"], np.float64)
    return {
        "top1_agreement": agreement.tolist(),
        "simulated_acceptance_length": float(simulated_acceptance_length(jnp.asarray(agreement))),
        "trained_tokens": int(sum(int(np.sum(b["loss_mask"])) for b in batches)),
    }


def _check_local(config, workdir: epath.Path | None) -> None:
    """Evaluation reads the models and writes its results on this machine's disk: a remote path (``gs://...``, say
    a training run's workdir) is refused before anything is loaded, saying what to copy and pass instead."""
    ev = config.eval
    target = ev.target_path or config.target.hf_path
    drafter = ev.drafter_path or (workdir and workdir / "hf")
    output = ev.output_dir or (workdir and workdir / "eval")
    if target and is_remote(target):
        raise EvalConfigError(
            f"{target}: the target is remote, and evaluation reads it from a local disk: copy it (`gcloud storage "
            f"cp -r {target} /local/target`) and pass --config.eval.target_path=/local/target."
        )
    if drafter and is_remote(drafter):
        raise EvalConfigError(
            f"{drafter}: the drafter is remote, and evaluation reads it from a local disk: copy it (`gcloud storage "
            f"cp -r {drafter} /local/drafter`) and pass --config.eval.drafter_path=/local/drafter and a local "
            "--config.eval.output_dir."
        )
    if output and is_remote(output):
        raise EvalConfigError(
            f"{output}: the results directory is remote, and evaluation writes to a local disk: pass a local "
            "--config.eval.output_dir."
        )


def _paths(config, workdir: epath.Path | None) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    ev = config.eval
    if workdir is None and not (ev.drafter_path and ev.output_dir):
        raise EvalConfigError(
            "Give --workdir (a training run: its hf/ drafter, results in WORKDIR/eval), or both "
            "--config.eval.drafter_path and --config.eval.output_dir."
        )
    _check_local(config, workdir)
    target_dir = pathlib.Path(ev.target_path) if ev.target_path else setup.target_directory(config, workdir)
    if not (target_dir / "config.json").is_file():
        raise CheckpointError(f"{target_dir / 'config.json'}: no config.json; point at a Gemma 4 model directory.")
    drafter_dir = pathlib.Path(ev.drafter_path or workdir / "hf")
    if not (drafter_dir / "config.json").is_file():
        raise EvalConfigError(
            f"{drafter_dir} holds no drafter (no config.json): train first, or point --config.eval.drafter_path at "
            "a gemma4_assistant directory."
        )
    return target_dir, drafter_dir, pathlib.Path(ev.output_dir or workdir / "eval")


def _held_out_rows(config, workdir, target, template):
    """The run's held-out rows; the embedded corpus's when the config trains on it or names no data."""
    if config.data.embedded or not config.data.train_files or workdir is None:
        from mtp.embedded.corpus import ensure_embedded_dataset

        return prompt_sets.EMBEDDED_HELD_OUT, load_rows(
            [str(ensure_embedded_dataset(setup.cache_root() / "data").eval)]
        )
    return "held_out", setup.data_rows(config, workdir, target, template)[1]


def evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None, *, progress: bool = True
) -> dict:
    """Checks every input, then held-out agreement (a training run's drafter) and the sweeps; returns the new
    records, the offline metrics and results.json's path."""
    ev = config.eval
    settings = sweep_settings(ev)
    workdir = workdir_path(workdir) if workdir else None  # a remote one holds the run's data, not the drafter
    target_dir, drafter_dir, output_dir = _paths(config, workdir)
    results.check_pair(output_dir / runner.RESULTS, target=target_dir, drafter=drafter_dir)
    template = setup.chat_template(config, target_dir)
    pool = None
    if ev.prompts_file:  # read and filtered before any model is loaded: a bad file fails in a second
        prompt_set = prompt_sets.prompt_set_name(ev.prompts_file)
        pool = prompt_sets.select(
            prompt_sets.read_prompt_file(ev.prompts_file, template), ev.categories, ev.prompts_file
        )
    dtype = jnp.dtype(config.target.dtype)
    target = load_target(target_dir, dtype=dtype)
    drafter = runner.load_drafter(drafter_dir, target, max_draft_len=config.drafter.max_draft_len, dtype=dtype)
    check_draft_lens(settings, drafter.config.max_draft_len, drafter_dir)
    rows = None
    if pool is None:
        prompt_set, rows = _held_out_rows(config, workdir, target, template)
        source = f"the {prompt_set} prompts"
        pool = prompt_sets.select(
            prompt_sets.conversation_prompts(rows, template, ev.num_prompts), ev.categories, source
        )
    offline = None
    if ev.offline and workdir is not None and not ev.drafter_path and rows is not None:
        offline = held_out_agreement(config, target, drafter, rows, template)
        log.info(
            "held-out top-1 agreement per depth %s (simulated τ %.2f, %d tokens)",
            np.round(offline["top1_agreement"], 3),
            offline["simulated_acceptance_length"],
            offline["trained_tokens"],
        )
    group = wandb_log.run_group(config, workdir, output_dir)
    new = runner.run_sweeps(
        target,
        drafter,
        pool,
        prompt_set=prompt_set,
        settings=settings,
        template=template,
        output_dir=output_dir,
        target_dir=target_dir,
        drafter_dir=drafter_dir,
        extra={"offline": offline} if offline else None,
        seed=config.seed,
        progress=progress,
        after=lambda records, pngs: wandb_log.log_results(
            config, group=group, directory=output_dir, records=records, plots=pngs
        ),
    )
    return {"records": new, "offline": offline, "path": str(output_dir / runner.RESULTS)}
