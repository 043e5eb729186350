"""The training loop, sharded, resumable and logged: ``fit`` trains any module for any objective
(``mtp.training.objectives``); ``train(config, workdir)`` distills a drafter from a frozen Gemma 4 target with it,
and the embedded tiny target (``mtp.embedded.target``) is pretrained with it."""

from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from mtp import sharding as sharding_lib
from mtp.checkpoint import load_target
from mtp.drafter import save_drafter
from mtp.errors import UserError
from mtp.multihost import sum_over_processes
from mtp.training import setup
from mtp.training.checkpoints import Checkpointer, check_workdir, workdir_path
from mtp.training.config import loss_config
from mtp.training.metrics import MetricsWriter, mean_metrics, to_python
from mtp.training.objectives import Distillation, Objective
from mtp.training.state import (
    abstract_like,
    batch_sharding,
    init_state,
    make_optimizer,
    replicated,
    split_trainable,
)
from mtp.training.step import jit_eval_step, jit_train_step, jit_train_steps

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the message names the step and the last good checkpoint."""


BATCH_FIELDS = ("tokens", "loss_mask", "segment_ids", "positions")


def _device_batch(batch: dict, sharding: jax.sharding.NamedSharding) -> dict:
    """This process's rows of the global batch, assembled into one global array per field."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k])) for k in BATCH_FIELDS}


def _stacked(batches: list[dict]) -> dict:
    """Several steps' batches as one, on a new leading axis (one batch as it is)."""
    if len(batches) == 1:
        return batches[0]
    return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in BATCH_FIELDS}


def check_steps_per_call(config: ml_collections.ConfigDict, start_step: int) -> int:
    """``config.steps_per_call``, once it divides the run's length, its periods and the step it resumes from."""
    # .get: the tiny target's recipe (configs/tiny_target.py) has no such key, and adding one would change its hash.
    per_call = config.get("steps_per_call", 1)
    if per_call < 1:
        raise UserError(f"steps_per_call={per_call}; set config.steps_per_call to 1 or more.")
    periods = ("num_train_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps")
    if bad := [f"{name}={config[name]}" for name in periods if config[name] % per_call]:
        raise UserError(
            f"steps_per_call={per_call} must divide {', '.join(bad)} (steps run {per_call} per call); change "
            "config.steps_per_call or those."
        )
    if start_step % per_call:
        raise UserError(
            f"the workdir's checkpoint is at step {start_step}, which steps_per_call={per_call} does not divide; "
            "resume with a config.steps_per_call that divides it."
        )
    return per_call


def check_finite(unchecked: list[tuple], last_good: int | None, workdir: epath.Path) -> None:
    """Raises naming the first step since the last check whose loss or gradient norm was NaN or Inf.

    ``unchecked``: per call, the number of its first step and its steps' finite flags, losses and gradient norms
    (scalars for one step per call, else one entry per step)."""
    for first, finite, loss, grad_norm in jax.device_get(unchecked):
        finite, loss, grad_norm = (np.atleast_1d(x) for x in (finite, loss, grad_norm))
        if (bad := np.flatnonzero(~finite)).size:
            i = bad[0]
            raise NonFiniteLossError(
                f"loss is {loss[i]} (gradient norm {grad_norm[i]}) at step {first + i}; stopping (that step and any "
                f"later one left the parameters unchanged). The last good checkpoint is "
                f"{'step ' + str(last_good) if last_good is not None else 'none'} in {workdir / 'checkpoints'}."
            )


def per_step(history: list[dict], per_call: int) -> list[dict]:
    """The metrics of each step, from calls that ran ``per_call`` steps each (stacked on a leading axis)."""
    if per_call == 1:
        return history
    return [{k: v[i] for k, v in call.items()} for call in jax.device_get(history) for i in range(per_call)]


def _log_compiled(name: str, compiled) -> None:
    memory = compiled.memory_analysis()
    if memory is not None:
        log.info(
            "%s compiled: per-device memory arguments %.1f MiB, outputs %.1f MiB, temporaries %.1f MiB",
            name,
            memory.argument_size_in_bytes / 2**20,
            memory.output_size_in_bytes / 2**20,
            memory.temp_size_in_bytes / 2**20,
        )


def training_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """``config.mesh`` over this job's devices, once the batch is known to split over its processes and mesh."""
    if config.batch_size % jax.process_count():
        raise UserError(
            f"batch_size={config.batch_size} must divide over the {jax.process_count()} processes; change "
            "config.batch_size."
        )
    mesh = sharding_lib.make_mesh(config.mesh.to_dict())
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % data_parallel:
        raise UserError(
            f"batch_size={config.batch_size} is not divisible by the data-parallel mesh size "
            f"{data_parallel} (data x fsdp); change config.batch_size or config.mesh."
        )
    return mesh


