"""Several train steps per call: what one call per step costs in page faults on CPU.

    OMP_NUM_THREADS=1 python benchmarks/steps_per_call.py [--steps 4] [--repeats 7]    # ~2 min

XLA:CPU allocates a call's temporaries as one block (289 MiB for ``train_speed.py``'s teacher-once step), and
glibc maps a block that large anew for every call and unmaps it afterwards, so every call page-faults it in again
(``call_order.py``). This runs ``--steps`` of ``train_speed.py``'s train steps as ``--steps`` calls and as one call
(``lax.scan`` over the same batch stacked ``--steps`` times, each step the same jitted function), alternating. It
prints per step the median wall time and the minor page faults, and asserts that both reach the same loss. The
trainer runs one step per call; this is the figure a steps-per-call option would buy.
"""

import argparse
import pathlib
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from anywhere without installing mtp

from benchmarks.train_speed import jitted_step, load, tiny_pair
from mtp.training.config import loss_config


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"load average (1/5/15 min) at start: {load()}")
    pair = tiny_pair()
    loss = loss_config(pair.config)
    step, state = jitted_step(pair, loss)
    _, scanned_state = jitted_step(pair, loss)
    batches = jax.tree.map(lambda x: jnp.stack([x] * args.steps), pair.batch)

    @jax.jit
    def several(state, target_state, batches):
        def one(state, batch):
            state, metrics = step(state, target_state, batch)
            return state, metrics["loss"]

        return jax.lax.scan(one, state, batches)

    single = step.lower(state, pair.target_state, pair.batch).compile()
    scanned = several.lower(scanned_state, pair.target_state, batches).compile()
    states = {"one step per call": state, f"{args.steps} steps per call": scanned_state}

    def one_per_call():
        for _ in range(args.steps):  # the step donates its state: feed each call the previous output
            states["one step per call"], metrics = single(states["one step per call"], pair.target_state, pair.batch)
        return metrics["loss"]

    def all_in_one_call():
        name = f"{args.steps} steps per call"
        states[name], losses = scanned(states[name], pair.target_state, batches)
        return losses

    calls = {"one step per call": one_per_call, f"{args.steps} steps per call": all_in_one_call}
    for call in calls.values():  # warm up
        jax.block_until_ready(call())
        jax.block_until_ready(call())
    times, faults = {name: [] for name in calls}, {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append((time.perf_counter() - start) / args.steps)
            faults[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / args.steps)
    # Both ran the same steps on the same batches from the same state: the losses agree (up to the order of sums).
    last_single, last_scanned = float(one_per_call()), float(all_in_one_call()[-1])
    assert abs(last_single - last_scanned) <= 1e-4 * abs(last_single), (last_single, last_scanned)
    print(f"loss after {args.steps * (args.repeats + 3)} steps: {last_single:.6f} and {last_scanned:.6f}")
    temp = {"one step per call": single, f"{args.steps} steps per call": scanned}
    for name in calls:
        print(
            f"{name:20s} {1e3 * statistics.median(times[name]):7.1f} ms per step, "
            f"{statistics.median(faults[name]):8.0f} page faults per step, "
            f"temporaries {temp[name].memory_analysis().temp_size_in_bytes / 2**20:.0f} MiB per call"
        )
    print(f"load average (1/5/15 min) at end: {load()}")


if __name__ == "__main__":
    main()
