"""Lower and compile a config's train step from shapes alone (no parameter is allocated): memory per device."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from mtp import sharding as sharding_lib
from mtp.checkpoint.hf_target import read_config
from mtp.drafter.families import GEMMA4
from mtp.drafter.families import SHAPE_KEYS as FAMILY_SHAPE
from mtp.drafter.families import build as build_family
from mtp.drafter.interface import DrafterFamily
from mtp.drafter.model import Drafter
from mtp.gemma4.config import PRESETS, Gemma4Config, config_from_hf
from mtp.gemma4.model import Gemma4
from mtp.training.config import loss_config
from mtp.training.objectives import Distillation
from mtp.training.setup import drafter_config_for
from mtp.training.state import (
    TrainState,
    abstract_like,
    batch_sharding,
    make_optimizer,
    replicated,
    split_trainable,
    state_shardings,
)
from mtp.training.step import jit_train_step

# The dry run never executes its program: skip LLVM's optimisation of the generated code. XLA's HLO passes, and
# with them buffer assignment and the memory figures, are unchanged (checked on gemma4_e2b: identical argument and
# temporary bytes, compile 41 -> 35 s).
_ANALYSIS_ONLY = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def abstract_drafter(config: ml_collections.ConfigDict, target: Gemma4) -> DrafterFamily:
    """The config's drafter, of its ``drafter.family``, as shapes only (``target`` may be abstract: only its config
    is read, and the head is not initialised from its embedding)."""
    d = config.drafter
    if d.family == GEMMA4:
        return nnx.eval_shape(lambda: Drafter(drafter_config_for(config, target.config), rngs=nnx.Rngs(0)))
    shape = {k: d[k] for k in FAMILY_SHAPE} | {"init_embed_from_target": False}
    return nnx.eval_shape(lambda: build_family(d.family, target, **shape, seed=config.seed))


def compile_train_step(config: ml_collections.ConfigDict, target_config: Gemma4Config, mesh: Mesh):
    """The train step of ``config`` for a target of ``target_config`` on ``mesh``, compiled for its memory analysis
    (with unoptimised machine code: not for running)."""
    target = nnx.eval_shape(lambda: Gemma4(target_config, rngs=nnx.Rngs(0)))
    drafter_graph, params, extra = split_trainable(abstract_drafter(config, target))
    target_graph, target_abstract = nnx.split(target)
    target_sh = sharding_lib.state_shardings(target_abstract, mesh)
    target_in = abstract_like(target_abstract, target_sh, jnp.dtype(config.target.dtype))
    tx, schedule = make_optimizer(config)
    abstract = jax.eval_shape(lambda p, e: TrainState(jnp.zeros((), jnp.int32), p, e, tx.init(p)), params, extra)
    state_sh = state_shardings(abstract, tx, mesh)
    batch_sh = batch_sharding(mesh)
    batch = {
        k: jax.ShapeDtypeStruct((config.batch_size, config.seq_len), jnp.int32, sharding=batch_sh)
        for k in ("tokens", "loss_mask", "segment_ids", "positions")
    }
    step = jit_train_step(
        state_sh,
        target_sh,
        batch_sh,
        replicated(mesh),
        tx=tx,
        schedule=schedule,
        graph=drafter_graph,
        objective=Distillation(target_graph, loss_config(config), jnp.dtype(config.compute_dtype)),
    )
    return step.lower(abstract_like(abstract, state_sh), target_in, batch).compile(compiler_options=_ANALYSIS_ONLY)


def target_config_of(config: ml_collections.ConfigDict) -> Gemma4Config:
    """The target's shape: its config.json when ``target.hf_path`` is set, else the published ``target.preset``."""
    if config.target.hf_path:
        return config_from_hf(read_config(config.target.hf_path), source=config.target.hf_path)
    if config.target.preset not in PRESETS:
        raise ValueError(f"target.preset={config.target.preset!r}: set target.hf_path or one of {sorted(PRESETS)}.")
    return PRESETS[config.target.preset]


def dry_run(config: ml_collections.ConfigDict, name: str) -> dict:
    """Compile the config's train step on its own mesh from shapes alone; what it needs per device, in bytes."""
    mesh = sharding_lib.make_mesh(config.mesh.to_dict())
    start = time.perf_counter()
    memory = compile_train_step(config, target_config_of(config), mesh).memory_analysis()
    return {
        "config": name,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "mesh": dict(mesh.shape),
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "argument_bytes": int(memory.argument_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "compile_seconds": round(time.perf_counter() - start, 1),
    }
