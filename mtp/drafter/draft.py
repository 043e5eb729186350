"""Drafting: k drafter steps from the target's outputs for the last committed token, batched and jittable."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from mtp.drafter.model import Drafter
from mtp.gemma4.model import Gemma4, LayerKV


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Draft:
    """The drafted tokens ``[B, P]`` and the drafter's raw logits ``[B, P, V]`` at each step."""

    tokens_BP: jax.Array
    logits_BPV: jax.Array


def draft(
    drafter: Drafter,
    target: Gemma4,
    token_B: Int[Array, " B"],
    hidden_BD: Float[Array, "B U"],
    position_B: Int[Array, " B"],
    target_kv: dict[str, LayerKV],
    *,
    num_tokens: int,
    temperature: float = 0.0,
    keys_B: jax.Array | None = None,
    sample_logits: Callable[[jax.Array], jax.Array] | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> Draft:
    """``num_tokens`` (static) draft steps in a ``lax.scan``, all at the constant query ``position_B``.

    ``token_B`` is the newest token (at ``position_B``, not yet seen by the target), ``hidden_BD`` the target's
    last hidden state at the position before it, ``target_kv`` its K/V (the drafter sees slots < position).
    Step j feeds ``(target.embed_tokens(tok_j), h_j)``; ``tok_{j+1}`` is the argmax (temperature 0) or a sample
    of ``softmax(sample_logits(logits))`` (default ``logits / temperature``; the decode loop passes its top-k /
    top-p filter too) drawn with the row's own key from ``keys_B`` (one PRNG key per row, so a row's drafts never
    depend on the other rows of its batch); ``h_{j+1}`` is the step's projected state. The returned logits are
    raw: the decode loop turns them into the proposal distribution with the same transform.
    """
    max_len = drafter.config.max_draft_len
    if not 1 <= num_tokens <= max_len:
        raise ValueError(f"num_tokens={num_tokens} must be in [1, max_draft_len={max_len}] (DrafterConfig).")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy).")
    sampling = temperature > 0
    if sampling and (keys_B is None or keys_B.shape != token_B.shape):
        raise ValueError(
            f"temperature={temperature} samples the draft tokens: pass one PRNG key per row as keys_B "
            f"(shape {token_B.shape}), e.g. jax.random.split(key, batch)."
        )
    positions_B1 = position_B[:, None].astype(jnp.int32)
    if sample_logits is None:
        sample_logits = lambda logits_BV: logits_BV.astype(jnp.float32) / temperature

    def step(carry, keys_B):
        token_B, hidden_BU = carry
        out = drafter(target.embed_tokens(token_B[:, None]), hidden_BU[:, None], positions_B1, target_kv, dtype=dtype)
        logits_BV = out.logits_BTV[:, 0]
        if sampling:
            next_B = jax.vmap(jax.random.categorical)(keys_B, sample_logits(logits_BV))
        else:
            next_B = jnp.argmax(logits_BV, axis=-1)
        next_B = next_B.astype(jnp.int32)
        return (next_B, out.projected_BTD[:, 0]), (next_B, logits_BV)

    keys_PB = jax.vmap(lambda key: jax.random.split(key, num_tokens), out_axes=1)(keys_B) if sampling else None
    carry = (token_B.astype(jnp.int32), hidden_BD.astype(dtype))
    _, (tokens_PB, logits_PBV) = jax.lax.scan(step, carry, keys_PB, length=num_tokens)
    return Draft(tokens_BP=tokens_PB.T, logits_BPV=jnp.swapaxes(logits_PBV, 0, 1))
