"""Speculative decoding at a size where compute matters: a ~60M E2B-like target and a 3% drafter, on CPU.

    OMP_NUM_THREADS=1 python benchmarks/decode_e2b.py [--reps 5] [--batches 1,4,16]    # ~4-6 min on 2 busy cores

The target is a random Gemma 4 of E2B's shape scaled down (width 512, 12 layers, vocabulary 4096, per-layer
embeddings, the last 6 layers KV-shared with double-wide MLPs), built and saved by transformers; the drafter has 4
layers of width 128 (about 3% of the target) and copies the last token (the construction of
tests/decoding/drafters.py), so drafts are accepted where the random target repeats itself. Both sides load the
same saved directories. Greedy, batch 1, k = 4, 128 new tokens, no stop tokens. It prints

(1) components, each a separately jitted call timed on its own (median of interleaved calls, dispatch included):
    a one-token decode step and a verify forward of k+1 tokens over a half-filled cache, one drafter step and
    k drafter steps; and one round of a long speculative generation (wall time ÷ target forwards);
(2) end to end at batch 1: mtp plain and speculative, transformers plain and assisted, tokens/s (medians of
    interleaved repetitions after a warm-up), τ, speedup over plain and efficiency = speedup ÷ τ, with all four
    outputs asserted identical;
(3) throughput (tokens/s over all rows) of mtp plain and speculative decoding at several batch sizes.
See benchmarks/README.md for the measured figures.
"""

from __future__ import annotations

import argparse
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
import torch
from flax import nnx
from transformers import Gemma4ForCausalLM, Gemma4TextConfig

from benchmarks.decode_speed import counting_hf_forwards
from mtp.checkpoint import load_target
from mtp.checkpoint.hf_drafter import load_drafter, save_drafter
from mtp.decoding.generate import generate, summarize
from mtp.drafter.draft import draft
from mtp.drafter.model import Drafter
from mtp.gemma4.cache import KVCache
from mtp.gemma4.model import Gemma4, drafter_kv_from_cache
from tests import hf_oracle  # sets torch to one thread
from tests.decoding.drafters import copy_drafter

NUM_LAYERS = 12
E2B_LIKE = hf_oracle.tiny_text_config_dict("e2b_like") | {
    "vocab_size": 4096,
    "vocab_size_per_layer_input": 4096,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": 8,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "global_head_dim": 128,
    "layer_types": hf_oracle.layer_pattern(NUM_LAYERS, (3, 7, 11)),
    "sliding_window": 128,
    "hidden_size_per_layer_input": 64,
    "num_kv_shared_layers": 6,
    "use_double_wide_mlp": True,
}
PROMPT_LEN = 16


def build_target(path: pathlib.Path) -> None:
    """Random weights with hf_oracle's scales, except a larger embedding: the target then repeats tokens often."""
    model = Gemma4ForCausalLM(Gemma4TextConfig(**E2B_LIKE, attn_implementation="eager")).to(torch.float32).eval()
    hf_oracle.randomize_(model, seed=1)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(3.2)
    hf_oracle.save_target(model, path)


