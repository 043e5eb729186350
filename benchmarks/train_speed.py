"""Training cost: train step time ÷ frozen-target forward time on the same batch, against its floor.

    OMP_NUM_THREADS=1 python benchmarks/train_speed.py [--repeats 15]

The target has the embedded target's shape (``configs/tiny_target.py``: 12 layers, width 256, vocabulary 4096)
with random weights; the drafter is ``configs/tiny.py``'s (2 layers, width 128, 4 depths); batch 8 × 128 of
random tokens, one document per row, every token trained. Timed in one process, interleaved (one call of each
per round after a warm-up), medians:

- ``target forward``: the frozen target's forward with its vocabulary projection (what distillation needs anyway);
- ``drafter forward``: one depth of the drafter's unroll over the target's output, with its vocabulary head;
- the train step with the teacher's logits computed once for all depths (``loss.whole_teacher_bytes``, default)
  and per depth in vocabulary chunks under remat (``whole_teacher_bytes=0``, the full-size path).

c = drafter forward ÷ target forward; the floor of step ÷ forward is 1 + 3 · depth · c (the frozen forward, then a
forward and a backward of about twice its cost for each depth).
"""

import argparse
import collections
import dataclasses
import gzip
import json
import os
import pathlib
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from anywhere without installing mtp

