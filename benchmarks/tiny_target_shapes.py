"""Which embedded target shape makes speculative decoding pay on this CPU: decode cost vs drafter cost vs training.

    OMP_NUM_THREADS=1 python benchmarks/tiny_target_shapes.py [--reps 3]    # a few minutes on 2 busy cores

For each candidate target (random weights, float32) and the tiny drafter of ``configs/tiny.py``: train tokens/s
of the target's pretraining step (batch 16 x 128), ms per token of plain decoding, ms per speculative round at
k = 1 and k = 4 (a random drafter: rounds = tokens), the drafter's ms per step ((round k=4 - round k=1) / 3), the
target-step ÷ drafter-step ratio, and the speedup k = 4 would give at τ = 2.5 and 3.0 (plain ms × τ ÷ round ms).
Batch 1, 64 new tokens, no stop tokens; medians of interleaved repetitions, one process.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from configs import tiny, tiny_target
from mtp.decoding.generate import generate
from mtp.drafter.model import Drafter
from mtp.embedded import target as tt
from mtp.sharding import make_mesh, state_shardings
from mtp.training.objectives import NextToken
from mtp.training.setup import drafter_config_for
from mtp.training.state import batch_sharding, init_state, make_optimizer, replicated, split_trainable
from mtp.training.step import jit_train_step

SLIDING, FULL = "sliding_attention", "full_attention"
ROW = "| {} | {:.1f}M | {:.2f}M | {:.0f} | {:.2f} | {:.2f} | {:.2f} | {:.2f} | {:.1f} | {:.2f} | {:.2f} |"


def layer_types(n: int) -> tuple[str, ...]:
    return tuple(FULL if (i + 1) % 4 == 0 or i == n - 1 else SLIDING for i in range(n))


CANDIDATES = {  # name: (layers, width, mlp, heads, vocab)
    "4L w128 V512 (old)": (4, 128, 512, 4, 512),
    "12L w256 V4096": (12, 256, 1024, 4, 4096),
    "24L w256 V4096": (24, 256, 1024, 4, 4096),
    "32L w192 V4096": (32, 192, 768, 4, 4096),
    "12L w512 V4096": (12, 512, 2048, 8, 4096),
}


def target_config(layers, width, mlp, heads, vocab) -> ml_collections.ConfigDict:
    config = tiny_target.get_config()
    config.unlock()
    config.model.update(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=mlp,
        num_layers=layers,
        num_heads=heads,
        layer_types=layer_types(layers),
    )
    return config


def train_tokens_per_second(config, steps: int = 3) -> float:
    """The trainer's jitted step for the target's pretraining objective (what ``ensure_tiny_target`` runs)."""
    mesh = make_mesh(config.mesh.to_dict())
    graph, params, extra = split_trainable(tt.init_model(config))
    tx, schedule = make_optimizer(config)
    state, state_sh = init_state(params, extra, tx, mesh)
    frozen = nnx.State({})
    step = jit_train_step(
        state_sh,
        state_shardings(frozen, mesh),
        batch_sharding(mesh),
        replicated(mesh),
        graph=graph,
        objective=NextToken(),
        tx=tx,
        schedule=schedule,
    )
    rng = np.random.default_rng(0)
    batch = {
        "tokens": jnp.asarray(rng.integers(110, config.model.vocab_size, (16, 128)), jnp.int32),
        "positions": jnp.tile(jnp.arange(128, dtype=jnp.int32), (16, 1)),
        "segment_ids": jnp.ones((16, 128), jnp.int32),
        "loss_mask": jnp.ones((16, 128), jnp.int32),
    }
    state, metrics = step(state, frozen, batch)
    metrics["loss"].block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, frozen, batch)
    metrics["loss"].block_until_ready()
    return steps * 16 * 128 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=64)
    args = parser.parse_args()
    drafter_settings = tiny.get_config()
    prompts = [list(range(110, 140))]
    rows = []
    for name, shape in CANDIDATES.items():
        config = target_config(*shape)
        target = tt.init_model(config)
        drafter = Drafter(drafter_config_for(drafter_settings, target.config), rngs=nnx.Rngs(0))
        kwargs = dict(max_new_tokens=args.new_tokens, stop_tokens=(), pad_multiple=32)
        times = {0: [], 1: [], 4: []}
        forwards = {}
        for k in times:  # compile
            generate(target, drafter if k else None, prompts, draft_len=k, **kwargs)
        for _ in range(args.reps):
            for k in times:
                start = time.perf_counter()
                outputs, _ = generate(target, drafter if k else None, prompts, draft_len=k, **kwargs)
                times[k].append(time.perf_counter() - start)
                forwards[k] = outputs[0].target_forwards + 1
        ms = {k: 1000 * statistics.median(v) / forwards[k] for k, v in times.items()}
        drafter_ms = max((ms[4] - ms[1]) / 3, 1e-3)
        params = sum(int(np.prod(x.shape)) for x in jax_leaves(nnx.state(target, nnx.Param)))
        dparams = sum(int(np.prod(x.shape)) for x in jax_leaves(nnx.state(drafter, nnx.Param)))
        row = (
            name,
            params / 1e6,
            dparams / 1e6,
            train_tokens_per_second(config),
            ms[0],
            ms[1],
            ms[4],
            drafter_ms,
            ms[0] / drafter_ms,
            2.5 * ms[0] / ms[4],
            3.0 * ms[0] / ms[4],
        )
        rows.append(row)
        print(ROW.format(*row), flush=True)
    print(
        "| target | params | drafter params | train tok/s | plain ms/token | round k=1 ms | round k=4 ms | "
        "drafter ms/step | target/drafter | speedup τ=2.5 | speedup τ=3 |"
    )
    for row in rows:
        print(ROW.format(*row))


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


if __name__ == "__main__":
    main()
