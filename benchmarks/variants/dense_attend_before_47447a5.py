"""``dense_attend`` as it was before 47447a5: both products on [B, T, K, G, H] whatever the number of queries."""

import jax
import jax.numpy as jnp

from mtp.gemma4 import attention


def dense_attend_before(q_BTNH, blocks):
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


def before_47447a5():
    committed = attention.dense_attend
    attention.dense_attend = dense_attend_before
    return lambda: setattr(attention, "dense_attend", committed)


VARIANTS = {"dense_attend before 47447a5": before_47447a5}
