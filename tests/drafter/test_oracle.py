"""Our drafter against transformers' Gemma4AssistantForCausalLM on identical inputs, every tiny target kind.

Inputs are what HF's generator feeds (scaled target embedding, target hidden state, the target's shared K/V of
positions < p) at p = 12 and 20 (past window + 1 = 9), four rows in one batch. Our rows read one cache-like K/V
with stale slots (positions >= p), empty slots and a shuffled slot order, which must not matter.

Tolerances (those of tests/gemma4/test_oracle.py): float64 on both sides within 1e-6 (measured <= 1.5e-14), and
float32 no further from transformers' float64 answer than 2.5 times transformers' own float32 error, floor 1e-5. A
plain 1e-5 against transformers' float32 is too tight: some rows are ill-conditioned (rounding the weights by one
float32 ulp moves their logits by 3.5e-6), so two correct float32 implementations differ by up to 1.1e-5.
Measured here: ours <= 8.8e-6 from float64 (keqv_like), transformers' float32 <= 2.5e-6.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp.checkpoint.hf_drafter import load_drafter
from mtp.gemma4.config import SLIDING
from mtp.gemma4.model import LayerKV
from tests import hf_oracle
from tests.drafter.conftest import hf_step_inputs, token_ids
from tests.gemma4.test_oracle import assert_close, assert_float32_close, max_err, transformers_in_float64

F64_ATOL = 1e-6
CASES = [(kind, ordered) for kind in hf_oracle.TARGET_KINDS for ordered in (False, True)]
IDS = [f"{kind}-{'ordered' if ordered else 'plain'}" for kind, ordered in CASES]
ROWS = ((0, 12), (1, 12), (0, 20), (1, 20))  # (prompt row, drafter position)
JUNK_POSITIONS = (-1, 25, -1, 30)


@functools.partial(nnx.jit, static_argnames="dtype")
def step(drafter, embed, hidden, positions, kv, dtype=jnp.float32):
    return drafter(embed, hidden, positions, kv, dtype=dtype)


def step_inputs(hf_target, seed: int = 7) -> tuple[tuple, list]:
    """Our batched inputs for ROWS, and HF's per row: (inputs_embeds, position_ids, shared K/V)."""
    ids = token_ids(2, 21, seed)
    per_position = {p: hf_step_inputs(hf_target, ids, p) for p in (12, 20)}
    embed = np.concatenate([per_position[p][0][b : b + 1] for b, p in ROWS])
    hidden = np.concatenate([per_position[p][1][b : b + 1] for b, p in ROWS])
    rng = np.random.default_rng(seed)
    num_slots = 20 + len(JUNK_POSITIONS)
    order = rng.permutation(num_slots)
    positions = np.broadcast_to(np.array([*range(20), *JUNK_POSITIONS], np.int32), (len(ROWS), num_slots))
    kv = {}
    for layer_type, (k, v) in per_position[20][2].items():
        rows = [b for b, _ in ROWS]
        junk = 5 * rng.normal(size=(len(ROWS), k.shape[1], len(JUNK_POSITIONS), k.shape[3])).astype(np.float32)
        keys, values = np.concatenate([k[rows], junk], 2), np.concatenate([v[rows], junk], 2)
        kv[layer_type] = LayerKV(keys[:, :, order], values[:, :, order], positions[:, order])
    theirs = []
    for b, p in ROWS:
        inputs = np.concatenate([embed, hidden], axis=-1)[len(theirs)][None]
        shared = {t: (k[b : b + 1], v[b : b + 1]) for t, (k, v) in per_position[p][2].items()}
        theirs.append((inputs, np.array([[p]]), shared))
    query_positions = np.array([[p] for _, p in ROWS], np.int32)
    return (embed, hidden, query_positions, kv), theirs


def hf_refs(assistant, theirs) -> dict[str, np.ndarray]:
    """transformers' step one row at a time (its centroid fill is a batch-global min; ours is per row)."""
    rows = [hf_oracle.reference_draft_step(assistant, *row) for row in theirs]
    return {name: np.concatenate([r[name] for r in rows]) for name in ("logits", "projected")}


def hf_refs_float64(assistant, theirs) -> dict[str, np.ndarray]:
    """The same steps with transformers entirely in float64 (same inputs, upcast)."""
    theirs = [
        (inputs.astype(np.float64), pos, {t: (k.astype(np.float64), v.astype(np.float64)) for t, (k, v) in kv.items()})
        for inputs, pos, kv in theirs
    ]
    with transformers_in_float64():
        try:
            return hf_refs(assistant.double(), theirs)
        finally:
            assistant.float()


def ours(drafter, inputs, dtype=jnp.float32) -> dict[str, np.ndarray]:
    embed, hidden, positions, kv = inputs
    kv = {t: LayerKV(jnp.asarray(x.keys, dtype), jnp.asarray(x.values, dtype), x.positions) for t, x in kv.items()}
    out = step(drafter, jnp.asarray(embed, dtype), jnp.asarray(hidden, dtype), jnp.asarray(positions), kv, dtype)
    return {"logits": np.asarray(out.logits_BTV), "projected": np.asarray(out.projected_BTD)}


@pytest.mark.parametrize(("kind", "ordered"), CASES, ids=IDS)
def test_draft_step_matches_transformers(kind, ordered, targets, assistants):
    hf_target, _ = targets(kind)
    hf_assistant, path, drafter = assistants(kind, ordered)
    inputs, theirs = step_inputs(hf_target)
    ref32, ref64 = hf_refs(hf_assistant, theirs), hf_refs_float64(hf_assistant, theirs)
    got = ours(drafter, inputs)
    with jax.enable_x64(True):
        got64 = ours(load_drafter(path, dtype=jnp.float64), inputs, jnp.float64)
    assert got64["logits"].dtype == np.float64
    for name in ("logits", "projected"):
        what = f"{kind} ordered={ordered} {name}"
        assert_float32_close(got[name], ref32[name], ref64[name], what)
        assert_close(got64[name], ref64[name], F64_ATOL, f"{what} (float64)")
    if ordered:  # exactly top_k clusters x V/C tokens get real scores, per row
        real = np.sum(got["logits"] > got["logits"].min(-1, keepdims=True), axis=-1)
        assert np.all(real == 4 * hf_oracle.VOCAB // 16)


def test_sliding_window_is_w_plus_one(targets, assistants):
    """At p = 12 the oldest visible sliding entry is p - W - 1 = 3: dropping it matters, dropping 2 does not."""
    _, _, drafter = assistants("dense", False)
    inputs, _ = step_inputs(targets("dense")[0])
    base = ours(drafter, inputs)["logits"]

    def without(position):
        embed, hidden, positions, kv = inputs
        sliding = kv[SLIDING]
        dropped = np.where(sliding.positions == position, -1, sliding.positions)
        return ours(
            drafter, (embed, hidden, positions, {**kv, SLIDING: LayerKV(sliding.keys, sliding.values, dropped)})
        )

    assert max_err(without(12 - hf_oracle.SLIDING_WINDOW - 2)["logits"], base) == 0.0
    dropped = without(12 - hf_oracle.SLIDING_WINDOW - 1)["logits"]
    assert max_err(dropped[:2], base[:2]) > 1e-3  # rows at p = 12
    assert max_err(dropped[2:], base[2:]) == 0.0  # rows at p = 20 see 11..19
