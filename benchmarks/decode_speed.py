"""Decoding speed on CPU: our jitted speculative loop against transformers, and the loop's own overhead.

    OMP_NUM_THREADS=1 python benchmarks/decode_speed.py [--kinds dense,e2b_like] [--reps 7]

(1) On the tiny HF checkpoints of tests/hf_oracle.py (greedy, batch 1, the copying drafter of
tests/decoding/drafters.py exported to HF so its drafts get accepted): tokens/s of ``mtp.decoding.generate`` against
``target.generate(assistant_model=...)``, identical tokens asserted, medians of interleaved repetitions after a
warm-up (our compilation excluded), torch on one thread. τ = tokens after the prefill ÷ target forwards after it.
(2) Engine overhead: wall time per speculative round of a long greedy generation (total ÷ rounds) against one
jitted target forward of k+1 tokens over a cache plus one jitted ``draft`` of k steps, each timed on its own.
See benchmarks/README.md for what the figures mean. Takes about 2 minutes on 2 busy CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from anywhere without installing mtp

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp.checkpoint import load_target
from mtp.checkpoint.hf_drafter import load_drafter, save_drafter
from mtp.decoding.generate import generate, summarize
from mtp.drafter.draft import draft
from mtp.gemma4.cache import KVCache
from mtp.gemma4.config import FULL, SLIDING, Gemma4Config
from mtp.gemma4.model import Gemma4, drafter_kv_from_cache
from tests import hf_oracle  # sets torch to one thread
from tests.decoding.drafters import copy_drafter

# A "slightly bigger tiny" target for (2): the tiny kinds run a forward in well under a millisecond, where the
# dispatch of a separately jitted call is a large share of what is measured.
BIGGER = Gemma4Config(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=2048,
    num_layers=8,
    num_heads=8,
    num_kv_heads=2,
    head_dim=64,
    global_head_dim=128,
    layer_types=(SLIDING, SLIDING, SLIDING, FULL) * 2,
    sliding_window=64,
)


def median_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def counting_hf_forwards():
    """Counts transformers' target forwards: one ``update_candidate_strategy`` call each, the prefill's included."""
    from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator as generator

    counter = {"forwards": 0}
    update = generator.update_candidate_strategy

    def counting(self, *args, **kwargs):
        counter["forwards"] += 1
        return update(self, *args, **kwargs)

    generator.update_candidate_strategy = counting
    try:
        yield counter
    finally:
        generator.update_candidate_strategy = update


def versus_transformers(kind: str, draft_len: int, max_new: int, reps: int, workdir: pathlib.Path) -> dict:
    """(1) for one tiny kind: tokens/s and τ of both implementations on identical greedy outputs."""
    target_dir, drafter_dir = workdir / f"target_{kind}", workdir / f"drafter_{kind}"
    hf_oracle.save_target(hf_oracle.build_target(kind, seed=1), target_dir)
    target = load_target(target_dir)
    save_drafter(copy_drafter(target), drafter_dir, num_assistant_tokens=draft_len)
    drafter = load_drafter(drafter_dir, target_config=target.config)
    hf_target, assistant = hf_oracle.load_target(target_dir), hf_oracle.load_assistant(drafter_dir)
    prompt = np.random.default_rng(0).integers(3, hf_oracle.VOCAB, 12).tolist()

    ours = functools.partial(
        generate, target, drafter, [prompt], draft_len=draft_len, max_new_tokens=max_new, stop_tokens=()
    )
    theirs = functools.partial(hf_oracle.reference_assisted_greedy, hf_target, assistant, np.array([prompt]), max_new)
    (output,), _ = ours()  # compiles
    with counting_hf_forwards() as counter:
        hf_tokens = theirs()[0].tolist()
    assert output.token_ids == hf_tokens, f"{kind}: outputs differ"
    hf_tau = (max_new - 1) / (counter["forwards"] - 1)
    ours_times, theirs_times = [], []
    for _ in range(reps):  # interleaved, so both see the same machine load
        ours_times.append(median_seconds(ours, 1))
        theirs_times.append(median_seconds(theirs, 1))
    ours_tps, theirs_tps = max_new / statistics.median(ours_times), max_new / statistics.median(theirs_times)
    return {
        "kind": kind,
        "ours_tps": ours_tps,
        "hf_tps": theirs_tps,
        "speedup": ours_tps / theirs_tps,
        "ours_tau": summarize([output], draft_len, 1.0)["acceptance_length"],
        "hf_tau": hf_tau,
    }


def component_fns(target: Gemma4, drafter, draft_len: int):
    """The engine's two parts as separately jitted functions of the weights (graphs closed over, not hashed per call).

    ``forward``: the verification forward of k+1 tokens over the cache (donated, so it is updated in place as in
    the loop); ``drafting``: k drafter steps over the target's cache.
    """
    target_graph, drafter_graph = nnx.graphdef(target), nnx.graphdef(drafter)

    @functools.partial(jax.jit, donate_argnums=2)
    def forward(target_state, chunk_BT, cache):
        out, cache = nnx.merge(target_graph, target_state)(chunk_BT, cache)
        return out.logits, out.hidden, cache

    @jax.jit
    def drafting(target_state, drafter_state, token_B, hidden_BD, cache):
        target, drafter = nnx.merge(target_graph, target_state), nnx.merge(drafter_graph, drafter_state)
        kv = drafter_kv_from_cache(target.config, cache)
        return draft(drafter, target, token_B, hidden_BD, cache.length, kv, num_tokens=draft_len).tokens_BP

    @jax.jit
    def nothing(target_state, drafter_state, token_B, hidden_BD, cache):
        return token_B + 1

    return forward, drafting, nothing


def engine_overhead(target: Gemma4, draft_len: int, max_new: int, reps: int, component_reps: int) -> dict:
    """(2): time per round of a long generation against its two parts timed separately, same shapes."""
    drafter = copy_drafter(target)
    prompt = np.random.default_rng(1).integers(3, target.config.vocab_size, 16).tolist()
    run = functools.partial(
        generate, target, drafter, [prompt], draft_len=draft_len, max_new_tokens=max_new, stop_tokens=()
    )
    (output,), _ = run()
    round_seconds = median_seconds(run, reps) / output.target_forwards

    # The engine's cache: padded prompt (16) + max_new + draft_len + 1 slots, filled to mid-generation.
    cache = KVCache.init(target.config, 1, 16 + max_new + draft_len + 1, max_chunk=draft_len + 1)
    filled = np.random.default_rng(2).integers(3, target.config.vocab_size, (1, 16 + max_new // 2))
    out, cache = nnx.jit(lambda t, x, c: t(x, c, return_logits=False, prefill=True))(target, jnp.asarray(filled), cache)
    cache = cache.commit(jnp.array([filled.shape[1]]))
    target_state, drafter_state = nnx.state(target), nnx.state(drafter)
    forward_fn, drafting_fn, nothing_fn = component_fns(target, drafter, draft_len)
    chunk = jnp.asarray(filled[:, : draft_len + 1], jnp.int32)
    token, hidden = chunk[:, 0], out.hidden[:, -1]
    holder = {"cache": cache}

    def forward():
        *outs, holder["cache"] = forward_fn(target_state, chunk, holder["cache"])
        jax.block_until_ready(outs)

    def drafting():
        jax.block_until_ready(drafting_fn(target_state, drafter_state, token, hidden, holder["cache"]))

    def dispatch():  # a jitted call with the same arguments that computes nothing: the per-call floor
        jax.block_until_ready(nothing_fn(target_state, drafter_state, token, hidden, holder["cache"]))

    forward(), drafting(), dispatch()  # compile
    forward_seconds = median_seconds(forward, component_reps)
    draft_seconds = median_seconds(drafting, component_reps)
    dispatch_seconds = median_seconds(dispatch, component_reps)
    return {
        "round_ms": 1e3 * round_seconds,
        "forward_ms": 1e3 * forward_seconds,
        "draft_ms": 1e3 * draft_seconds,
        "dispatch_ms": 1e3 * dispatch_seconds,
        "ratio": round_seconds / (forward_seconds + draft_seconds),
        "rounds": output.target_forwards,
        "tau": summarize([output], draft_len, 1.0)["acceptance_length"],
    }


def row(*cells) -> str:
    """A table line: the first cell left-aligned, the others right-aligned."""
    return f"{cells[0]:<14}" + "".join(f"{cell:>12}" for cell in cells[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(hf_oracle.TARGET_KINDS))
    parser.add_argument("--draft_len", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    k, max_new = args.draft_len, args.max_new_tokens
    cpus = len(os.sched_getaffinity(0))
    print(f"load average {os.getloadavg()}; jax {jax.__version__} on {jax.devices()[0].platform}, {cpus} CPUs")

    print(
        f"\n(1) vs transformers assisted generation: greedy, batch 1, k={k}, {max_new} new tokens, median of "
        f"{args.reps} (goal: speedup >= 5)"
    )
    print(row("kind", "ours tok/s", "HF tok/s", "speedup", "τ ours", "τ HF"))
    with tempfile.TemporaryDirectory() as workdir:
        for kind in args.kinds.split(","):
            r = versus_transformers(kind, k, max_new, args.reps, pathlib.Path(workdir))
            print(
                row(
                    kind,
                    f"{r['ours_tps']:.0f}",
                    f"{r['hf_tps']:.0f}",
                    f"{r['speedup']:.1f}x",
                    f"{r['ours_tau']:.2f}",
                    f"{r['hf_tau']:.2f}",
                ),
                flush=True,
            )

    long = 4 * max_new
    print(
        f"\n(2) engine overhead: ms per round of a {long}-token greedy generation ÷ (one jitted target forward of "
        f"k+1={k + 1} tokens + one jitted draft of k steps), median of {args.reps} (goal: ratio <= 1.2)"
    )
    print(row("target", "round", "forward", "draft", "ratio", "dispatch", "rounds", "τ"))
    with tempfile.TemporaryDirectory() as workdir:
        hf_oracle.save_target(hf_oracle.build_target("dense", seed=1), workdir)
        bigger = Gemma4(BIGGER, rngs=nnx.Rngs(0))
        size = sum(x.size for x in jax.tree.leaves(nnx.state(bigger, nnx.Param))) / 1e6
        targets = {"tiny dense": (load_target(workdir), 200), f"bigger {size:.0f}M": (bigger, 30)}
        for name, (target, component_reps) in targets.items():
            r = engine_overhead(target, k, long, args.reps, component_reps)
            print(
                row(
                    name,
                    *(f"{r[key]:.3f}" for key in ("round_ms", "forward_ms", "draft_ms")),
                    f"{r['ratio']:.2f}",
                    f"{r['dispatch_ms']:.3f}",
                    r["rounds"],
                    f"{r['tau']:.2f}",
                ),
                flush=True,
            )
    print(f"\nload average {os.getloadavg()}")


if __name__ == "__main__":
    main()
