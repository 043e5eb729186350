"""The jitted train and eval steps: the target runs frozen outside ``value_and_grad``; only the drafter learns."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mtp.training.loss import LossConfig, distill_loss, frozen_target, simulated_acceptance_length
from mtp.training.state import TrainState


def step_metrics(loss: jax.Array, metrics: dict, batch: dict) -> dict:
    return {
        "loss": loss,
        "top1_agreement": metrics["top1_agreement"],
        "loss_per_depth": metrics["loss_per_depth"],
        "centroid_coverage": metrics["centroid_coverage"],
        "simulated_acceptance_length": simulated_acceptance_length(metrics["top1_agreement"]),
        "trained_tokens": jnp.sum(batch["loss_mask"]),
    }


def feature_layers(drafter_graph: nnx.GraphDef, state: TrainState) -> tuple[int, ...]:
    """The target layers the drafter reads (static: part of its config), for the target's one forward."""
    return nnx.merge(drafter_graph, state.params, state.extra).feature_layers


def loss_and_metrics(params, extra, drafter_graph, target, target_out, batch, loss_config, dtype):
    drafter = nnx.merge(drafter_graph, params, extra)
    return distill_loss(drafter, target, target_out, batch, loss_config, dtype)


def train_step(
    state: TrainState,
    target_state: nnx.State,
    batch: dict,
    *,
    target_graph: nnx.GraphDef,
    drafter_graph: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss_config: LossConfig,
    dtype: jnp.dtype,
) -> tuple[TrainState, dict]:
    """One optimizer step. ``target_state`` is an input only: never donated, differentiated or returned."""
    target = nnx.merge(target_graph, target_state)
    target_out = frozen_target(target, batch, dtype, feature_layers(drafter_graph, state))
    grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)
    (loss, metrics), grads = grad_fn(
        state.params, state.extra, drafter_graph, target, target_out, batch, loss_config, dtype
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    # Guarded on device, so the host need not look at every step: a non-finite step leaves the parameters and the
    # optimizer state as they were, and its ``finite`` flag makes the host stop at its next check.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old), (params, opt_state), (state.params, state.opt_state)
    )
    out = step_metrics(loss, metrics, batch) | {
        "grad_norm": grad_norm,
        "learning_rate": schedule(state.step),
        "finite": finite,
    }
    return TrainState(state.step + 1, params, state.extra, opt_state), out


def eval_step(
    state: TrainState,
    target_state: nnx.State,
    batch: dict,
    *,
    target_graph: nnx.GraphDef,
    drafter_graph: nnx.GraphDef,
    loss_config: LossConfig,
    dtype: jnp.dtype,
) -> dict:
    target = nnx.merge(target_graph, target_state)
    target_out = frozen_target(target, batch, dtype, feature_layers(drafter_graph, state))
    loss, metrics = loss_and_metrics(
        state.params, state.extra, drafter_graph, target, target_out, batch, loss_config, dtype
    )
    return step_metrics(loss, metrics, batch)


def under_mesh(step, mesh):
    """``step`` traced under ``mesh``, so that the models keep their activations split over the batch."""

    def run(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return step(*args)

    run.__name__ = step.func.__name__  # the compiled module's name: jit_train_step, jit_eval_step
    return run


def jit_train_step(state_sh, target_sh, batch_sh, metrics_sh, **static):
    """One ``jax.jit`` with explicit in/out shardings; the state is donated, the target is not."""
    return jax.jit(
        under_mesh(functools.partial(train_step, **static), batch_sh.mesh),
        in_shardings=(state_sh, target_sh, batch_sh),
        out_shardings=(state_sh, metrics_sh),
        donate_argnums=(0,),
    )


def jit_eval_step(state_sh, target_sh, batch_sh, metrics_sh, **static):
    step = under_mesh(functools.partial(eval_step, **static), batch_sh.mesh)
    return jax.jit(step, in_shardings=(state_sh, target_sh, batch_sh), out_shardings=metrics_sh)