from configs import tiny, tiny_target
from mtp import sharding as sharding_lib
from mtp.embedded.target import model_config
from mtp.gemma4.model import Gemma4
from mtp.training import setup
from mtp.training.config import loss_config
from mtp.training.loss import frozen_target, unroll
from mtp.training.objectives import Distillation
from mtp.training.state import batch_sharding, init_state, make_optimizer, replicated, split_trainable
from mtp.training.step import jit_train_step


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def hlo_sources(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its result shape and the JAX operation it came from (``op_name`` metadata)."""
    sources = {}
    for line in hlo_text.splitlines():
        if match := re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ", line):
            op_name = re.search(r'op_name="([^"]*)"', line)
            sources.setdefault(match[1], f"{match[2].split('{')[0]:22s} {op_name[1][-90:] if op_name else ''}")
    return sources


def costliest_ops(directory: str, sources: dict[str, str], top: int = 20) -> list[tuple[float, str, str]]:
    """Total milliseconds per HLO op over the traced calls (``jax.profiler.trace``'s perfetto file), with the
    shape and JAX operation each comes from (``transpose(jvp(...))``: the backward pass)."""
    (path,) = pathlib.Path(directory).rglob("*.trace.json.gz")
    with gzip.open(path) as file:
        events = json.load(file)
    events = events["traceEvents"] if isinstance(events, dict) else events
    total = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and "dur" in event and "hlo_op" in event.get("args", {}):
            total[event["name"]] += event["dur"] / 1e3
    return [(ms, op, sources.get(op, "")) for op, ms in total.most_common(top)]


@dataclasses.dataclass
class TinyPair:
    """The embedded target's shape with random weights, ``configs/tiny.py``'s drafter, one batch, split for jit."""

    config: object
    mesh: jax.sharding.Mesh
    drafter: nnx.Module
    batch: dict
    target_graph: nnx.GraphDef
    target_state: nnx.State
    drafter_graph: nnx.GraphDef
    params: nnx.State
    extra: nnx.State


def tiny_pair() -> TinyPair:
    config = tiny.get_config()
    mesh = sharding_lib.make_mesh({"fsdp": 1})
    target = Gemma4(model_config(tiny_target.get_config()), rngs=nnx.Rngs(0))
    drafter = setup.build_drafter(config, target)
    batch_size, length = config.batch_size, config.seq_len
    rng = np.random.default_rng(0)
    host_batch = {
        "tokens": rng.integers(3, target.config.vocab_size, (batch_size, length)).astype(np.int32),
        "positions": np.tile(np.arange(length, dtype=np.int32), (batch_size, 1)),
        "segment_ids": np.ones((batch_size, length), np.int32),
        "loss_mask": np.ones((batch_size, length), np.int32),
    }
    batch = jax.device_put(host_batch, batch_sharding(mesh))
    target_graph, target_state = nnx.split(target)
    return TinyPair(config, mesh, drafter, batch, target_graph, target_state, *split_trainable(drafter))


def jitted_step(pair: TinyPair, loss) -> tuple:
    """The jitted (not yet compiled) train step for ``loss`` (a ``LossConfig``) and a fresh state for it."""
    tx, schedule = make_optimizer(pair.config)
    state, state_sh = init_state(pair.params, pair.extra, tx, pair.mesh)
    step = jit_train_step(
        state_sh,
        sharding_lib.state_shardings(pair.target_state, pair.mesh),
        batch_sharding(pair.mesh),
        replicated(pair.mesh),
        tx=tx,
        schedule=schedule,
        graph=pair.drafter_graph,
        objective=Distillation(pair.target_graph, loss, jnp.float32),
    )
    return step, state


def compiled_step(pair: TinyPair, loss) -> tuple:
    """``jitted_step`` compiled now (so that patches in place at this call are in it), and a fresh state for it."""
    step, state = jitted_step(pair, loss)
    return step.lower(state, pair.target_state, pair.batch).compile(), state


def compiled_target_forward(pair: TinyPair):
    """The frozen target's forward with its vocabulary projection, compiled now."""

    def target_forward(target_state, batch):
        target = nnx.merge(pair.target_graph, target_state)
        return target.logits(frozen_target(target, batch, jnp.float32).hidden)

    return jax.jit(target_forward).lower(pair.target_state, pair.batch).compile()


def compiled_drafter_forward(pair: TinyPair):
    """One depth of the drafter's unroll with its vocabulary head, over the target's output for the pair's batch
    (computed once, outside): a function of no arguments."""
    drafter_graph, target_graph, target_state, batch = (
        pair.drafter_graph,
        pair.target_graph,
        pair.target_state,
        pair.batch,
    )

    @jax.jit
    def frozen_output(target_state, batch):
        target = nnx.merge(target_graph, target_state)
        return frozen_target(target, batch, jnp.float32, pair.drafter.feature_layers)

    @jax.jit
    def drafter_forward(params, target_state, target_out, batch):
        drafter = nnx.merge(drafter_graph, params, pair.extra)
        target = nnx.merge(target_graph, target_state)
        (depth_0,) = unroll(drafter, target, target_out, batch, 1)
        return drafter.full_logits(depth_0.features.normed, drafter.vocab_table(target))

    target_out = frozen_output(target_state, batch)
    return lambda: drafter_forward(pair.params, target_state, target_out, batch)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--profile", default="", help="also trace each train step here; print its costliest ops")
    args = parser.parse_args()
    print(f"load average (1/5/15 min) at start: {load()}")
    pair = tiny_pair()
    config, batch, target_state, params = pair.config, pair.batch, pair.target_state, pair.params
    batch_size, length = config.batch_size, config.seq_len
    losses = {"teacher once": loss_config(config)}
    losses["per depth"] = dataclasses.replace(losses["teacher once"], whole_teacher_bytes=0)
    depth = losses["teacher once"].depth
    steps, states = {}, {}
    for name, loss in losses.items():
        steps[name], states[name] = compiled_step(pair, loss)
    target_forward = compiled_target_forward(pair)
    drafter_forward = compiled_drafter_forward(pair)

    def train(name):
        def once():  # the step donates its state: feed each call the previous output
            states[name], metrics = steps[name](states[name], target_state, batch)
            return metrics["loss"]

        return once

    calls = {
        "target forward": lambda: target_forward(target_state, batch),
        "drafter forward": drafter_forward,
        **{f"train step, {name}": train(name) for name in losses},
    }
    for call in calls.values():  # compile and warm up
        jax.block_until_ready(call())
        jax.block_until_ready(call())
    times = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}

    print(
        f"batch {batch_size} x {length}, depth {depth}, {jax.devices()[0]}; target {count(target_state) / 1e6:.2f}M "
        f"parameters, drafter {count(params) / 1e6:.2f}M ({count(target_state) / count(params):.1f}x smaller)"
    )
    for name, value in ms.items():
        print(f"{name:28s} {value:8.2f} ms (median of {args.repeats}, interleaved)")
    c = ms["drafter forward"] / ms["target forward"]
    floor = 1 + 3 * depth * c
    print(f"c = drafter ÷ target forward  {c:8.3f}")
    print(f"floor 1 + 3·depth·c          {floor:8.2f}x")
    for name in losses:
        ratio = ms[f"train step, {name}"] / ms["target forward"]
        print(f"step ÷ forward, {name:13s}{ratio:8.2f}x  = {ratio / floor:.2f}x the floor")
    print(f"load average (1/5/15 min) at end: {load()}")
    for name in losses if args.profile else ():
        directory = f"{args.profile}/{name.replace(' ', '_')}"
        sources = hlo_sources(steps[name].as_text())
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            for _ in range(2):
                jax.block_until_ready(train(name)())
        print(f"costliest ops of 2 train steps, {name} (ms, op, shape, source):")
        for ms_total, op, source in costliest_ops(directory, sources):
            print(f"  {ms_total:9.1f}  {op:28s} {source}")


if __name__ == "__main__":
    main()
