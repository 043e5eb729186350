"""The train state (the trained module's parameters, optimizer state, step; never a frozen target) and its sharding."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtp import sharding as sharding_lib


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything that changes while training: checkpointed, donated to the step, sharded over the mesh."""

    step: jax.Array
    params: nnx.State  # the trained module's nnx.Param leaves (a drafter's, or the tiny target's)
    extra: nnx.State  # its other variables (the centroid head's token ordering), not trained by gradient
    opt_state: optax.OptState


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup and cosine decay, after global-norm gradient clipping."""
    o = config.optimizer
    warmup = min(o.warmup_steps, config.num_train_steps)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=o.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(config.num_train_steps, warmup + 1),
        end_value=o.learning_rate * o.end_learning_rate_fraction,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay),
    )
    return tx, schedule


def split_trainable(module: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """The graph, the parameters (what the optimizer trains) and every other variable."""
    return nnx.split(module, nnx.Param, ...)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(abstract: TrainState, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """Shardings of every leaf: parameters (and their Adam moments) by the logical-axis rules, scalars replicated."""
    param_sh = sharding_lib.state_shardings(abstract.params, mesh)
    opt_sh = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract.opt_state,
        param_sh,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return TrainState(
        step=replicated(mesh),
        params=param_sh,
        extra=sharding_lib.state_shardings(abstract.extra, mesh),
        opt_state=opt_sh,
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches split over every data-parallel axis (data and fsdp)."""
    return NamedSharding(mesh, PartitionSpec(sharding_lib.LOGICAL_RULES["batch"]))


def abstract_like(tree, shardings, dtype=None):
    """ShapeDtypeStructs carrying ``shardings`` (a tree whose leaves sit where ``tree`` has Variables or arrays)."""

    def one(x, sharding):
        if isinstance(x, nnx.Variable):
            value = x.get_value()
            return x.replace(jax.ShapeDtypeStruct(value.shape, dtype or value.dtype, sharding=sharding))
        return jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=sharding)

    return jax.tree.map(one, tree, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def init_state(
    params: nnx.State, extra: nnx.State, tx: optax.GradientTransformation, mesh: Mesh
) -> tuple[TrainState, TrainState]:
    """The train state on the mesh (optimizer state built there, jitted) and its shardings."""

    def build(params, extra):
        return TrainState(jnp.zeros((), jnp.int32), params, extra, tx.init(params))

    abstract = jax.eval_shape(build, params, extra)
    shardings = state_shardings(abstract, tx, mesh)
    return jax.jit(build, out_shardings=shardings)(params, extra), shardings
