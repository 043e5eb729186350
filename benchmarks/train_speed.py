"""Training cost on the embedded tiny pair: train step time ÷ frozen-target forward time on the same batch.

    python benchmarks/train_speed.py [--repeats 30]

Both are jitted and timed on their own in one run (median over repeats, after a warm-up); the ratio says how
much the drafter's K-depth unroll, its backward pass and the optimizer add on top of the target forward that
distillation needs anyway. Also prints training tokens per second (tokens in the batch ÷ step time).
"""

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from anywhere without installing mtp

from configs import tiny
from mtp import sharding as sharding_lib
from mtp.checkpoint import load_target
from mtp.training import setup
from mtp.training.config import loss_config
from mtp.training.loss import frozen_target
from mtp.training.state import batch_sharding, init_state, make_optimizer, replicated, split_drafter
from mtp.training.step import jit_train_step


def median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    config = tiny.get_config()
    mesh = sharding_lib.make_mesh({"fsdp": 1})
    target_dir = setup.target_directory(config, None)
    target = load_target(target_dir, mesh=mesh)
    template = setup.chat_template(config, target_dir)
    rows, _ = setup.data_rows(config, None, target, template)
    iterator = setup.train_iterator(config, rows, template)
    batch = jax.device_put({k: np.asarray(v) for k, v in next(iterator).items()}, batch_sharding(mesh))
    iterator.close()

    target_graph, target_state = nnx.split(target)
    drafter_graph, params, extra = split_drafter(setup.build_drafter(config, target))
    tx, schedule = make_optimizer(config)
    state, state_sh = init_state(params, extra, tx, mesh)
    target_sh = sharding_lib.state_shardings(target_state, mesh)
    step = jit_train_step(
        state_sh,
        target_sh,
        batch_sharding(mesh),
        replicated(mesh),
        tx=tx,
        schedule=schedule,
        target_graph=target_graph,
        drafter_graph=drafter_graph,
        loss_config=loss_config(config),
        dtype=jnp.float32,
    )
    # The step donates its state: feed each call the previous output.
    holder = {"state": state}

    def train_once():
        holder["state"], metrics = step(holder["state"], target_state, batch)
        return metrics["loss"]

    forward = jax.jit(lambda s, b: frozen_target(nnx.merge(target_graph, s), b, jnp.float32).hidden)
    step_s = median_seconds(train_once, args.repeats)
    forward_s = median_seconds(lambda: forward(target_state, batch), args.repeats)
    tokens = config.batch_size * config.seq_len
    print(f"batch {config.batch_size} x {config.seq_len}, drafter depth {config.loss.depth}, {jax.devices()[0]}")
    print(f"train step      {step_s * 1e3:8.2f} ms (median of {args.repeats})")
    print(f"target forward  {forward_s * 1e3:8.2f} ms (median of {args.repeats})")
    print(f"ratio           {step_s / forward_s:8.2f}x")
    print(f"tokens/s        {tokens / step_s:8.0f}")


if __name__ == "__main__":
    main()
