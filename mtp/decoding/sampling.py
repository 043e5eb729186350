"""Token selection and lossless verification of drafts (Leviathan et al. 2023; Chen et al. 2023).

Randomness is per row: every function that draws takes one PRNG key per batch row (``keys_B``), so a row's
samples depend only on its own key, never on which other rows share its batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from mtp.gemma4.layers import first_argmax


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


def processed_logits(logits_BTV: Float[Array, "B T V"], sampling: Sampling) -> Float[Array, "B T V"]:
    """float32 ``logits / T`` with -inf outside the top-k / top-p set: what both target and drafter sample from."""
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
    return logits


def target_probs(logits_BTV: Float[Array, "B T V"], sampling: Sampling) -> Float[Array, "B T V"]:
    """The distribution the target samples from: softmax(logits / T) restricted to the top-k / top-p set.

    The drafter's proposal q is the same transform of its own logits (it drafts from the filtered distribution:
    still lossless, and no draft is wasted on a token the target can never pick).
    """
    return jax.nn.softmax(processed_logits(logits_BTV, sampling), axis=-1)


def row_keys(seed: int, row_ids_B: Int[Array, " B"]) -> jax.Array:
    """One independent stream per row, from the seed and the row's global index (its place in the prompt list)."""
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(row_ids_B)


def split_rows(keys_B: jax.Array, num: int) -> jax.Array:
    """``num`` fresh keys for every row: ``[num, B]``."""
    return jax.vmap(lambda key: jax.random.split(key, num), out_axes=1)(keys_B)


def categorical_rows(keys_B: jax.Array, logits_BV: Float[Array, "B V"]) -> Int[Array, " B"]:
    """One sample per row from ``softmax(logits)``, row b drawn with its own key."""
    return jax.vmap(jax.random.categorical)(keys_B, logits_BV).astype(jnp.int32)


def leading_true(mask_BP: jax.Array) -> Int[Array, " B"]:
    """How many entries of each row are True before the first False."""
    return jnp.sum(jnp.cumprod(mask_BP.astype(jnp.int32), axis=-1), axis=-1)


def verify_greedy(logits_BTV: jax.Array, drafts_BP: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Accept the longest prefix of drafts equal to the target's argmax; the target's next argmax follows.

    Returns the accepted count n ``[B]`` and the target's tokens ``[B, P+1]``: the first n equal the drafts and
    entry n is the target's own token.
    """
    chosen_BT = first_argmax(logits_BTV)
    num_drafts = drafts_BP.shape[1]
    return leading_true(drafts_BP == chosen_BT[:, :num_drafts]), chosen_BT


def residual(p_BV: Float[Array, "B V"], q_BV: Float[Array, "B V"]) -> Float[Array, "B V"]:
    """Where a rejected draft is resampled from: normalise(max(p - q, 0))."""
    residual_BV = jnp.maximum(p_BV - q_BV, 0.0)
    total_B1 = jnp.sum(residual_BV, axis=-1, keepdims=True)
    # total == 0 only when p == q at that position, where rejection has probability 0; fall back to p.
    return jnp.where(total_B1 > 0, residual_BV / jnp.where(total_B1 > 0, total_B1, 1.0), p_BV)


def verify_sampled(
    p_BTV: jax.Array, q_BPV: jax.Array, drafts_BP: jax.Array, keys_B: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Speculative sampling: keep draft i with probability min(1, p/q); resample the first rejection from
    normalise(max(p - q, 0)); if every draft is kept, draw a bonus token from p. The output tokens are then
    distributed exactly as sampling from p one token at a time. ``keys_B`` holds one PRNG key per row.
    """
    batch, num_drafts = drafts_BP.shape
    accept_keys_B, token_keys_B = split_rows(keys_B, 2)
    p_draft = jnp.take_along_axis(p_BTV[:, :num_drafts], drafts_BP[..., None], axis=-1)[..., 0]
    q_draft = jnp.take_along_axis(q_BPV, drafts_BP[..., None], axis=-1)[..., 0]
    uniform = jax.vmap(lambda key: jax.random.uniform(key, (num_drafts,)))(accept_keys_B)
    accepted = leading_true(uniform * q_draft <= p_draft)
    q_padded = jnp.concatenate([q_BPV, jnp.zeros_like(p_BTV[:, :1])], axis=1)  # no q after the last draft
    p_next = jnp.take_along_axis(p_BTV, accepted[:, None, None], axis=1)[:, 0]
    q_next = jnp.take_along_axis(q_padded, accepted[:, None, None], axis=1)[:, 0]
    token = categorical_rows(token_keys_B, jnp.log(residual(p_next, q_next)))
    tokens_BT = jnp.concatenate([drafts_BP, jnp.zeros((batch, 1), jnp.int32)], axis=1)
    tokens_BT = jnp.where(jnp.arange(num_drafts + 1) == accepted[:, None], token[:, None], tokens_BT)
    return accepted, tokens_BT