def num_params(module: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def interleaved_ms(fns: dict, reps: int) -> dict[str, float]:
    """Median milliseconds of each callable, the repetitions interleaved so all see the same machine load."""
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def components(target: Gemma4, drafter: Drafter, draft_len: int, max_new: int, reps: int) -> dict[str, float]:
    """(1): decode step, verify forward, drafter steps over a half-filled cache of the engine's size, and a round."""
    target_graph, drafter_graph = nnx.graphdef(target), nnx.graphdef(drafter)
    target_state, drafter_state = nnx.state(target), nnx.state(drafter)

    @functools.partial(jax.jit, donate_argnums=2)
    def forward(target_state, chunk_BT, cache):
        out, cache = nnx.merge(target_graph, target_state)(chunk_BT, cache)
        return out.logits, out.hidden, cache

    @functools.partial(jax.jit, static_argnames="steps")
    def drafting(target_state, drafter_state, token_B, hidden_BD, cache, steps):
        target, drafter = nnx.merge(target_graph, target_state), nnx.merge(drafter_graph, drafter_state)
        kv = drafter_kv_from_cache(target.config, cache)
        return draft(drafter, target, token_B, hidden_BD, cache.length, kv, num_tokens=steps).tokens_BP

    cache = KVCache.init(target.config, 1, PROMPT_LEN + max_new + draft_len + 1, max_chunk=draft_len + 1)
    filled = np.random.default_rng(2).integers(3, target.config.vocab_size, (1, PROMPT_LEN + max_new // 2))
    prefill = jax.jit(lambda s, x, c: nnx.merge(target_graph, s)(x, c, return_logits=False, prefill=True))
    out, cache = prefill(target_state, jnp.asarray(filled), cache)
    holder = {"cache": cache.commit(jnp.array([filled.shape[1]]))}
    token, hidden = jnp.asarray(filled[:, 0], jnp.int32), out.hidden[:, -1]

    def verify(length):
        chunk = jnp.asarray(filled[:, :length], jnp.int32)

        def run():
            *outs, holder["cache"] = forward(target_state, chunk, holder["cache"])
            jax.block_until_ready(outs)

        return run

    def drafter_steps(steps):
        return lambda: jax.block_until_ready(
            drafting(target_state, drafter_state, token, hidden, holder["cache"], steps)
        )

    @jax.jit
    def nothing(target_state, drafter_state, token_B, hidden_BD, cache):
        return token_B + 1

    def dispatch():  # the per-call floor that each separately jitted part pays and a round inside the loop does not
        jax.block_until_ready(nothing(target_state, drafter_state, token, hidden, holder["cache"]))

    prompt = np.random.default_rng(1).integers(3, target.config.vocab_size, PROMPT_LEN).tolist()
    long_run = functools.partial(
        generate, target, drafter, [prompt], draft_len=draft_len, max_new_tokens=max_new, stop_tokens=()
    )
    (output,), _ = long_run()
    fns = {
        "decode": verify(1),
        "verify": verify(draft_len + 1),
        "draft_1": drafter_steps(1),
        "draft_k": drafter_steps(draft_len),
        "dispatch": dispatch,
    }
    fns |= {f"bare T={t}": bare_dots(target, t) for t in (1, draft_len + 1)}
    for fn in fns.values():
        fn()  # compile
    ms = interleaved_ms(fns, 12 * reps)
    ms["round"] = interleaved_ms({"run": long_run}, reps)["run"] / output.target_forwards
    ms["round_tau"] = summarize([output], draft_len, 1.0)["acceptance_length"]
    return ms


def bare_dots(target: Gemma4, length: int):
    """Only the target's matrix products at T = ``length``: every weight matrix times [1, T, its input width].

    Attention, norms, the cache and the PLE gathers are left out: what XLA's dots alone cost at this T. The tied
    embedding is multiplied as the head does (``BTD,VD->BTV``), every other weight as ``[input, output]``.
    """
    flat = {path: v[...] for path, v in nnx.to_flat_state(nnx.state(target, nnx.Param))}
    head = flat.pop(("embed",))
    del flat[("ple_embed",)]  # a gather table, not a matmul
    weights = [w.reshape(w.shape[0], -1) for w in flat.values() if w.ndim >= 2]
    rng = np.random.default_rng(4)
    widths = {w.shape[0] for w in weights} | {head.shape[1]}
    inputs = {n: jnp.asarray(rng.normal(size=(1, length, n)), jnp.float32) for n in widths}

    @jax.jit
    def dots(inputs, weights, head):
        outs = [jnp.einsum("BTI,IO->BTO", inputs[w.shape[0]], w) for w in weights]
        return [*outs, jnp.einsum("BTD,VD->BTV", inputs[head.shape[1]], head)]

    return lambda: jax.block_until_ready(dots(inputs, weights, head))


def end_to_end(target, drafter, target_dir, drafter_dir, draft_len, max_new, reps) -> dict[str, float]:
    """(2): tokens/s of mtp and transformers, plain and speculative, on identical greedy outputs."""
    hf_target, assistant = hf_oracle.load_target(target_dir), hf_oracle.load_assistant(drafter_dir)
    prompt = np.random.default_rng(0).integers(3, target.config.vocab_size, PROMPT_LEN).tolist()
    ours = {
        name: functools.partial(
            generate, target, drafter, [prompt], draft_len=k, max_new_tokens=max_new, stop_tokens=()
        )
        for name, k in (("mtp plain", 0), ("mtp speculative", draft_len))
    }
    theirs = {
        "HF plain": functools.partial(hf_oracle.reference_greedy, hf_target, np.array([prompt]), max_new),
        "HF assisted": functools.partial(
            hf_oracle.reference_assisted_greedy, hf_target, assistant, np.array([prompt]), max_new
        ),
    }
    (plain,), _ = ours["mtp plain"]()
    (spec,), _ = ours["mtp speculative"]()
    with counting_hf_forwards() as counter:
        hf_assisted = theirs["HF assisted"]()[0].tolist()
    hf_plain = theirs["HF plain"]()[0].tolist()
    assert plain.token_ids == spec.token_ids, "mtp speculative differs from mtp plain"
    assert plain.token_ids == hf_plain, "mtp plain differs from transformers plain"
    assert plain.token_ids == hf_assisted, "mtp differs from transformers assisted"
    ms = interleaved_ms(ours | theirs, reps)
    result = {f"{name} tok/s": 1e3 * max_new / t for name, t in ms.items()}
    result["tau"] = summarize([spec], draft_len, 1.0)["acceptance_length"]
    result["HF tau"] = (max_new - 1) / (counter["forwards"] - 1)
    return result


def throughput(target, drafter, draft_len, max_new, batches, reps) -> dict[tuple[int, int], float]:
    """(3): tokens/s over all rows of mtp plain and speculative decoding, one batch of different prompts each."""
    rng = np.random.default_rng(3)
    fns, taus = {}, {}
    for batch in batches:
        prompts = rng.integers(3, target.config.vocab_size, (batch, PROMPT_LEN)).tolist()
        for k in (0, draft_len):
            fns[(batch, k)] = functools.partial(
                generate, target, drafter, prompts, draft_len=k, max_new_tokens=max_new, stop_tokens=()
            )
            outputs, _ = fns[(batch, k)]()
            taus[(batch, k)] = summarize(outputs, k, 1.0)["acceptance_length"]
    ms = interleaved_ms(fns, reps)
    return {key: (1e3 * key[0] * max_new / ms[key], taus[key]) for key in fns}


def line(name: str, ms: float, note: str = "") -> str:
    return f"  {name:<32}{ms:8.2f}   {note}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft_len", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batches", default="1,4,16")
    args = parser.parse_args()
    k, max_new = args.draft_len, args.max_new_tokens
    cpus = len(os.sched_getaffinity(0))
    print(f"load average {os.getloadavg()}; jax {jax.__version__} on {jax.devices()[0].platform}, {cpus} CPUs")
    with tempfile.TemporaryDirectory() as workdir:
        target_dir, drafter_dir = pathlib.Path(workdir, "target"), pathlib.Path(workdir, "drafter")
        build_target(target_dir)
        target = load_target(target_dir)
        drafter = copy_drafter(target, num_layers=4, hidden_size=128, num_heads=4, intermediate_size=512)
        save_drafter(drafter, drafter_dir, num_assistant_tokens=k)
        drafter = load_drafter(drafter_dir, target_config=target.config)
        sizes = num_params(target), num_params(drafter)
        print(f"target {sizes[0] / 1e6:.1f}M parameters, drafter {sizes[1] / 1e6:.2f}M ({sizes[1] / sizes[0]:.1%})")

        c = components(target, drafter, k, 4 * max_new, args.reps)
        bare_1, bare_k = c["bare T=1"], c[f"bare T={k + 1}"]
        print(f"\n(1) components, ms (separately jitted calls; round = {4 * max_new}-token generation ÷ rounds)")
        print(line("decode step (1 token)", c["decode"]))
        print(
            line(f"verify (k+1={k + 1} tokens)", c["verify"], f"{c['verify'] / c['decode']:.2f}x decode (goal <= 1.1)")
        )
        print(line("bare dots of its weights, T=1", bare_1))
        print(line(f"bare dots, T={k + 1}", bare_k, f"{bare_k / bare_1:.2f}x T=1 (the verify ratio's floor)"))
        print(line("drafter step", c["draft_1"]))
        print(line(f"drafter, k={k} steps", c["draft_k"], f"{c['draft_k'] / c['decode']:.2f}x decode (goal <= 0.15)"))
        print(line("dispatch (computes nothing)", c["dispatch"], "paid by each call above, not inside the loop"))
        ratio = c["round"] / (c["verify"] + c["draft_k"])
        print(line("round", c["round"], f"{ratio:.2f}x (verify + k steps) (goal <= 1.1), τ {c['round_tau']:.2f}"))

        e = end_to_end(target, drafter, target_dir, drafter_dir, k, max_new, args.reps)
        speedup = e["mtp speculative tok/s"] / e["mtp plain tok/s"]
        print(f"\n(2) batch 1, greedy, k={k}, {max_new} new tokens, identical tokens asserted, median of {args.reps}")
        for name in ("mtp plain", "mtp speculative", "HF plain", "HF assisted"):
            print(f"  {name:<18}{e[f'{name} tok/s']:8.0f} tok/s")
        print(
            f"  τ {e['tau']:.2f} (HF {e['HF tau']:.2f}); speedup over plain {speedup:.2f}x; efficiency "
            f"{speedup / e['tau']:.2f} (goal >= 0.8); vs HF assisted "
            f"{e['mtp speculative tok/s'] / e['HF assisted tok/s']:.1f}x (goal >= 5)"
        )

        batches = [int(b) for b in args.batches.split(",")]
        t = throughput(target, drafter, k, max_new, batches, args.reps)
        print(f"\n(3) throughput, tokens/s over all rows, {max_new} new tokens per row")
        print(f"  {'batch':>5} {'plain':>8} {'spec':>8} {'ratio':>6} {'τ':>5}")
        for b in batches:
            print(
                f"  {b:>5} {t[(b, 0)][0]:8.0f} {t[(b, k)][0]:8.0f} {t[(b, k)][0] / t[(b, 0)][0]:6.2f} "
                f"{t[(b, k)][1]:5.2f}"
            )
    print(f"\nload average {os.getloadavg()}")


if __name__ == "__main__":
    main()
