"""Gemma 4 attention: q/k RMSNorm, weightless v-norm, scaling 1.0, keys doubling as values on k_eq_v layers."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

from mtp.target.layers import RMSNorm, apply_rope, param, rms_norm

# A block of keys the queries may see: keys and values [B, K, S, H] and which of them each query sees [B, T, S].
KVBlock = tuple[jax.Array, jax.Array, jax.Array]


def attend(q_BTNH: Float[Array, "B T N H"], blocks: Sequence[KVBlock]) -> Float[Array, "B T N H"]:
    """Softmax attention (scale 1.0) over several key blocks at once, so a cache and a new chunk need no concat."""
    batch, length, heads, head_dim = q_BTNH.shape
    kv_heads = blocks[0][0].shape[1]
    q_BTKGH = q_BTNH.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    compute = jnp.promote_types(q_BTNH.dtype, jnp.float32)
    scores = []
    for k_BKSH, _, mask_BTS in blocks:
        s_BKGTS = jnp.einsum("BTKGH,BKSH->BKGTS", q_BTKGH, k_BKSH.astype(q_BTNH.dtype)).astype(compute)
        scores.append(jnp.where(mask_BTS[:, None, None], s_BKGTS, jnp.finfo(compute).min))
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1).astype(q_BTNH.dtype)
    out_BTKGH = 0
    start = 0
    for k_BKSH, v_BKSH, _ in blocks:
        p_BKGTS = probs[..., start : start + k_BKSH.shape[2]]
        out_BTKGH = out_BTKGH + jnp.einsum("BKGTS,BKSH->BTKGH", p_BKGTS, v_BKSH.astype(q_BTNH.dtype))
        start += k_BKSH.shape[2]
    return out_BTKGH.reshape(batch, length, heads, head_dim)


def chunk_mask(positions_BT: jax.Array, valid_BT: jax.Array, segments_BT: jax.Array | None,
               window: int | None) -> Bool[Array, "B T T"]:  # fmt: skip
    """Which new tokens each new token sees: causal, valid, same segment, and (sliding) within the window."""
    q_pos, k_pos = positions_BT[:, :, None], positions_BT[:, None, :]
    index = jnp.arange(positions_BT.shape[1])
    mask = (index[None, :, None] >= index[None, None, :]) & valid_BT[:, None, :]
    if segments_BT is not None:
        mask &= segments_BT[:, :, None] == segments_BT[:, None, :]
    if window is not None:
        mask &= q_pos - k_pos < window
    return mask


def cache_mask(positions_BT: jax.Array, slot_positions_BS: jax.Array, length_B: jax.Array,
               window: int | None) -> Bool[Array, "B T S"]:  # fmt: skip
    """Which cached slots each new token sees: committed entries (position < length) within the window."""
    k_pos = slot_positions_BS[:, None, :]
    mask = (k_pos >= 0) & (k_pos < length_B[:, None, None])
    if window is not None:
        mask &= positions_BT[:, :, None] - k_pos < window
    return mask


class Attention(nnx.Module):
    """Query projection always; key/value projections only on layers that own their K/V."""

    def __init__(self, width: int, heads: int, kv_heads: int, head_dim: int, eps: float, *, owns_kv: bool,
                 keys_are_values: bool, rngs: nnx.Rngs):  # fmt: skip
        self.eps = eps
        self.q = param(rngs, (width, heads, head_dim), ("embed", "heads", "head_dim"))
        self.q_norm = RMSNorm(head_dim, eps)
        self.o = param(rngs, (heads, head_dim, width), ("heads", "head_dim", "embed"), scale=(heads * head_dim) ** -0.5)
        kv_shape, kv_axes = (width, kv_heads, head_dim), ("embed", "kv_heads", "head_dim")
        self.k = nnx.data(param(rngs, kv_shape, kv_axes) if owns_kv else None)
        self.k_norm = nnx.data(RMSNorm(head_dim, eps) if owns_kv else None)
        self.v = nnx.data(param(rngs, kv_shape, kv_axes) if owns_kv and not keys_are_values else None)

    def queries(self, x_BTD: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
        q_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD, self.q[...].astype(x_BTD.dtype))
        return apply_rope(self.q_norm(q_BTNH), cos_BTH, sin_BTH)

    def keys_values(self, x_BTD: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> tuple[jax.Array, jax.Array]:
        """New keys (normed, roped) and values (weightless-normed, the raw key projection on k_eq_v layers)."""
        k_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.k[...].astype(x_BTD.dtype))
        v_BTKH = k_BTKH if self.v is None else jnp.einsum("BTD,DKH->BTKH", x_BTD, self.v[...].astype(x_BTD.dtype))
        return apply_rope(self.k_norm(k_BTKH), cos_BTH, sin_BTH), rms_norm(v_BTKH, None, self.eps)

    def output(self, attn_BTNH: jax.Array) -> jax.Array:
        return jnp.einsum("BTNH,NHD->BTD", attn_BTNH, self.o[...].astype(attn_BTNH.dtype))
