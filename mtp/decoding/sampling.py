"""Token selection and lossless verification of drafts (Leviathan et al. 2023; Chen et al. 2023)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the target picks tokens: greedy when ``temperature == 0``, else temperature / top-k / top-p."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"bad sampling settings {self}: need temperature >= 0, top_k >= 0, 0 < top_p <= 1.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def target_probs(logits_BTV: Float[Array, "B T V"], sampling: Sampling) -> Float[Array, "B T V"]:
    """The distribution the target samples from: softmax(logits / T) restricted to the top-k / top-p set."""
    logits = logits_BTV.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_desc = -jnp.sort(-logits, axis=-1)
        probs_sorted = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
        # The smallest logit still inside the nucleus: every token whose preceding mass is below top_p.
        cutoff = jnp.min(jnp.where(mass_before < sampling.top_p, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.nn.softmax(logits, axis=-1)


def draft_probs(logits_BPV: Float[Array, "B P V"], temperature: float) -> Float[Array, "B P V"]:
    """The drafter's proposal distribution q: the one its sampled drafts are drawn from."""
    return jax.nn.softmax(logits_BPV.astype(jnp.float32) / temperature, axis=-1)


def leading_true(mask_BP: jax.Array) -> Int[Array, " B"]:
    """How many entries of each row are True before the first False."""
    return jnp.sum(jnp.cumprod(mask_BP.astype(jnp.int32), axis=-1), axis=-1)


def verify_greedy(logits_BTV: jax.Array, drafts_BP: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Accept the longest prefix of drafts equal to the target's argmax; the target's next argmax follows.

    Returns the accepted count n ``[B]`` and the target's tokens ``[B, P+1]``: the first n equal the drafts and
    entry n is the target's own token.
    """
    chosen_BT = jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32)
    num_drafts = drafts_BP.shape[1]
    return leading_true(drafts_BP == chosen_BT[:, :num_drafts]), chosen_BT


def verify_sampled(
    p_BTV: jax.Array, q_BPV: jax.Array, drafts_BP: jax.Array, rng: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Speculative sampling: keep draft i with probability min(1, p/q); resample the first rejection from
    normalise(max(p - q, 0)); if every draft is kept, draw a bonus token from p. The output tokens are then
    distributed exactly as sampling from p one token at a time.
    """
    batch, num_drafts = drafts_BP.shape
    accept_rng, token_rng = jax.random.split(rng)
    p_draft = jnp.take_along_axis(p_BTV[:, :num_drafts], drafts_BP[..., None], axis=-1)[..., 0]
    q_draft = jnp.take_along_axis(q_BPV, drafts_BP[..., None], axis=-1)[..., 0]
    uniform = jax.random.uniform(accept_rng, (batch, num_drafts))
    accepted = leading_true(uniform * q_draft <= p_draft)
    q_padded = jnp.concatenate([q_BPV, jnp.zeros_like(p_BTV[:, :1])], axis=1)  # no q after the last draft
    p_next = jnp.take_along_axis(p_BTV, accepted[:, None, None], axis=1)[:, 0]
    q_next = jnp.take_along_axis(q_padded, accepted[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_next - q_next, 0.0)
    total = jnp.sum(residual, axis=-1, keepdims=True)
    # total == 0 only when p == q at that position, where rejection has probability 0; fall back to p.
    residual = jnp.where(total > 0, residual / jnp.where(total > 0, total, 1.0), p_next)
    token = jax.random.categorical(token_rng, jnp.log(residual), axis=-1).astype(jnp.int32)
    tokens_BT = jnp.concatenate([drafts_BP, jnp.zeros((batch, 1), jnp.int32)], axis=1)
    tokens_BT = jnp.where(jnp.arange(num_drafts + 1) == accepted[:, None], token[:, None], tokens_BT)
    return accepted, tokens_BT
