"""Several train steps per call: what one call per step costs in page faults on CPU.

    OMP_NUM_THREADS=1 python benchmarks/steps_per_call.py [--steps 5] [--repeats 7]    # ~2 min

XLA:CPU allocates a call's temporaries as one block (289 MiB for ``train_speed.py``'s teacher-once step), and
glibc maps a block that large anew for every call and unmaps it afterwards, so every call page-faults it in again
(``call_order.py``). This runs ``--steps`` of ``train_speed.py``'s train steps as ``--steps`` calls and as one call
(``lax.scan`` over the same batch stacked ``--steps`` times, each step the same jitted function), alternating. It
prints per step the median wall time and the minor page faults, and asserts that both reach the same loss. The
trainer runs ``config.steps_per_call`` steps per call (``configs/tiny.py``: 5). It also times the two forwards of
``train_speed.py``'s floor, each right after itself, and prints each mode's step ÷ floor.
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

from benchmarks.train_speed import compiled_drafter_forward, compiled_target_forward, jitted_step, load, tiny_pair
from mtp.training.config import loss_config


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
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

    target_forward, drafter_forward = compiled_target_forward(pair), compiled_drafter_forward(pair)
    calls = {"one step per call": one_per_call, f"{args.steps} steps per call": all_in_one_call}
    forwards = {
        "target forward": lambda: target_forward(pair.target_state, pair.batch),
        "drafter forward": drafter_forward,
    }
    for call in [*calls.values(), *forwards.values()]:  # warm up
        jax.block_until_ready(call())
        jax.block_until_ready(call())
    forward_ms = {name: [] for name in forwards}
    times, faults = {name: [] for name in calls}, {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append((time.perf_counter() - start) / args.steps)
            faults[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / args.steps)
        for name, call in forwards.items():  # in steady state: each right after itself
            jax.block_until_ready(call())
            start = time.perf_counter()
            jax.block_until_ready(call())
            forward_ms[name].append(1e3 * (time.perf_counter() - start))
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
    target_ms, drafter_ms = (statistics.median(forward_ms[name]) for name in forwards)
    floor_ms = target_ms + 3 * loss.depth * drafter_ms
    print(
        f"target forward {target_ms:.1f} ms, drafter forward {drafter_ms:.1f} ms (each after itself): floor "
        f"F + 3·depth·d = {floor_ms:.1f} ms"
    )
    for name in calls:
        print(f"{name:20s} step ÷ floor {1e3 * statistics.median(times[name]) / floor_ms:.3f}")
    print(f"load average (1/5/15 min) at end: {load()}")


if __name__ == "__main__":
    main()
