"""Is a change faster? The train step and the target's training forward, as committed and with variants, in one
process.

    OMP_NUM_THREADS=1 python benchmarks/train_step_ab.py benchmarks/variants/dense_attend_before_47447a5.py

A variants file defines ``VARIANTS = {name: patch}``: each ``patch()`` swaps something into ``mtp`` (a function,
a method) and returns a function that undoes it. The programs are compiled with each variant in place:
- the teacher-once train step of ``benchmarks/train_speed.py``'s tiny pair;
- the frozen target's forward with its vocabulary projection.

``A`` is the code as it is. ``A/A`` is a second compilation of it, the control: how far two identical programs
read apart. Every round calls each program once, in a new random order. A fixed order biases the comparison: an
A/A pair read 1.6-2.5% apart that way, and a drafter depth runs 23 ms after another call but 33 ms after a train
step. Printed per program: the median milliseconds, and the median over rounds of its time ÷ A's in the same
round, with the quartiles.
"""

import argparse
import importlib.util
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from anywhere without installing mtp

from benchmarks.train_speed import compiled_step, compiled_target_forward, load, tiny_pair
from mtp.training.config import loss_config


def load_variants(path: str) -> dict:
    spec = importlib.util.spec_from_file_location("variants", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.VARIANTS


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", help="a Python file defining VARIANTS = {name: patch}")
    parser.add_argument("--rounds", type=int, default=41)
    args = parser.parse_args()
    variants = load_variants(args.variants)
    print(f"load average (1/5/15 min) at start: {load()}")
    pair = tiny_pair()
    loss = loss_config(pair.config)
    steps, states, forwards = {}, {}, {}
    for name, patch in {"A": None, "A/A": None, **variants}.items():
        undo = patch() if patch else None
        try:
            steps[name], states[name] = compiled_step(pair, loss)
            forwards[name] = compiled_target_forward(pair)
        finally:
            if undo:
                undo()

    def train(name):
        def once():  # the step donates its state: feed each call the previous output
            states[name], metrics = steps[name](states[name], pair.target_state, pair.batch)
            return metrics["loss"]

        return once

    calls = {("step", name): train(name) for name in steps}
    calls |= {("target forward", name): (lambda f=f: f(pair.target_state, pair.batch)) for name, f in forwards.items()}
    for call in calls.values():  # warm up
        jax.block_until_ready(call())
        jax.block_until_ready(call())
    times = {key: [] for key in calls}
    order = list(calls)
    shuffle = np.random.default_rng(0)
    for _ in range(args.rounds):
        shuffle.shuffle(order)
        for key in order:
            start = time.perf_counter()
            jax.block_until_ready(calls[key]())
            times[key].append(time.perf_counter() - start)
    print(f"{args.rounds} rounds; per program: median ms, and its time ÷ A's in the same round (median, quartiles)")
    for program in ("step", "target forward"):
        for name in steps:
            ms = 1e3 * statistics.median(times[program, name])
            ratios = sorted(x / a for x, a in zip(times[program, name], times[program, "A"], strict=True))
            q1, q3 = ratios[len(ratios) // 4], ratios[3 * len(ratios) // 4]
            print(f"{program:15s} {name:28s} {ms:8.1f} ms   ÷ A {statistics.median(ratios):.3f} ({q1:.3f}-{q3:.3f})")
    print(f"load average (1/5/15 min) at end: {load()}")


if __name__ == "__main__":
    main()
