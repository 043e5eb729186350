"""Speculative sampling is lossless: sampled sequences are distributed exactly as the target's own samples.

On a 4-token vocabulary, continuations have few outcomes whose exact probabilities come from the target itself.
A chi-square goodness-of-fit test (fixed seed, cells with expected count < 5 merged) must not reject at
p = 1e-3 for the real rule, and must reject at p = 1e-6 when the rule is deliberately broken, inside the same
test, so the test's power is checked every run. A sample the processed target distribution gives probability 0
(top-k / top-p) fails outright.

Random streams are per row (seed and the row's place in the prompt list), so batching never changes a sample and
a prompt repeated over several batches gives independent samples.
"""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from mtp.decoding import engine
from mtp.decoding import sampling as sampling_lib
from mtp.decoding.generate import generate, generate_in_batches
from mtp.decoding.sampling import Sampling
from mtp.gemma4.config import FULL, SLIDING, Gemma4Config
from mtp.gemma4.model import Gemma4
from tests.decoding.drafters import random_drafter

VOCAB, NEW, SAMPLES = 4, 3, 12_000
PROMPT = [1, 2, 3, 0, 2]
FIT, REJECT = 1e-3, 1e-6  # the real rule must not be rejected at FIT; a broken rule must be rejected at REJECT


@pytest.fixture(scope="module")
def pair():
    config = Gemma4Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        global_head_dim=8,
        layer_types=(SLIDING, FULL),
        sliding_window=4,
        final_logit_softcapping=None,
    )
    target = Gemma4(config, rngs=nnx.Rngs(3))
    target.embed[...] = target.embed[...] * 0.3  # keep the target's distributions spread out
    return target, random_drafter(target, seed=5, max_draft_len=2)


@pytest.fixture(scope="module")
def drafters(pair):
    """A drafter whose drafts are mostly accepted (q uniform, close to the spread-out p) and one whose drafts are
    mostly rejected (q nearly one-hot on whatever its random weights prefer)."""
    target, _ = pair
    accepted = random_drafter(target, seed=5, max_draft_len=2)
    accepted.embed[...] = jnp.zeros_like(accepted.embed[...])
    rejected = random_drafter(target, seed=6, max_draft_len=2)
    rejected.embed[...] = rejected.embed[...] * 60.0
    return {"accepted": accepted, "rejected": rejected}


@pytest.fixture
def broken_residual(monkeypatch):
    """Resample a rejected draft from p instead of normalise(max(p - q, 0)); recompile around the swap."""
    engine.decode_loop.clear_cache()
    monkeypatch.setattr(sampling_lib, "residual", lambda p, q: p)
    yield
    monkeypatch.undo()
    engine.decode_loop.clear_cache()