def fit(
    config: ml_collections.ConfigDict,
    workdir: epath.Path,
    module: nnx.Module,
    objective: Objective,
    *,
    mesh: jax.sharding.Mesh,
    train_iter,
    eval_batches: list[dict],
    frozen_state: nnx.State | None = None,
    eval_at_start: bool = False,
    progress: bool = True,
    name: str = "train",
) -> tuple[nnx.Module, dict]:
    """Trains ``module``'s parameters for ``objective`` until ``config.num_train_steps``, resuming from the
    workdir's newest checkpoint (its data iterator included); returns the trained module and the last logged
    metrics. Every process calls it; the caller has checked the workdir (``check_workdir``).

    ``frozen_state``: the frozen model the objective reads (sharded by the logical-axis rules, never changed).
    ``eval_at_start``: a run that starts at step 0 first logs the held-out metrics of the untrained module as step 0.
    ``progress``, ``name``: whether process 0 shows a progress bar, and its label.
    """
    graph, params, extra = split_trainable(module)
    tx, schedule = make_optimizer(config)
    state, state_sh = init_state(params, extra, tx, mesh)
    checkpointer = Checkpointer(workdir, config.keep_checkpoints)
    restored = checkpointer.restore_latest(abstract_like(state, state_sh), train_iter)
    if restored is not None:
        state = restored
        log.info("Resumed from the checkpoint at step %d.", jax.device_get(state.step))
    start_step = int(jax.device_get(state.step))

    frozen_state = nnx.State({}) if frozen_state is None else frozen_state
    batch_sh, metrics_sh = batch_sharding(mesh), replicated(mesh)
    frozen_sh = sharding_lib.state_shardings(frozen_state, mesh)
    static = dict(graph=graph, objective=objective)
    per_call = check_steps_per_call(config, start_step)
    if per_call == 1:
        steps_sh, jit_steps = batch_sh, jit_train_step
    else:  # the steps' batches stacked on a leading axis, not split
        steps_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *batch_sh.spec))
        jit_steps = jit_train_steps
    step_fn = jit_steps(state_sh, frozen_sh, steps_sh, metrics_sh, tx=tx, schedule=schedule, **static)
    eval_fn = jit_eval_step(state_sh, frozen_sh, batch_sh, metrics_sh, **static)
    eval_batches = [_device_batch(b, batch_sh) for b in eval_batches]

    def evaluate() -> dict:
        evals = [eval_fn(state, frozen_state, b) for b in eval_batches]
        return {f"eval_{k}": v for k, v in to_python(mean_metrics(evals)).items()}

    is_main = jax.process_index() == 0
    writer = MetricsWriter(
        workdir,
        config,
        start_step=start_step,
        total=config.num_train_steps,
        is_main=is_main,
        progress=progress,
        name=name,
    )
    history, unchecked, last_good = [], [], checkpointer.latest_step
    summary: dict = {}
    compiled = None
    try:
        if eval_at_start and start_step == 0:
            summary = evaluate()
            writer.write(0, summary)
        last_time = time.perf_counter()
        for step in range(start_step, config.num_train_steps, per_call):
            batch = _device_batch(_stacked([next(train_iter) for _ in range(per_call)]), steps_sh)
            if compiled is None:  # compile first, and say how much memory the step needs
                compiled = step_fn.lower(state, frozen_state, batch).compile()
                _log_compiled("train step" if per_call == 1 else f"train steps ({per_call} per call)", compiled)
            state, metrics = compiled(state, frozen_state, batch)
            done = step + per_call
            # Nothing here reads a device value: the host runs ahead of the device until it logs, evaluates or saves.
            unchecked.append((step + 1, metrics.pop("finite"), metrics["loss"], metrics["grad_norm"]))
            history.append(metrics)
            writer.advance(per_call)
            last = done == config.num_train_steps
            log_now = done % config.log_every_steps == 0 or last
            eval_now = done % config.eval_every_steps == 0 or last
            save_now = done % config.checkpoint_every_steps == 0 or last
            if not (log_now or eval_now or save_now):
                continue
            check_finite(unchecked, last_good, workdir)  # before anything is logged or saved
            unchecked = []
            record = {}
            if log_now:
                record = to_python(mean_metrics(per_step(history, per_call)))
                now = time.perf_counter()
                trained = len(history) * per_call * config.batch_size * config.seq_len
                record["tokens_per_second"] = trained / (now - last_time)
                record["truncated_examples"] = sum_over_processes(train_iter.num_truncated)
                history, last_time = [], now
            if eval_now:
                start = time.perf_counter()
                record |= evaluate()
                last_time += time.perf_counter() - start  # tokens_per_second counts training time only
            if record:
                writer.write(done, record)
                summary |= record
            if save_now:
                checkpointer.save(done, state, train_iter)
                last_good = done
    finally:
        writer.close()
        checkpointer.close()
        train_iter.close()
    return nnx.merge(graph, state.params, state.extra), summary


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Distills a drafter until ``num_train_steps`` (resuming from the workdir's newest checkpoint) and exports
    ``workdir/hf``; returns the last logged metrics.

    On many processes every one runs this (``jax.distributed`` initialised first); ``workdir`` may be remote.
    """
    workdir = workdir_path(workdir)
    if config.wandb.project and config.wandb.mode == "offline":
        config.wandb.mode = "online"  # naming a project means the user wants the run online
    mesh = training_mesh(config)  # a batch that does not split is refused before the workdir is touched
    check_steps_per_call(config, 0)  # so are periods that steps_per_call does not divide
    check_workdir(workdir, config)
    dtype = jnp.dtype(config.compute_dtype)

    target_dir = setup.target_directory(config, workdir)
    target = load_target(target_dir, mesh=mesh, dtype=jnp.dtype(config.target.dtype))
    template = setup.chat_template(config, target_dir)
    train_rows, eval_rows = setup.data_rows(config, workdir, target, template, mesh)
    drafter = setup.build_drafter(config, target)
    target_graph, target_state = nnx.split(target)
    objective = Distillation(target_graph, loss_config(config), dtype)
    drafter, summary = fit(
        config,
        workdir,
        drafter,
        objective,
        mesh=mesh,
        train_iter=setup.train_iterator(config, train_rows, template),
        eval_batches=setup.eval_batches(config, eval_rows, template),
        frozen_state=target_state,
    )
    save_drafter(drafter, workdir / "hf")  # every process gathers, process 0 writes
    if jax.process_index() == 0:
        log.info("Exported the drafter to %s (loads with transformers' Gemma4AssistantForCausalLM).", workdir / "hf")
    return summary
