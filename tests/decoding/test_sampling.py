"""The verification rules on synthetic distributions, where the exact answer is known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mtp.decoding import sampling
from mtp.decoding.sampling import Sampling


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = jnp.log(jnp.array([[[0.5, 0.2, 0.15, 0.1, 0.05]]]))
    p = sampling.target_probs(logits, Sampling(temperature=1.0, top_k=2))
    np.testing.assert_allclose(p[0, 0], [5 / 7, 2 / 7, 0, 0, 0], rtol=1e-6)
    p = sampling.target_probs(logits, Sampling(temperature=1.0, top_p=0.8))  # 0.5 + 0.2 < 0.8: three tokens
    np.testing.assert_allclose(p[0, 0], np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85, rtol=1e-6)
    p = sampling.target_probs(logits, Sampling(temperature=0.5))
    squared = np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2
    np.testing.assert_allclose(p[0, 0], squared / squared.sum(), rtol=1e-5)


def test_greedy_accepts_the_agreeing_prefix():
    logits = jax.nn.one_hot(jnp.array([[3, 1, 2, 0]]), 5)
    n, tokens = sampling.verify_greedy(logits, jnp.array([[3, 1, 4]]))
    assert int(n[0]) == 2 and tokens[0, 2] == 2
    n, _ = sampling.verify_greedy(logits, jnp.array([[0, 1, 2]]))
    assert int(n[0]) == 0


def exact_and_sampled(verify, num_samples=60_000, vocab=3, drafts=2, seed=0):
    """Distribution of (accepted tokens + target token) triples from drafts ~ q, against sampling from p."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(vocab), size=drafts + 1).astype(np.float32)  # p_i independent of the prefix
    q = rng.dirichlet(np.ones(vocab), size=drafts).astype(np.float32)
    key_draft, key_verify = jax.random.split(jax.random.key(seed))
    draft_tokens = jax.random.categorical(key_draft, jnp.log(jnp.asarray(q)), shape=(num_samples, drafts))
    p_b = jnp.broadcast_to(jnp.asarray(p), (num_samples, drafts + 1, vocab))
    q_b = jnp.broadcast_to(jnp.asarray(q), (num_samples, drafts, vocab))
    accepted, tokens = verify(p_b, q_b, draft_tokens.astype(jnp.int32), jax.random.split(key_verify, num_samples))
    # The first output token always exists; the second one only when the first draft was accepted.
    first = np.asarray(tokens[:, 0])
    observed_first = np.bincount(first, minlength=vocab)
    both = np.asarray(accepted) >= 1
    pairs = np.asarray(tokens[both, 0] * vocab + tokens[both, 1])
    return p, observed_first, pairs, both.mean()


def chi_square_p(observed, expected_probs):
    probs = np.asarray(expected_probs, np.float64)
    expected = probs / probs.sum() * observed.sum()
    return stats.chisquare(observed, expected).pvalue


def test_speculative_sampling_reproduces_the_target_distribution():
    """First token ~ p_0 exactly, and the pair (x1, x2) ~ p_0 x p_1 (p here does not depend on the prefix)."""
    p, first, _, _ = exact_and_sampled(sampling.verify_sampled)
    assert chi_square_p(first, p[0]) > 1e-3


def test_the_test_catches_a_broken_rule(monkeypatch):
    """Resampling a rejection from p instead of normalise(max(p - q, 0)) biases the output."""

    p, first, _, _ = exact_and_sampled(sampling.verify_sampled)
    assert chi_square_p(first, p[0]) > 1e-3
    monkeypatch.setattr(sampling, "residual", lambda p, q: p)
    p, first, _, _ = exact_and_sampled(sampling.verify_sampled)
    assert chi_square_p(first, p[0]) < 1e-6


@pytest.mark.parametrize("seed", [0, 1])
def test_joint_of_two_tokens(seed):
    p, _, pairs, _ = exact_and_sampled(sampling.verify_sampled, seed=seed)
    vocab = p.shape[1]
    # Given the first draft was accepted, the pair is (d1, x2) with x2 ~ p_1 independent of d1 and d1 distributed
    # as min(p_0, q_0) normalised: check the conditional of x2.
    second = np.bincount(pairs % vocab, minlength=vocab)
    assert chi_square_p(second, p[1]) > 1e-3
