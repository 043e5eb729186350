"""The train step: a NaN or Inf loss or gradient never reaches the parameters or the optimizer state."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mtp import sharding as sharding_lib
from mtp.errors import UserError
from mtp.gemma4.config import config_from_hf
from mtp.gemma4.model import Gemma4
from mtp.training import objectives, setup, trainer
from mtp.training import step as step_lib
from mtp.training.config import loss_config
from mtp.training.objectives import Distillation
from mtp.training.state import batch_sharding, init_state, make_optimizer, replicated, split_trainable
from tests import hf_oracle
from tests.training.test_sharding import synthetic_batch


def test_a_non_finite_step_leaves_the_state_as_it_was(monkeypatch):
    real = objectives.distill_loss

    def poisoned(drafter, target, target_out, batch, *args, **kwargs):
        """NaN loss and gradients for a batch whose first token is 0; a finite loss but NaN gradients for 1."""
        loss, metrics = real(drafter, target, target_out, batch, *args, **kwargs)
        healthy = (batch["tokens"][0, 0] != 1).astype(jnp.float32)
        # sqrt(0 * w + 0): the value 0, the gradient 0 * inf = NaN; sqrt(0 * w + 1) - 1: 0 and 0.
        loss = loss + jnp.sqrt(0.0 * jnp.sum(drafter.pre_projection[...]) + healthy) - healthy
        return loss * jnp.where(batch["tokens"][0, 0] == 0, jnp.nan, 1.0), metrics

    monkeypatch.setattr(objectives, "distill_loss", poisoned)
    config = tiny.get_config("test")
    config.loss.depth = 1
    config.drafter.num_layers = 1
    mesh = sharding_lib.make_mesh({"fsdp": 1})
    target_config = config_from_hf(hf_oracle.tiny_text_config_dict("e2b_like") | {"model_type": "gemma4_text"})
    target = Gemma4(target_config, rngs=nnx.Rngs(0))
    target_graph, target_state = nnx.split(target)
    drafter_graph, params, extra = split_trainable(setup.build_drafter(config, target))
    tx, schedule = make_optimizer(config)
    state, state_sh = init_state(params, extra, tx, mesh)
    train_step = step_lib.jit_train_step(
        state_sh,
        sharding_lib.state_shardings(target_state, mesh),
        batch_sharding(mesh),
        replicated(mesh),
        tx=tx,
        schedule=schedule,
        graph=drafter_graph,
        objective=Distillation(target_graph, loss_config(config), jnp.float32),
    )
    good = synthetic_batch(batch=4)
    bad = dict(good, tokens=good["tokens"].copy())
    bad["tokens"][0, 0] = 0

    before = jax.device_get(state)
    state, metrics = train_step(state, target_state, bad)
    assert not metrics["finite"] and np.isnan(metrics["loss"]) and np.isnan(metrics["grad_norm"])
    assert int(state.step) == 1
    after = jax.device_get(state)
    for old, new in zip(
        jax.tree.leaves((before.params, before.opt_state)),
        jax.tree.leaves((after.params, after.opt_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(new, old)

    grad_only = dict(good, tokens=good["tokens"].copy())
    grad_only["tokens"][0, 0] = 1
    state, metrics = train_step(state, target_state, grad_only)
    assert not metrics["finite"] and np.isfinite(metrics["loss"]) and np.isnan(metrics["grad_norm"])
    for old, new in zip(
        jax.tree.leaves((after.params, after.opt_state)),
        jax.tree.leaves(jax.device_get((state.params, state.opt_state))),
        strict=True,
    ):
        np.testing.assert_array_equal(new, old)
    with pytest.raises(
        trainer.NonFiniteLossError, match=r"gradient norm nan\) at step 2;.*last good checkpoint is step 1"
    ):
        trainer.check_finite([(2, metrics["finite"], metrics["loss"], metrics["grad_norm"])], 1, pathlib.Path("w"))

    state, metrics = train_step(state, target_state, good)
    assert metrics["finite"] and np.isfinite(metrics["loss"])
    moments = jax.tree.leaves(jax.device_get(state.opt_state))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after.opt_state), moments, strict=True))


def test_the_non_finite_check_names_the_step_inside_a_call_of_several():
    """A call of 3 steps starting at step 5 whose second step is NaN: the error names step 6."""
    finite, loss, grad_norm = np.array([True, False, True]), np.array([1.0, np.nan, 2.0]), np.array([3.0, np.nan, 4.0])
    trainer.check_finite([(2, True, 0.5, 0.5), (5, finite[:1], loss[:1], grad_norm[:1])], 4, pathlib.Path("w"))
    with pytest.raises(trainer.NonFiniteLossError, match=r"loss is nan \(gradient norm nan\) at step 6;.*step 4"):
        trainer.check_finite([(2, True, 0.5, 0.5), (5, finite, loss, grad_norm)], 4, pathlib.Path("w"))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"steps_per_call": 5}, r"steps_per_call=5 must divide num_train_steps=12, log_every_steps=2, "),
        ({"steps_per_call": 0}, r"steps_per_call=0; set config.steps_per_call to 1 or more"),
        ({"steps_per_call": 2, "start": 3}, r"checkpoint is at step 3, which steps_per_call=2 does not divide"),
    ],
)
def test_steps_per_call_must_fit_the_run(changes, message):
    config = tiny.get_config("test")
    config.steps_per_call = changes["steps_per_call"]
    with pytest.raises(UserError, match=message):
        trainer.check_steps_per_call(config, changes.get("start", 0))
    config.steps_per_call = 2
    assert trainer.check_steps_per_call(config, 4) == 2


@pytest.mark.parametrize("family", ["gemma4", "medusa", "eagle3"])
def test_the_dry_run_builds_the_configs_drafter_family(family):
    from mtp.drafter.families import FAMILIES
    from mtp.training.dry_run import abstract_drafter

    config = tiny.get_config("test")
    config.drafter.family = family
    if family == "eagle3":
        config.drafter.num_layers = 1
    target_config = config_from_hf(hf_oracle.tiny_text_config_dict("e2b_like") | {"model_type": "gemma4_text"})
    target = nnx.eval_shape(lambda: Gemma4(target_config, rngs=nnx.Rngs(0)))
    drafter = abstract_drafter(config, target)
    assert type(drafter) is FAMILIES[family][0]
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(drafter)))
