"""Speculative sampling is lossless: sampled sequences are distributed exactly as the target's own samples.

On a 4-token vocabulary, 3-token continuations have 64 outcomes whose exact probabilities come from the target
itself. A chi-square goodness-of-fit test (fixed seed, cells with expected count < 5 merged) must not reject at
p = 1e-3 for the real rule, and must reject at p = 1e-6 when the rule is deliberately broken. A sample the
processed target distribution gives probability 0 (top-k / top-p) fails outright.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from mtp.decoding import sampling as sampling_lib
from mtp.decoding.generate import generate
from mtp.decoding.sampling import Sampling
from mtp.target.config import FULL, SLIDING, Gemma4Config
from mtp.target.model import Gemma4
from tests.decoding.drafters import random_drafter

VOCAB, NEW, SAMPLES = 4, 3, 12_000
PROMPT = [1, 2, 3, 0, 2]


@pytest.fixture(scope="module")
def pair():
    config = Gemma4Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
        head_dim=8, global_head_dim=8, layer_types=(SLIDING, FULL), sliding_window=4, final_logit_softcapping=None,
    )  # fmt: skip
    target = Gemma4(config, rngs=nnx.Rngs(3))
    target.embed[...] = target.embed[...] * 0.3  # keep the target's distributions spread out
    return target, random_drafter(target, seed=5, max_draft_len=2)


def exact_probs(target: Gemma4, sampling: Sampling) -> np.ndarray:
    """Probability of each continuation (x1, x2, x3), from the target's processed distributions."""
    continuations = np.array(list(itertools.product(range(VOCAB), repeat=NEW)))
    tokens = np.concatenate([np.tile(PROMPT, (len(continuations), 1)), continuations], axis=1)
    out, _ = target(jnp.asarray(tokens))
    probs = np.asarray(sampling_lib.target_probs(out.logits, sampling), np.float64)
    start = len(PROMPT) - 1
    step_probs = probs[np.arange(len(continuations))[:, None], start + np.arange(NEW), continuations]
    return np.prod(step_probs, axis=1)


def sampled_counts(target, drafter, draft_len: int, sampling: Sampling) -> np.ndarray:
    outputs, _ = generate(target, drafter, [PROMPT] * SAMPLES, draft_len=draft_len, max_new_tokens=NEW,
                          sampling=sampling, stop_tokens=(), seed=11)  # fmt: skip
    ids = np.array([o.token_ids for o in outputs])
    return np.bincount(ids @ (VOCAB ** np.arange(NEW)[::-1]), minlength=VOCAB**NEW)


def fit_p_value(observed: np.ndarray, probs: np.ndarray) -> float:
    impossible = probs == 0
    if observed[impossible].any():
        return 0.0  # a sample the target can never produce
    observed, probs = observed[~impossible], probs[~impossible]
    expected = probs / probs.sum() * observed.sum()
    small = expected < 5
    if small.any():
        observed = np.append(observed[~small], observed[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    return stats.chisquare(observed, expected).pvalue


SAMPLINGS = [Sampling(temperature=1.0), Sampling(temperature=1.3, top_k=3, top_p=0.95)]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["t1", "t1.3_k3_p0.95"])
def test_speculative_and_plain_sampling_match_the_target(pair, sampling):
    target, drafter = pair
    probs = exact_probs(target, sampling)
    assert fit_p_value(sampled_counts(target, None, 0, sampling), probs) > 1e-3
    assert fit_p_value(sampled_counts(target, drafter, 2, sampling), probs) > 1e-3


def test_a_broken_acceptance_rule_is_caught(pair, monkeypatch):
    """Accepting every draft (the drafter's distribution, not the target's) must fail the same test."""
    target, drafter = pair

    def accept_everything(p, q, drafts, rng):
        batch, num = drafts.shape
        bonus = jax.random.categorical(rng, jnp.log(p[:, -1])).astype(jnp.int32)
        return jnp.full((batch,), num, jnp.int32), jnp.concatenate([drafts, bonus[:, None]], axis=1)

    monkeypatch.setattr(sampling_lib, "verify_sampled", accept_everything)
    jax.clear_caches()  # the engine traces verify_sampled: drop the compiled real rule
    sampling = Sampling(temperature=1.0)
    assert fit_p_value(sampled_counts(target, drafter, 2, sampling), exact_probs(target, sampling)) < 1e-6
    monkeypatch.undo()
    jax.clear_caches()
