"""Lower and compile a config's train step from shapes alone (no parameter is allocated): memory per device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from mtp import sharding as sharding_lib
from mtp.drafter.model import Drafter
from mtp.target.config import Gemma4Config
from mtp.target.model import Gemma4
from mtp.training.config import loss_config
from mtp.training.setup import drafter_config_for
from mtp.training.state import (
    TrainState,
    abstract_like,
    batch_sharding,
    make_optimizer,
    replicated,
    split_drafter,
    state_shardings,
)
from mtp.training.step import jit_train_step


def compile_train_step(config: ml_collections.ConfigDict, target_config: Gemma4Config, mesh: Mesh):
    """The compiled train step of ``config`` for a target of ``target_config`` on ``mesh``."""
    target_graph, target_abstract = nnx.split(nnx.eval_shape(lambda: Gemma4(target_config, rngs=nnx.Rngs(0))))
    target_sh = sharding_lib.state_shardings(target_abstract, mesh)
    target_in = abstract_like(target_abstract, target_sh, jnp.dtype(config.target.dtype))
    drafter = nnx.eval_shape(lambda: Drafter(drafter_config_for(config, target_config), rngs=nnx.Rngs(0)))
    drafter_graph, params, extra = split_drafter(drafter)
    tx, schedule = make_optimizer(config)
    abstract = jax.eval_shape(lambda p, e: TrainState(jnp.zeros((), jnp.int32), p, e, tx.init(p)), params, extra)
    state_sh = state_shardings(abstract, tx, mesh)
    batch_sh = batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((config.batch_size, config.seq_len), jnp.int32, sharding=batch_sh)
             for k in ("tokens", "loss_mask", "segment_ids", "positions")}  # fmt: skip
    step = jit_train_step(
        state_sh, target_sh, batch_sh, replicated(mesh), tx=tx,
        schedule=schedule, target_graph=target_graph, drafter_graph=drafter_graph, loss_config=loss_config(config),
        dtype=jnp.dtype(config.compute_dtype),
    )  # fmt: skip
    return step.lower(abstract_like(abstract, state_sh), target_in, batch).compile()
