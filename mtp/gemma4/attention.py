"""Gemma 4 attention: q/k RMSNorm, weightless v-norm, scaling 1.0, keys doubling as values on k_eq_v layers."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

from mtp.gemma4.config import ATTENTION_IMPLEMENTATIONS
from mtp.gemma4.layers import RMSNorm, apply_rope, param, project, rms_norm
from mtp.sharding import LOGICAL_RULES

# A block of keys the queries may see: keys and values [B, K, S, H] and which of them each query sees [B, T, S].
KVBlock = tuple[jax.Array, jax.Array, jax.Array]


IMPLEMENTATIONS = ATTENTION_IMPLEMENTATIONS
# Past this many queries "auto" goes blockwise: decoding (T = 1..k+1) and short prompts keep the dense path.
QUERY_CHUNK = 256
KEY_CHUNK = 512
SPLASH_BLOCK = 128  # the splash kernel's smallest tile: T must be a multiple of it
MANY_QUERIES = 16  # from this many queries on, dense_attend's products run as batched matmuls over (B, K)


@dataclasses.dataclass(frozen=True)
class SelfMask:
    """``chunk_mask``'s mask as structure, for kernels that take no dense mask (splash): causal, same segment
    (``segments_BT``, 0 = padding; None = one document), and (``window``) within a sliding window.

    The window is counted in token indices, which equal ``chunk_mask``'s positions when positions run on by one
    inside each document (packed data). Padding queries see earlier padding instead of nothing: only their output
    differs from ``dense``, and no real token reads it.
    """

    segments_BT: jax.Array | None
    window: int | None


def choose_implementation(
    implementation: str,
    q_BTNH: jax.Array,
    self_mask: SelfMask | None,
    query_chunk: int = QUERY_CHUNK,
    num_keys: int | None = None,
) -> str:
    """``auto`` by platform: TPU's splash kernel for a cache-less forward of whole kernel tiles, GPU's cuDNN
    kernel for bf16/fp16 with a head dim and (masked, differentiated) even T and S it takes; otherwise (CPU,
    float32) dense up to ``query_chunk`` queries, else blockwise. ``splash`` without a ``self_mask`` (a cache, the
    drafter) falls back the same way."""
    length, head_dim, dtype = q_BTNH.shape[1], q_BTNH.shape[3], q_BTNH.dtype
    num_keys = length if num_keys is None else num_keys
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}.")
    backend = jax.default_backend()
    if implementation == "auto" and backend == "tpu" and self_mask is not None and length % SPLASH_BLOCK == 0:
        return "splash"
    if implementation == "auto" and backend == "gpu" and dtype in (jnp.bfloat16, jnp.float16):
        hopper = float(getattr(jax.devices()[0], "compute_capability", "0")) >= 9.0
        # cuDNN's flash-attention limits (jax's check_is_flash_attention)
        if head_dim % 8 == 0 and head_dim <= (256 if hopper else 128) and length % 2 == 0 == num_keys % 2:
            return "fused"
    if implementation == "auto" or (implementation == "splash" and self_mask is None):
        return "dense" if length <= query_chunk else "blockwise"
    return implementation


def attend(
    q_BTNH: Float[Array, "B T N H"],
    blocks: Sequence[KVBlock],
    implementation: str = "auto",
    *,
    self_mask: SelfMask | None = None,
    query_chunk: int | None = None,
    key_chunk: int | None = None,
) -> Float[Array, "B T N H"]:
    """Softmax attention (scale 1.0) over several key blocks at once, so a cache and a new chunk need no concat.

    ``dense`` builds the [T, S] scores; ``blockwise`` never does (query chunks under remat, key chunks with an online
    softmax); ``fused`` is ``jax.nn.dot_product_attention`` (cuDNN on GPU); ``splash`` is the Pallas TPU kernel
    (interpreted off TPU), for the cache-less forward only: it needs ``self_mask`` (the mask's structure) and one
    block, so the cached decode/verify path and the drafter's cache-only attention stay dense or blockwise.
    ``auto``: see ``choose_implementation``. A query that sees no key gets the mean of all values under dense and
    blockwise.
    """
    query_chunk, key_chunk = query_chunk or QUERY_CHUNK, key_chunk or KEY_CHUNK
    num_keys = sum(k.shape[2] for k, _, _ in blocks)
    implementation = choose_implementation(implementation, q_BTNH, self_mask, query_chunk, num_keys)
    if implementation == "dense":
        return dense_attend(q_BTNH, blocks)
    if implementation == "blockwise":
        return blockwise_attend(q_BTNH, blocks, query_chunk, key_chunk)
    if implementation == "fused":
        return fused_attend(q_BTNH, blocks)
    if len(blocks) != 1:
        raise ValueError(f"splash attends within one chunk of new tokens, not {len(blocks)} blocks.")
    return splash_attend(q_BTNH, *blocks[0][:2], self_mask)


def dense_attend(q_BTNH: Float[Array, "B T N H"], blocks: Sequence[KVBlock]) -> Float[Array, "B T N H"]:
    """The reference: float32 (or wider) scores [B, K, G, T, S] over all blocks, one softmax.

    From ``MANY_QUERIES`` queries on (training, prefill), both products are plain batched matmuls over (B, K), so
    XLA:CPU makes no transposed copies of their operands: the scores take the queries moved to [B, K, G, T, H] and
    the output is computed transposed, [B, K, H, G, T] (on CPU the target's training forward 3-5% and the drafter's
    train step 2-3% faster). The output as [B, K, G, T, H] would be as fast, but its sum over the keys then depends
    on where in S they sit, so a packed document would no longer get bit for bit its own forward. Fewer queries
    (decoding, verifying) keep the products on [B, T, K, G, H]: those compiled programs are unchanged."""
    batch, length, heads, head_dim = q_BTNH.shape
    kv_heads = blocks[0][0].shape[1]
    q_BTKGH = q_BTNH.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    if length >= MANY_QUERIES:
        q_BKGTH = q_BTKGH.transpose(0, 2, 3, 1, 4)

        def scores_of(k_BKSH):
            return jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, k_BKSH)

        def output_of(p_BKGTS, v_BKSH):
            return jnp.einsum("BKSH,BKGTS->BKHGT", v_BKSH, p_BKGTS).transpose(0, 4, 1, 3, 2)
    else:

        def scores_of(k_BKSH):
            return jnp.einsum("BTKGH,BKSH->BKGTS", q_BTKGH, k_BKSH)

        def output_of(p_BKGTS, v_BKSH):
            return jnp.einsum("BKGTS,BKSH->BTKGH", p_BKGTS, v_BKSH)

    compute = jnp.promote_types(q_BTNH.dtype, jnp.float32)
    scores = []
    for k_BKSH, _, mask_BTS in blocks:
        s_BKGTS = scores_of(k_BKSH.astype(q_BTNH.dtype)).astype(compute)
        scores.append(jnp.where(mask_BTS[:, None, None], s_BKGTS, jnp.finfo(compute).min))
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1).astype(q_BTNH.dtype)
    out_BTKGH = 0
    start = 0
    for k_BKSH, v_BKSH, _ in blocks:
        p_BKGTS = probs[..., start : start + k_BKSH.shape[2]]
        out_BTKGH = out_BTKGH + output_of(p_BKGTS, v_BKSH.astype(q_BTNH.dtype))
        start += k_BKSH.shape[2]
    return out_BTKGH.reshape(batch, length, heads, head_dim)


def _concat_padded(blocks: Sequence[KVBlock], dtype: jnp.dtype, key_chunk: int) -> tuple[jax.Array, ...]:
    """All blocks as one [B, K, S', H] key/value pair and a [B, T, S'] mask, S' padded to whole key chunks."""
    keys = jnp.concatenate([k.astype(dtype) for k, _, _ in blocks], axis=2)
    values = jnp.concatenate([v.astype(dtype) for _, v, _ in blocks], axis=2)
    mask = jnp.concatenate([m for _, _, m in blocks], axis=2)
    pad = (-keys.shape[2]) % key_chunk
    real = jnp.pad(jnp.ones(keys.shape[2], bool), (0, pad))  # padding slots, unlike masked keys, weigh nothing
    keys, values = (jnp.pad(x, [(0, 0), (0, 0), (0, pad), (0, 0)]) for x in (keys, values))
    return keys, values, jnp.pad(mask, [(0, 0), (0, 0), (0, pad)]), real


def blockwise_attend(
    q_BTNH: Float[Array, "B T N H"], blocks: Sequence[KVBlock], query_chunk: int, key_chunk: int
) -> Float[Array, "B T N H"]:
    """Attention in [query_chunk, key_chunk] tiles: the backward pass recomputes one query chunk at a time."""
    batch, length, heads, head_dim = q_BTNH.shape
    kv_heads = blocks[0][0].shape[1]
    dtype, compute = q_BTNH.dtype, jnp.promote_types(q_BTNH.dtype, jnp.float32)
    key_chunk = min(key_chunk, sum(k.shape[2] for k, _, _ in blocks))
    query_chunk = min(query_chunk, length)
    keys_BKSH, values_BKSH, mask_BTS, real_S = _concat_padded(blocks, dtype, key_chunk)
    num_keys = keys_BKSH.shape[2] // key_chunk

    def tiles(x, axis):  # [..., S', ...] -> [S'/c, ..., c, ...] for the key scan
        x = x.reshape(*x.shape[:axis], num_keys, key_chunk, *x.shape[axis + 1 :])
        return jnp.moveaxis(x, axis, 0)

    k_tiles, v_tiles, real_tiles = tiles(keys_BKSH, 2), tiles(values_BKSH, 2), real_S.reshape(num_keys, key_chunk)
    q_pad = (-length) % query_chunk
    q_BTKGH = jnp.pad(q_BTNH, [(0, 0), (0, q_pad), (0, 0), (0, 0)]).reshape(
        batch, -1, kv_heads, heads // kv_heads, head_dim
    )
    mask_BTS = jnp.pad(mask_BTS, [(0, 0), (0, q_pad), (0, 0)])
    num_queries = q_BTKGH.shape[1] // query_chunk
    q_chunks = jnp.moveaxis(q_BTKGH.reshape(batch, num_queries, query_chunk, *q_BTKGH.shape[2:]), 1, 0)
    mask_chunks = jnp.moveaxis(mask_BTS.reshape(batch, num_queries, query_chunk, -1), 1, 0)
    lowest = jnp.finfo(compute).min

    @jax.checkpoint
    def one_query_chunk(q_BTKGH, mask_BTS):
        def one_key_chunk(carry, tile):
            max_BKGT, sum_BKGT, acc_BKGTH = carry
            k_BKSH, v_BKSH, mask_BTS, real_S = tile
            s_BKGTS = jnp.einsum("BTKGH,BKSH->BKGTS", q_BTKGH, k_BKSH, preferred_element_type=compute)
            s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, lowest)
            s_BKGTS = jnp.where(real_S, s_BKGTS, -jnp.inf)
            # The running max only keeps exp() in range: the result does not depend on it, so no gradient flows.
            new_max = jax.lax.stop_gradient(jnp.maximum(max_BKGT, jnp.max(s_BKGTS, axis=-1)))
            rescale = jnp.exp(max_BKGT - new_max)
            p_BKGTS = jnp.exp(s_BKGTS - new_max[..., None])
            pv_BKGTH = jnp.einsum("BKGTS,BKSH->BKGTH", p_BKGTS.astype(dtype), v_BKSH, preferred_element_type=compute)
            return (
                new_max,
                rescale * sum_BKGT + jnp.sum(p_BKGTS, axis=-1),
                rescale[..., None] * acc_BKGTH + pv_BKGTH,
            ), None

        shape = (batch, kv_heads, heads // kv_heads, query_chunk)
        init = (jnp.full(shape, lowest, compute), jnp.zeros(shape, compute), jnp.zeros((*shape, head_dim), compute))
        mask_tiles = tiles(mask_BTS, 2)
        (_, sum_BKGT, acc_BKGTH), _ = jax.lax.scan(one_key_chunk, init, (k_tiles, v_tiles, mask_tiles, real_tiles))
        return (acc_BKGTH / sum_BKGT[..., None]).astype(dtype)

    out_QBKGTH = jax.lax.map(lambda xs: one_query_chunk(*xs), (q_chunks, mask_chunks))
    out_BTNH = jnp.einsum("QBKGTH->BQTKGH", out_QBKGTH).reshape(batch, -1, heads, head_dim)
    return out_BTNH[:, :length]


def fused_attend(q_BTNH: Float[Array, "B T N H"], blocks: Sequence[KVBlock]) -> Float[Array, "B T N H"]:
    """``jax.nn.dot_product_attention`` (cuDNN's fused kernel on GPU, XLA elsewhere); rows that see no key get 0."""
    dtype = q_BTNH.dtype
    keys = jnp.concatenate([k.astype(dtype) for k, _, _ in blocks], axis=2).swapaxes(1, 2)
    values = jnp.concatenate([v.astype(dtype) for _, v, _ in blocks], axis=2).swapaxes(1, 2)
    mask_BTS = jnp.concatenate([m for _, _, m in blocks], axis=2)
    on_gpu = jax.default_backend() == "gpu"
    out_BTNH = jax.nn.dot_product_attention(
        q_BTNH, keys, values, mask=mask_BTS[:, None], scale=1.0, implementation="cudnn" if on_gpu else None
    )
    return jnp.where(jnp.any(mask_BTS, axis=-1)[:, :, None, None], out_BTNH, 0)


def splash_attend(
    q_BTNH: Float[Array, "B T N H"],
    k_BKTH: Float[Array, "B K T H"],
    v_BKTH: Float[Array, "B K T H"],
    self_mask: SelfMask,
    interpret: bool | None = None,
) -> Float[Array, "B T N H"]:
    """The Pallas splash kernel (``interpret``: on unless on TPU) over one causal or sliding-window chunk.

    The kernel applies no scale (Gemma 4's is 1.0) and takes GQA (N a multiple of K) itself; head dims are zero-padded
    to its 128 lanes (zero columns add nothing to q·k), and T must be a multiple of ``SPLASH_BLOCK``.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    _, length, heads, head_dim = q_BTNH.shape
    if length % SPLASH_BLOCK:
        raise ValueError(f"splash needs T a multiple of {SPLASH_BLOCK}, got {length}; use blockwise.")
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    kernel = _splash_kernel(length, heads, self_mask.window, interpret)
    pad = [(0, 0)] * 3 + [(0, (-head_dim) % 128)]
    q_BNTH = jnp.pad(q_BTNH.transpose(0, 2, 1, 3), pad)
    k_BKTH, v_BKTH = (jnp.pad(x.astype(q_BTNH.dtype), pad) for x in (k_BKTH, v_BKTH))
    segments_BT = self_mask.segments_BT
    segments_BT = jnp.ones(q_BTNH.shape[:2], jnp.int32) if segments_BT is None else segments_BT.astype(jnp.int32)

    def rows(q_BNTH, k_BKTH, v_BKTH, segments_BT):
        one_row = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s))
        return jax.vmap(one_row)(q_BNTH, k_BKTH, v_BKTH, segments_BT)

    # A Pallas call is opaque to XLA's partitioner: under a mesh each device runs it on its own rows of the batch.
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else tuple(a for a in LOGICAL_RULES["batch"] if a in mesh.axis_names)
    if axes and q_BTNH.shape[0] % math.prod(mesh.shape[a] for a in axes) == 0:
        spec = jax.sharding.PartitionSpec(axes)
        rows = jax.shard_map(rows, in_specs=(spec,) * 4, out_specs=spec, check_vma=False)
    out_BNTH = rows(q_BNTH, k_BKTH, v_BKTH, segments_BT)
    return out_BNTH[..., :head_dim].transpose(0, 2, 1, 3)


@functools.cache
def _splash_kernel(length: int, heads: int, window: int | None, interpret: bool):
    """One kernel (and its block-sparsity tables, built in numpy) per shape, not one per layer traced."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    block = next(b for b in (512, 256, SPLASH_BLOCK) if length % b == 0)
    shape = (length, length)
    # chunk_mask keeps q - k < window: k in [q - (window - 1), q]
    mask = masks.CausalMask(shape) if window is None else masks.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return splash.make_splash_mha(
        masks.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def chunk_mask(
    positions_BT: jax.Array, valid_BT: jax.Array, segments_BT: jax.Array | None, window: int | None
) -> Bool[Array, "B T T"]:
    """Which new tokens each new token sees: causal, valid, same segment, and (sliding) within the window."""
    q_pos, k_pos = positions_BT[:, :, None], positions_BT[:, None, :]
    index = jnp.arange(positions_BT.shape[1])
    mask = (index[None, :, None] >= index[None, None, :]) & valid_BT[:, None, :]
    if segments_BT is not None:
        mask &= segments_BT[:, :, None] == segments_BT[:, None, :]
    if window is not None:
        mask &= q_pos - k_pos < window
    return mask


def cache_mask(
    positions_BT: jax.Array, slot_positions_BS: jax.Array, length_B: jax.Array, window: int | None
) -> Bool[Array, "B T S"]:
    """Which cached slots each new token sees: committed entries (position < length) within the window."""
    k_pos = slot_positions_BS[:, None, :]
    mask = (k_pos >= 0) & (k_pos < length_B[:, None, None])
    if window is not None:
        mask &= positions_BT[:, :, None] - k_pos < window
    return mask


class Attention(nnx.Module):
    """Query projection always; key/value projections only on layers that own their K/V."""

    def __init__(
        self,
        width: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        eps: float,
        *,
        owns_kv: bool,
        keys_are_values: bool,
        rngs: nnx.Rngs,
    ):
        self.eps = eps
        self.q = param(rngs, (width, heads, head_dim), ("embed", "heads", "head_dim"))
        self.q_norm = RMSNorm(head_dim, eps)
        self.o = param(rngs, (heads, head_dim, width), ("heads", "head_dim", "embed"), scale=(heads * head_dim) ** -0.5)
        kv_shape, kv_axes = (width, kv_heads, head_dim), ("embed", "kv_heads", "head_dim")
        self.k = nnx.data(param(rngs, kv_shape, kv_axes) if owns_kv else None)
        self.k_norm = nnx.data(RMSNorm(head_dim, eps) if owns_kv else None)
        self.v = nnx.data(param(rngs, kv_shape, kv_axes) if owns_kv and not keys_are_values else None)

    def queries(self, x_BTD: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
        width, heads, head_dim = self.q.shape
        q_DF = self.q[...].astype(x_BTD.dtype).reshape(width, heads * head_dim)
        q_BTNH = project(x_BTD, q_DF).reshape(*x_BTD.shape[:2], heads, head_dim)
        return apply_rope(self.q_norm(q_BTNH), cos_BTH, sin_BTH)

    def keys_values(self, x_BTD: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> tuple[jax.Array, jax.Array]:
        """New keys (normed, roped) and values (weightless-normed, the raw key projection on k_eq_v layers)."""
        k_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.k[...].astype(x_BTD.dtype))
        v_BTKH = k_BTKH if self.v is None else jnp.einsum("BTD,DKH->BTKH", x_BTD, self.v[...].astype(x_BTD.dtype))
        return apply_rope(self.k_norm(k_BTKH), cos_BTH, sin_BTH), rms_norm(v_BTKH, None, self.eps)

    def output(self, attn_BTNH: jax.Array) -> jax.Array:
        # As one [B, T, N H] x [N H, D] product: contracting N and H as two axes let XLA:CPU lay the attention out
        # H-major and copy (transpose) the whole weight on every call to match, 0.4 ms of a 4 ms decode step.
        batch, length, heads, head_dim = attn_BTNH.shape
        o_FD = self.o[...].astype(attn_BTNH.dtype).reshape(heads * head_dim, -1)
        return project(attn_BTNH.reshape(batch, length, heads * head_dim), o_FD)
