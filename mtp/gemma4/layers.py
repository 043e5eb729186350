"""Gemma 4 building blocks shared by the target and the drafters: norms, RoPE, dense MLP, mixture of experts."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from mtp.gemma4.config import RopeConfig


def param(
    rngs: nnx.Rngs | None,
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    *,
    scale: float | None = None,
    value: float | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> nnx.Param:
    """A parameter tagged with logical axis names (see ``mtp.sharding``); normal(scale) or constant init."""
    assert len(shape) == len(axes), (shape, axes)
    if value is not None:
        init = jnp.full(shape, value, dtype)
    else:
        std = scale if scale is not None else 1.0 / math.sqrt(shape[0])
        init = std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(init, axes=axes)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def first_argmax(x_BTV: jax.Array) -> jax.Array:
    """``jnp.argmax`` over the last axis (the first of equal maxima), as a max and then a min over the indices
    holding it: XLA:CPU runs argmax as one variadic reduce, about 6x slower (19 vs 3 ms on [8, 128, 4096])."""
    size = x_BTV.shape[-1]
    if size >= 1 << 24:
        raise ValueError(f"first_argmax indexes in float32, exact below 2^24 entries, not {size}.")
    # The index stays float32: XLA:CPU's int32 min over the same entries ran as slowly as argmax.
    at_max_BTV = x_BTV == jnp.max(x_BTV, axis=-1, keepdims=True)
    index_BTV = jnp.where(at_max_BTV, jnp.arange(size, dtype=jnp.float32), float(size))
    return jnp.min(index_BTV, axis=-1).astype(jnp.int32)


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """``x * (mean(x²) + eps)^-½ * w`` in at least float32; Gemma 4 multiplies by ``w`` (not ``1 + w``)."""
    compute = jnp.promote_types(x.dtype, jnp.float32)
    xc = x.astype(compute)
    y = xc * jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(compute)
    return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMS normalisation over the last axis, with a learned scale unless ``with_scale=False``."""

    def __init__(self, dim: int, eps: float, *, axis_name: str | None = None, with_scale: bool = True):
        self.eps = eps
        self.weight = nnx.data(param(None, (dim,), (axis_name,), value=1.0) if with_scale else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, None if self.weight is None else self.weight[...], self.eps)


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> np.ndarray:
    """Inverse frequencies of one attention type; unrotated pairs get frequency 0 (Gemma 4 "proportional")."""
    rotated_pairs = int(rope.rotary_fraction * head_dim // 2)
    exponents = np.arange(0, 2 * rotated_pairs, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = np.float32(1.0) / (np.float32(rope.theta) ** exponents)
    inv_freq = np.concatenate([inv_freq, np.zeros(head_dim // 2 - rotated_pairs, np.float32)])
    return (inv_freq / np.float32(rope.factor)).astype(np.float32)


def rope_tables(
    positions_BT: Int[Array, "B T"], inv_freq: np.ndarray, dtype: jnp.dtype = jnp.float32
) -> tuple[jax.Array, jax.Array]:
    """cos and sin ``[B, T, H]`` in at least float32, in rotate-half layout (frequencies repeated per half)."""
    compute = jnp.promote_types(dtype, jnp.float32)
    freqs_BTh = positions_BT.astype(compute)[..., None] * jnp.asarray(inv_freq, compute)
    angles_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
    return jnp.cos(angles_BTH), jnp.sin(angles_BTH)


def apply_rope(x_BTNH: Float[Array, "B T N H"], cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
    """Rotate-half RoPE: pairs are (i, i + H/2); frequency-0 pairs pass through unchanged."""
    half = x_BTNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    cos, sin = cos_BTH[:, :, None, :].astype(x_BTNH.dtype), sin_BTH[:, :, None, :].astype(x_BTNH.dtype)
    return x_BTNH * cos + rotated * sin


def transposed(w_FD: jax.Array) -> jax.Array:
    """``w.T`` of a weight gradient, on CPU kept out of the product that makes it.

    XLA folds ``einsum(...).T`` into the product by swapping its operands: the left one is then contracted over its
    major dimension, which XLA:CPU's YNNPACK products do not take, so it falls back to a slower product (a [4096, 128]
    gradient of B T = 1024 rows: 14.2 ms, against 9.2 ms for YNNPACK's product and the copy that transposes it). The
    barrier keeps the product as written; only the [F, D] result is transposed. GPU and TPU products take either
    operand transposed, so there the fold stays.
    """
    if jax.default_backend() == "cpu":
        w_FD = jax.lax.optimization_barrier(w_FD)
    return w_FD.T


@jax.custom_vjp
def project(x_BTD: Float[Array, "B T D"], w_DF: Float[Array, "D F"]) -> Float[Array, "B T F"]:
    """``einsum("BTD,DF->BTF", x, w)`` (the same forward), with a backward that never transposes the gradient."""
    return jnp.einsum("BTD,DF->BTF", x_BTD, w_DF)


def _project_forward(x_BTD, w_DF):
    return project(x_BTD, w_DF), (x_BTD, w_DF)


def _project_backward(saved, grad_BTF):
    x_BTD, w_DF = saved
    grad_x = jnp.einsum("BTF,DF->BTD", grad_BTF, w_DF)
    # B, T contracted as the major dimension of both operands: jax's own transpose of the einsum has XLA:CPU copy
    # each [B, T, F] gradient to [F, B T] first (the MLP's three: 1.39x -> 1.20x the floor of
    # benchmarks/train_speed.py's step; the attention's query and output and the drafter's pre- and
    # post-projections: 0.8-1.7% of the step more). XLA:CPU still lays the product's left operand out [width, B T]:
    # the narrower of the two goes left (0.7-1.4% of the step: the drafter's down, output and pre-projections).
    if x_BTD.shape[-1] > grad_BTF.shape[-1]:
        grad_w = transposed(jnp.einsum("BTF,BTD->FD", grad_BTF, x_BTD))
    else:
        grad_w = jnp.einsum("BTD,BTF->DF", x_BTD, grad_BTF)
    return grad_x.astype(x_BTD.dtype), grad_w.astype(w_DF.dtype)


project.defvjp(_project_forward, _project_backward)


# Longer sequences run the dense MLP in chunks of this many positions.
MLP_CHUNK = 512


class MLP(nnx.Module):
    """Gated GELU feed-forward: ``down(gelu(gate(x)) * up(x))``."""

    def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs):
        self.gate = param(rngs, (width, hidden), ("embed", "mlp"))
        self.up = param(rngs, (width, hidden), ("embed", "mlp"))
        self.down = param(rngs, (hidden, width), ("mlp", "embed"))

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        batch, length, width = x_BTD.shape
        if length > MLP_CHUNK and length % MLP_CHUNK == 0:  # [B, T, F] three times over is the largest temporary
            x_CBtD = jnp.moveaxis(x_BTD.reshape(batch, length // MLP_CHUNK, MLP_CHUNK, width), 1, 0)
            return jnp.moveaxis(jax.lax.map(self.dense, x_CBtD), 0, 1).reshape(batch, length, width)
        return self.dense(x_BTD)

    def dense(self, x_BTD: jax.Array) -> jax.Array:
        dtype = x_BTD.dtype
        gate_BTF = project(x_BTD, self.gate[...].astype(dtype))
        up_BTF = project(x_BTD, self.up[...].astype(dtype))
        return project(gelu_tanh(gate_BTF) * up_BTF, self.down[...].astype(dtype))


# Rows of (token, expert) pairs per matmul when the experts run in tiles: longer sequences than this use tiles.
EXPERT_TILE = 128
# Longer sequences run the experts this many positions at a time (a tile per expert is padding, so not fewer).
MOE_CHUNK = 1024


class MixtureOfExperts(nnx.Module):
    """Gemma 4's routed experts (run beside the dense MLP): softmax router, top-k, per-expert scale.

    Tokens are sorted by expert and multiplied with ``jax.lax.ragged_dot``, so the cost is that of the k chosen
    experts per token, not of all E.
    """

    def __init__(self, width: int, hidden: int, num_experts: int, top_k: int, eps: float, *, rngs: nnx.Rngs):
        self.top_k, self.eps = top_k, eps
        self.router_proj = param(rngs, (width, num_experts), ("embed", None))
        self.router_scale = param(None, (width,), ("embed",), value=1.0)
        self.per_expert_scale = param(None, (num_experts,), (None,), value=1.0)
        self.gate_up = param(rngs, (num_experts, width, 2 * hidden), ("experts", "embed", "mlp"))
        self.down = param(rngs, (num_experts, hidden, width), ("experts", "mlp", "embed"), scale=hidden**-0.5)

    def route(self, residual_MD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Top-k expert ids and their weights for each token, from the un-normalised residual stream."""
        width = residual_MD.shape[-1]
        r_MD = rms_norm(residual_MD, None, self.eps) * self.router_scale[...].astype(residual_MD.dtype)
        scores_ME = jnp.einsum("MD,DE->ME", r_MD * width**-0.5, self.router_proj[...].astype(r_MD.dtype))
        probs_ME = jax.nn.softmax(scores_ME.astype(jnp.promote_types(scores_ME.dtype, jnp.float32)), axis=-1)
        weights_Mk, experts_Mk = jax.lax.top_k(probs_ME, self.top_k)
        weights_Mk = weights_Mk / jnp.sum(weights_Mk, axis=-1, keepdims=True)
        return experts_Mk, weights_Mk * self.per_expert_scale[...][experts_Mk]

    def __call__(self, x_BTD: jax.Array, residual_BTD: jax.Array) -> jax.Array:
        batch, length, width = x_BTD.shape
        if length > MOE_CHUNK and length % MOE_CHUNK == 0:  # one chunk of positions at a time, then tiles
            chunks = [jnp.moveaxis(x.reshape(batch, -1, MOE_CHUNK, width), 1, 0) for x in (x_BTD, residual_BTD)]
            out_CBtD = jax.lax.map(lambda xs: jax.vmap(self.tiled)(*xs), tuple(chunks))
            return jnp.moveaxis(out_CBtD, 0, 1).reshape(batch, length, width)
        if length > EXPERT_TILE:  # training, long prompts: per row, in tiles (see ``tiled``)
            return jax.vmap(self.tiled)(x_BTD, residual_BTD)
        return self.ragged(x_BTD, residual_BTD)

    def ragged(self, x_BTD: jax.Array, residual_BTD: jax.Array) -> jax.Array:
        """All tokens of the batch sorted by expert, through ``jax.lax.ragged_dot``."""
        batch, length, width = x_BTD.shape
        x_MD = x_BTD.reshape(-1, width)
        experts_Mk, weights_Mk = self.route(residual_BTD.reshape(-1, width))
        num_experts = self.gate_up.shape[0]
        flat_experts = experts_Mk.reshape(-1)
        order = jnp.argsort(flat_experts, stable=True)
        token_of = order // self.top_k
        group_sizes = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)
        x_sorted = x_MD[token_of]
        gate_up = jax.lax.ragged_dot(x_sorted, self.gate_up[...].astype(x_MD.dtype), group_sizes)
        gate, up = jnp.split(gate_up, 2, axis=-1)
        y = jax.lax.ragged_dot(gelu_tanh(gate) * up, self.down[...].astype(x_MD.dtype), group_sizes)
        y = y * weights_Mk.reshape(-1)[order][:, None].astype(y.dtype)
        out_MD = jnp.zeros_like(x_MD).at[token_of].add(y)
        return out_MD.reshape(batch, length, width)

    def tiled(self, x_TD: jax.Array, residual_TD: jax.Array) -> jax.Array:
        """One row's experts as a scan over tiles of EXPERT_TILE sorted (token, expert) pairs of a single expert.

        ``ragged_dot`` is lowered densely where no grouped kernel exists (XLA:CPU: every row times every expert),
        and sorting a whole batch gathers it onto every device; per row and per tile, memory is one tile's.
        """
        width, dtype = x_TD.shape[-1], x_TD.dtype
        num_experts, tile = self.gate_up.shape[0], EXPERT_TILE
        experts_Tk, weights_Tk = self.route(residual_TD)
        flat_experts = experts_Tk.reshape(-1)
        order = jnp.argsort(flat_experts, stable=True)
        sorted_experts = flat_experts[order]
        sizes_E = jnp.bincount(flat_experts, length=num_experts)
        padded_E = (sizes_E + tile - 1) // tile * tile  # every expert's group starts on a tile boundary
        start_E, padded_start_E = jnp.cumsum(sizes_E) - sizes_E, jnp.cumsum(padded_E) - padded_E
        slot = padded_start_E[sorted_experts] + jnp.arange(order.shape[0]) - start_E[sorted_experts]
        num_tiles = -(-(order.shape[0] + num_experts * (tile - 1)) // tile)
        x_PD = jnp.zeros((num_tiles * tile, width), dtype).at[slot].set(x_TD[order // self.top_k])
        tile_expert = jnp.searchsorted(jnp.cumsum(padded_E), jnp.arange(num_tiles) * tile, side="right")
        tile_expert = jnp.minimum(tile_expert, num_experts - 1)  # tiles past the last group hold zeros

        def one_tile(_, xs):
            x_tD, expert = xs
            gate, up = jnp.split(x_tD @ self.gate_up[expert].astype(dtype), 2, axis=-1)
            return None, (gelu_tanh(gate) * up) @ self.down[expert].astype(dtype)

        _, y_PD = jax.lax.scan(one_tile, None, (x_PD.reshape(num_tiles, tile, width), tile_expert))
        y = y_PD.reshape(-1, width)[slot] * weights_Tk.reshape(-1)[order][:, None].astype(dtype)
        return jnp.zeros_like(x_TD).at[order // self.top_k].add(y)
