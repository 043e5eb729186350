"""How much a call's time depends on the call before it, and what that does to ``train_speed.py``'s ratio.

    OMP_NUM_THREADS=1 python benchmarks/call_order.py [--repeats 9]    # ~2 min

The programs are ``train_speed.py``'s: the frozen target's forward (F), one drafter depth (d) and the teacher-once
train step. Each round times each program right after a chosen predecessor (itself: steady state; the train step;
the other forward) and prints the medians. Then the ratio step ÷ (F + 3 · depth · d) two ways:
- as ``train_speed.py`` orders its calls: F after a train step, d after F, the step after d;
- in steady state: every program right after itself.

It also counts the minor page faults of one train step: XLA:CPU allocates a call's temporaries as one block, and
glibc maps a block that large anew for every call and unmaps it afterwards.
"""

import argparse
import pathlib
import resource
import statistics
import sys
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from anywhere without installing mtp

from benchmarks.train_speed import (
    compiled_drafter_forward,
    compiled_step,
    compiled_target_forward,
    load,
    tiny_pair,
)
from mtp.training.config import loss_config


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print(f"load average (1/5/15 min) at start: {load()}")
    pair = tiny_pair()
    loss = loss_config(pair.config)
    step, state = compiled_step(pair, loss)
    target_forward = compiled_target_forward(pair)
    states = [state]

    def train():  # the step donates its state: feed each call the previous output
        states[0], metrics = step(states[0], pair.target_state, pair.batch)
        return metrics["loss"]

    calls = {
        "F": lambda: target_forward(pair.target_state, pair.batch),
        "d": compiled_drafter_forward(pair),
        "step": train,
    }
    for call in calls.values():  # compile and warm up
        jax.block_until_ready(call())
        jax.block_until_ready(call())
    pairs = [("F", "F"), ("F", "step"), ("F", "d"), ("d", "d"), ("d", "F"), ("d", "step"), ("step", "step")]
    pairs.append(("step", "d"))
    times = {pair_: [] for pair_ in pairs}
    for _ in range(args.repeats):
        for timed, before in pairs:
            jax.block_until_ready(calls[before]())
            start = time.perf_counter()
            jax.block_until_ready(calls[timed]())
            times[timed, before].append(time.perf_counter() - start)
    ms = {key: 1e3 * statistics.median(value) for key, value in times.items()}
    print(f"median ms of {args.repeats} rounds, each program right after another:")
    for (timed, before), value in ms.items():
        print(f"  {timed:5s} after {before:5s} {value:8.2f}")
    depth = loss.depth
    fixed = ms["step", "d"] / (ms["F", "step"] + 3 * depth * ms["d", "F"])
    steady = ms["step", "step"] / (ms["F", "F"] + 3 * depth * ms["d", "d"])
    print(f"step ÷ (F + 3·depth·d), train_speed.py's order (F after a step, d after F, step after d): {fixed:.3f}")
    print(f"step ÷ (F + 3·depth·d), steady state (each after itself):                              {steady:.3f}")
    jax.block_until_ready(calls["step"]())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(calls["step"]())
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    temp = step.memory_analysis().temp_size_in_bytes
    print(
        f"one train step: {faults} minor page faults ({faults * 4096 / 2**20:.0f} MiB of 4 KiB pages); "
        f"its temporaries {temp / 2**20:.0f} MiB"
    )
    print(f"load average (1/5/15 min) at end: {load()}")


if __name__ == "__main__":
    main()
