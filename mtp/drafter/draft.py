"""Drafting: k drafter steps from the target's outputs for the last committed token, batched and jittable."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from mtp.drafter.interface import Anchor, Draft, DrafterFamily, make_pick
from mtp.gemma4.model import Gemma4, LayerKV

__all__ = ["Draft", "draft"]


def draft(
    drafter: DrafterFamily,
    target: Gemma4,
    token_B: Int[Array, " B"],
    anchor: Anchor | Float[Array, "B U"],
    position_B: Int[Array, " B"],
    target_kv: dict[str, LayerKV],
    *,
    num_tokens: int,
    temperature: float = 0.0,
    keys_B: jax.Array | None = None,
    sample_logits: Callable[[jax.Array], jax.Array] | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> Draft:
    """``num_tokens`` (static) draft steps of any drafter family, all after the newest token at ``position_B``.

    ``token_B`` is the newest token (at ``position_B``, not yet seen by the target), ``anchor`` the target's state
    at the position before it (an ``Anchor``, or just its last hidden state), ``target_kv`` its K/V (the drafter
    sees slots < position). Each draft is the argmax (temperature 0) or a sample of
    ``softmax(sample_logits(logits))`` (default ``logits / temperature``; the decode loop passes its top-k / top-p
    filter too) drawn with the row's own key from ``keys_B`` (one PRNG key per row, so a row's drafts never depend
    on the other rows of its batch). The returned logits are raw: the decode loop turns them into the proposal
    distribution with the same transform.
    """
    max_len = drafter.config.max_draft_len
    if not 1 <= num_tokens <= max_len:
        raise ValueError(f"num_tokens={num_tokens} must be in [1, max_draft_len={max_len}] (the drafter's config).")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy).")
    sampling = temperature > 0
    if sampling and (keys_B is None or keys_B.shape != token_B.shape):
        raise ValueError(
            f"temperature={temperature} samples the draft tokens: pass one PRNG key per row as keys_B "
            f"(shape {token_B.shape}), e.g. jax.random.split(key, batch)."
        )
    anchor = anchor if isinstance(anchor, Anchor) else Anchor(anchor)
    keys_PB = jax.vmap(lambda key: jax.random.split(key, num_tokens), out_axes=1)(keys_B) if sampling else None
    return drafter.propose(
        target,
        token_B.astype(jnp.int32),
        jax.tree.map(lambda x: x.astype(dtype), anchor),
        position_B.astype(jnp.int32),
        target_kv,
        keys_PB,
        num_tokens=num_tokens,
        pick=make_pick(temperature, sample_logits),
        dtype=dtype,
    )