def exact_probs(target: Gemma4, sampling: Sampling, new: int = NEW) -> np.ndarray:
    """Probability of each continuation (x1, …, x_new), from the target's processed distributions, in float64."""
    continuations = np.array(list(itertools.product(range(VOCAB), repeat=new)))
    tokens = np.concatenate([np.tile(PROMPT, (len(continuations), 1)), continuations], axis=1)
    out, _ = target(jnp.asarray(tokens))
    logits = np.asarray(out.logits, np.float64) / sampling.temperature
    allowed = np.asarray(sampling_lib.target_probs(out.logits, sampling)) > 0  # the top-k / top-p set
    logits = np.where(allowed, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    start = len(PROMPT) - 1
    step_probs = probs[np.arange(len(continuations))[:, None], start + np.arange(new), continuations]
    return np.prod(step_probs, axis=1)


def counts_of(outputs, new: int = NEW) -> np.ndarray:
    ids = np.array([o.token_ids[:new] for o in outputs])
    return np.bincount(ids @ (VOCAB ** np.arange(new)[::-1]), minlength=VOCAB**new)


def sampled_counts(target, drafter, draft_len: int, sampling: Sampling) -> np.ndarray:
    outputs, _ = generate(
        target,
        drafter,
        [PROMPT] * SAMPLES,
        draft_len=draft_len,
        max_new_tokens=NEW,
        sampling=sampling,
        stop_tokens=(),
        seed=11,
    )
    return counts_of(outputs)


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
    assert fit_p_value(sampled_counts(target, None, 0, sampling), probs) > FIT
    assert fit_p_value(sampled_counts(target, drafter, 2, sampling), probs) > FIT


def test_a_broken_acceptance_rule_is_caught(pair, monkeypatch):
    """Accepting every draft (the drafter's distribution, not the target's) must fail the same test."""
    target, drafter = pair

    def accept_everything(p, q, drafts, keys_B):
        batch, num = drafts.shape
        bonus = sampling_lib.categorical_rows(keys_B, jnp.log(p[:, -1]))
        return jnp.full((batch,), num, jnp.int32), jnp.concatenate([drafts, bonus[:, None]], axis=1)

    engine.decode_loop.clear_cache()  # the engine traces verify_sampled: drop the compiled real rule
    monkeypatch.setattr(sampling_lib, "verify_sampled", accept_everything)
    sampling = Sampling(temperature=1.0)
    assert fit_p_value(sampled_counts(target, drafter, 2, sampling), exact_probs(target, sampling)) < REJECT
    monkeypatch.undo()
    engine.decode_loop.clear_cache()


# Two sampled tokens of one prompt repeated BATCHES x BATCH times, decoded batch by batch as decode.py does; at
# temperature 2 the uniform drafter's first draft is accepted ~73% of the time and the peaked one's ~19%.
BATCH, BATCHES, PAIR = 500, 8, 2
HOT = Sampling(temperature=2.0)


def repeated_prompt_counts(target, drafter, draft_len: int) -> tuple[np.ndarray, float]:
    outputs = generate_in_batches(
        target,
        drafter,
        [PROMPT] * (BATCH * BATCHES),
        batch_size=BATCH,
        draft_len=draft_len,
        max_new_tokens=PAIR,
        sampling=HOT,
        stop_tokens=(),
        seed=3,
    )
    first_draft_accepted = [n >= 1 for o in outputs for n in o.accepted_per_round]
    return counts_of(outputs, PAIR), float(np.mean(first_draft_accepted))


@pytest.mark.parametrize("kind", ["plain", "accepted", "rejected"])
def test_first_two_tokens_fit_the_target_across_batches(pair, drafters, kind):
    """Chi-square of the first two tokens over 8 batches (with the shared-stream bug: 8 copies of one batch)."""
    target, _ = pair
    drafter = drafters.get(kind)
    counts, acceptance = repeated_prompt_counts(target, drafter, 2 if drafter else 0)
    assert fit_p_value(counts, exact_probs(target, HOT, PAIR)) > FIT, kind
    if kind == "accepted":
        assert acceptance > 0.6, f"drafts should mostly be accepted, got rate {acceptance:.2f}"
    if kind == "rejected":
        assert acceptance < 0.3, f"drafts should mostly be rejected, got rate {acceptance:.2f}"


@pytest.mark.parametrize("draft_len", [0, 2])
def test_samples_do_not_depend_on_the_batch_size(pair, draft_len):
    """Ragged prompts, one seed: batch size 1, 3 and all at once give the same tokens for every row."""
    target, drafter = pair
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (5, 2, 7, 3, 6, 4, 1)]
    kwargs = dict(draft_len=draft_len, max_new_tokens=6, sampling=Sampling(temperature=1.0), stop_tokens=(), seed=7)
    runs = [generate_in_batches(target, drafter, prompts, batch_size=size, **kwargs) for size in (1, 3, len(prompts))]
    tokens = [[o.token_ids for o in outputs] for outputs in runs]
    assert tokens[0] == tokens[1] == tokens[2]
    other_seed = generate_in_batches(target, drafter, prompts, batch_size=3, **kwargs | {"seed": 8})
    assert [o.token_ids for o in other_seed] != tokens[0]


@pytest.mark.parametrize("draft_len", [0, 2])
def test_a_prompt_repeated_over_batches_gets_fresh_samples(pair, draft_len):
    target, drafter = pair
    outputs = generate_in_batches(
        target,
        drafter,
        [PROMPT] * (2 * BATCH),
        batch_size=BATCH,
        draft_len=draft_len,
        max_new_tokens=PAIR,
        sampling=HOT,
        stop_tokens=(),
        seed=0,
    )
    first, second = (np.array([o.token_ids for o in outputs[i : i + BATCH]]) for i in (0, BATCH))
    same_rows = np.mean(np.all(first == second, axis=1))
    # Independent rows coincide with probability sum(p^2) over the 16 continuations (under 10% here).
    coincide = float(np.sum(exact_probs(target, HOT, PAIR) ** 2))
    assert same_rows < coincide + 0.05, (same_rows, coincide)


# Last in the module: its recompiles around the swap drop the compiled loops that the tests above share.
def test_the_fit_test_catches_a_residual_replaced_by_p(pair, drafters, broken_residual):
    target, _ = pair
    counts, _ = repeated_prompt_counts(target, drafters["rejected"], 2)
    assert fit_p_value(counts, exact_probs(target, HOT, PAIR)) < REJECT
