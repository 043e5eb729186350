"""An EAGLE-3-style drafter: one causal decoder layer over its own draft steps, fed fused target-layer features.

Step 0 at anchor p reads the fusion of the target's low, middle and high layer outputs at p-1 (one linear map of
their RMS-normed concatenation) and the embedding of x_p; step j reads the layer's own output of step j-1
(feature-level recurrence) and the embedding of x_{p+j}, at position p+j. The layer's attention keeps its own K/V
over the round's draft steps (step j sees steps 0..j); the context enters through the fused features only (EAGLE-3
also keeps K/V over the prefix; this drafter keeps none across rounds). Training runs the same steps over every
anchor at once (EAGLE-3's training-time test), feeding each depth the previous depth's output.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from mtp.drafter.interface import Anchor, DepthOutput, Draft, DrafterFamily, UnrollInputs, checkpointed
from mtp.gemma4.attention import Attention
from mtp.gemma4.config import ConfigError, Gemma4Config, RopeConfig
from mtp.gemma4.layers import MLP, RMSNorm, param, rms_norm, rope_inv_freq, rope_tables
from mtp.gemma4.model import Gemma4

FAMILY = "eagle3"


@dataclasses.dataclass(frozen=True)
class Eagle3Config:
    """Width D, heads N x H over K kv heads, MLP width F; reads the target's (width U) ``feature_layers``."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    feature_layers: tuple[int, ...]
    backbone_hidden_size: int
    vocab_size: int
    max_draft_len: int = 8
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0

    def __post_init__(self):
        object.__setattr__(self, "feature_layers", tuple(int(i) for i in self.feature_layers))
        if self.num_heads % self.num_kv_heads or not self.feature_layers or self.max_draft_len < 1:
            raise ConfigError(
                f"EAGLE-3: num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}, "
                f"feature_layers={self.feature_layers} non-empty, max_draft_len={self.max_draft_len} >= 1."
            )

    @classmethod
    def for_target(cls, target: Gemma4Config, *, hidden_size: int, num_heads: int, **kwargs) -> Eagle3Config:
        """Low / middle / high layers as EAGLE-3 picks them (2, L/2, L-3), clipped to the target's depth."""
        last = target.num_layers - 1
        layers = sorted({min(2, last), last // 2, max(last - 2, 0)})
        defaults = dict(num_kv_heads=1, head_dim=hidden_size // num_heads, intermediate_size=4 * hidden_size)
        return cls(
            hidden_size=hidden_size,
            num_heads=num_heads,
            feature_layers=kwargs.pop("feature_layers", tuple(layers)),
            backbone_hidden_size=target.hidden_size,
            vocab_size=target.vocab_size,
            rms_norm_eps=target.rms_norm_eps,
            **defaults | kwargs,
        )

    def validate_against(self, target: Gemma4Config) -> None:
        mine = (self.backbone_hidden_size, self.vocab_size)
        if mine != (target.hidden_size, target.vocab_size) or max(self.feature_layers) >= target.num_layers:
            raise ConfigError(
                f"EAGLE-3 drafter (width, vocab) {mine} and feature layers {self.feature_layers} do not fit the "
                f"target's ({target.hidden_size}, {target.vocab_size}) and {target.num_layers} layers."
            )


class Eagle3(DrafterFamily):
    """fuse(target layers) | own output -> [embed, feature] -> one decoder layer with own K/V -> norm -> own head."""

    family = FAMILY

    def __init__(self, config: Eagle3Config, *, rngs: nnx.Rngs):
        self.config = config
        width, backbone, eps = config.hidden_size, config.backbone_hidden_size, config.rms_norm_eps
        self.fuse = param(rngs, (len(config.feature_layers) * backbone, width), (None, "embed"))
        self.embed_proj = param(rngs, (backbone, width), ("embed", None))
        self.input_proj = param(rngs, (2 * width, width), (None, "embed"))
        self.attn = Attention(
            width,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            eps,
            owns_kv=True,
            keys_are_values=False,
            rngs=rngs,
        )
        self.attn_norm = RMSNorm(width, eps, axis_name="embed")
        self.mlp_norm = RMSNorm(width, eps, axis_name="embed")
        self.mlp = MLP(width, config.intermediate_size, rngs=rngs)
        self.final_norm = RMSNorm(width, eps, axis_name="embed")
        self.embed = param(rngs, (config.vocab_size, width), ("vocab", "embed"), scale=width**-0.5)

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return self.config.feature_layers

    def fused(self, anchor: Anchor, dtype: jnp.dtype) -> Float[Array, "B T D"]:
        """Step 0's feature: the chosen layers' outputs ``[B, T, L, U]``, each RMS-normed, concatenated, mapped."""
        f_BTLU = rms_norm(anchor.features.astype(dtype), None, self.config.rms_norm_eps).astype(dtype)
        return jnp.einsum("BTI,ID->BTD", f_BTLU.reshape(*f_BTLU.shape[:2], -1), self.fuse[...].astype(dtype))

    def step(self, embed_BTU, feature_BTD, positions_BT, keys_BTPKH, values_BTPKH, j: int | jax.Array):
        """Draft step j at every anchor: writes its K/V at slot j of the round's cache, attends slots 0..j.

        Returns the layer's output (the next step's feature), the head's input and the updated K/V.
        """
        config, dtype = self.config, feature_BTD.dtype
        e_BTD = jnp.einsum(
            "BTU,UD->BTD",
            rms_norm(embed_BTU, None, config.rms_norm_eps).astype(dtype),
            self.embed_proj[...].astype(dtype),
        )
        both_BTI = jnp.concatenate([e_BTD, rms_norm(feature_BTD, None, config.rms_norm_eps).astype(dtype)], -1)
        x_BTD = jnp.einsum("BTI,ID->BTD", both_BTI, self.input_proj[...].astype(dtype))
        h_BTD = self.attn_norm(x_BTD)
        rope = rope_tables(positions_BT, rope_inv_freq(config.head_dim, RopeConfig(theta=config.rope_theta)), dtype)
        k_BTKH, v_BTKH = self.attn.keys_values(h_BTD, *rope)
        keys_BTPKH, values_BTPKH = keys_BTPKH.at[:, :, j].set(k_BTKH), values_BTPKH.at[:, :, j].set(v_BTKH)
        q_BTNH = self.attn.queries(h_BTD, *rope)
        batch, length, heads, head_dim = q_BTNH.shape
        q_BTKGH = q_BTNH.reshape(batch, length, config.num_kv_heads, -1, head_dim)
        s_BTKGP = jnp.einsum("BTKGH,BTPKH->BTKGP", q_BTKGH, keys_BTPKH).astype(jnp.float32)
        seen_P = jnp.arange(keys_BTPKH.shape[2]) <= j
        probs = jax.nn.softmax(jnp.where(seen_P, s_BTKGP, jnp.finfo(jnp.float32).min), axis=-1).astype(dtype)
        attn_BTNH = jnp.einsum("BTKGP,BTPKH->BTKGH", probs, values_BTPKH).reshape(batch, length, heads, head_dim)
        x_BTD = x_BTD + self.attn.output(attn_BTNH)
        x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
        return x_BTD, self.final_norm(x_BTD), keys_BTPKH, values_BTPKH

    def empty_kv(self, batch: int, length: int, steps: int, dtype: jnp.dtype) -> jax.Array:
        return jnp.zeros((batch, length, steps, self.config.num_kv_heads, self.config.head_dim), dtype)

    def propose(self, target, token_B, anchor, position_B, target_kv, keys_PB, *, num_tokens, pick, dtype) -> Draft:
        feature_B1D = self.fused(jax.tree.map(lambda x: x[:, None], anchor), dtype)
        kv = self.empty_kv(token_B.shape[0], 1, num_tokens, dtype)

        def one(carry, xs):
            token_B, feature_B1D, keys, values = carry
            j, keys_B = xs
            embed_B1U = target.embed_tokens(token_B[:, None]).astype(dtype)
            feature_B1D, h_B1D, keys, values = self.step(
                embed_B1U, feature_B1D, (position_B + j)[:, None], keys, values, j
            )
            logits_BV = self.full_logits(h_B1D)[:, 0]
            next_B = pick(logits_BV, keys_B)
            return (next_B, feature_B1D, keys, values), (next_B, logits_BV)

        steps = jnp.arange(num_tokens)
        _, (tokens_PB, logits_PBV) = jax.lax.scan(one, (token_B, feature_B1D, kv, kv), (steps, keys_PB))
        return Draft(tokens_BP=tokens_PB.T, logits_BPV=jnp.swapaxes(logits_PBV, 0, 1))

    def unroll(self, target: Gemma4, inputs: UnrollInputs, *, dtype: jnp.dtype, remat: str) -> list[DepthOutput]:
        """Training-time test: every depth at every anchor, fed the true tokens and the previous depth's output."""
        batch, length = inputs.positions_BT.shape
        feature_BTD = self.fused(inputs.anchor, dtype)
        keys = values = self.empty_kv(batch, length, len(inputs.embed_PBTD), dtype)
        out = []
        for j, embed_BTU in enumerate(inputs.embed_PBTD):
            step = checkpointed(self, lambda m, *args, j=j: m.step(*args, j), remat != "none")
            feature_BTD, h_BTD, keys, values = step(
                embed_BTU.astype(dtype), feature_BTD, inputs.positions_BT + j, keys, values
            )
            out.append(DepthOutput(normed=h_BTD, projected=feature_BTD))
        return out
