"""The jitted train and eval steps of any objective (``mtp.training.objectives``): the frozen model's part runs
outside ``value_and_grad``; only the trained module's parameters learn."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mtp.training.objectives import Objective
from mtp.training.state import TrainState


def _loss(params, extra, graph, objective, context, batch):
    return objective.loss(nnx.merge(graph, params, extra), context, batch)


def train_step(
    state: TrainState,
    frozen_state: nnx.State,
    batch: dict,
    *,
    graph: nnx.GraphDef,
    objective: Objective,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> tuple[TrainState, dict]:
    """One optimizer step. ``frozen_state`` is an input only: never donated, differentiated or returned."""
    context = objective.context(frozen_state, batch, nnx.merge(graph, state.params, state.extra))
    grad_fn = jax.value_and_grad(_loss, has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, state.extra, graph, objective, context, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    # Guarded on device, so the host need not look at every step: a non-finite step leaves the parameters and the
    # optimizer state as they were, and its ``finite`` flag makes the host stop at its next check.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old), (params, opt_state), (state.params, state.opt_state)
    )
    out = metrics | {"grad_norm": grad_norm, "learning_rate": schedule(state.step), "finite": finite}
    return TrainState(state.step + 1, params, state.extra, opt_state), out


def train_steps(state: TrainState, frozen_state: nnx.State, batches: dict, **static) -> tuple[TrainState, dict]:
    """``train_step`` over each of ``batches``' leading axis in turn, in one program; the metrics stacked per step.

    One call per several steps: XLA:CPU maps and unmaps a call's temporaries once per call, not once per step
    (``benchmarks/steps_per_call.py``). The steps are the same as one call each (the same losses)."""
    return jax.lax.scan(lambda state, batch: train_step(state, frozen_state, batch, **static), state, batches)


def eval_step(
    state: TrainState, frozen_state: nnx.State, batch: dict, *, graph: nnx.GraphDef, objective: Objective
) -> dict:
    context = objective.context(frozen_state, batch, nnx.merge(graph, state.params, state.extra))
    return _loss(state.params, state.extra, graph, objective, context, batch)[1]


def under_mesh(step, mesh):
    """``step`` traced under ``mesh``, so that the models keep their activations split over the batch."""

    def run(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return step(*args)

    run.__name__ = step.func.__name__  # the compiled module's name: jit_train_step, jit_eval_step
    return run


def jit_train_step(state_sh, frozen_sh, batch_sh, metrics_sh, **static):
    """One ``jax.jit`` with explicit in/out shardings; the state is donated, the frozen model is not.

    ``static``: ``graph`` (the trained module's), ``objective``, ``tx`` and ``schedule``."""
    return jax.jit(
        under_mesh(functools.partial(train_step, **static), batch_sh.mesh),
        in_shardings=(state_sh, frozen_sh, batch_sh),
        out_shardings=(state_sh, metrics_sh),
        donate_argnums=(0,),
    )


def jit_train_steps(state_sh, frozen_sh, batches_sh, metrics_sh, **static):
    """``jit_train_step`` for ``train_steps``: ``batches_sh`` shards the stacked batches ([steps, B, T])."""
    return jax.jit(
        under_mesh(functools.partial(train_steps, **static), batches_sh.mesh),
        in_shardings=(state_sh, frozen_sh, batches_sh),
        out_shardings=(state_sh, metrics_sh),
        donate_argnums=(0,),
    )


def jit_eval_step(state_sh, frozen_sh, batch_sh, metrics_sh, **static):
    """``static``: ``graph`` and ``objective``."""
    step = under_mesh(functools.partial(eval_step, **static), batch_sh.mesh)
    return jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=metrics_sh)
