"""Medusa-1 heads: P residual blocks on the target's last hidden state, each read by the target's tied output head.

Head j (0-based) reads h_{p-1}, the target's state that produced the newest token x_p, and predicts x_{p+j+1}
(Medusa's "head k predicts t+k+1" with k = j+1, t = p-1). Heads ignore the drafted tokens and the target's K/V;
the target stays frozen (its table is read, never trained).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from mtp.drafter.interface import DepthOutput, Draft, DrafterFamily, UnrollInputs, wide
from mtp.gemma4.config import ConfigError, Gemma4Config
from mtp.gemma4.layers import param
from mtp.gemma4.model import Gemma4

FAMILY = "medusa"


@dataclasses.dataclass(frozen=True)
class MedusaConfig:
    """``num_heads`` heads (= the longest draft) of ``num_layers`` blocks ``x + silu(x W + b)`` each, width U."""

    num_heads: int
    backbone_hidden_size: int
    vocab_size: int
    num_layers: int = 1
    final_logit_softcapping: float | None = None  # the target's: the heads share its output head

    def __post_init__(self):
        if self.num_heads < 1 or self.num_layers < 1:
            raise ConfigError(
                f"Medusa needs num_heads >= 1 and num_layers >= 1, got {self.num_heads}, {self.num_layers}."
            )

    @property
    def max_draft_len(self) -> int:
        return self.num_heads

    @classmethod
    def for_target(cls, target: Gemma4Config, *, num_heads: int, num_layers: int = 1) -> MedusaConfig:
        return cls(num_heads, target.hidden_size, target.vocab_size, num_layers, target.final_logit_softcapping)

    def validate_against(self, target: Gemma4Config) -> None:
        """Raises ``ConfigError`` unless the heads fit ``target``'s width, vocabulary and logit cap."""
        mine = (self.backbone_hidden_size, self.vocab_size, self.final_logit_softcapping)
        theirs = (target.hidden_size, target.vocab_size, target.final_logit_softcapping)
        if mine != theirs:
            raise ConfigError(f"Medusa heads (width, vocab, softcap) {mine} do not fit the target's {theirs}.")


class Medusa(DrafterFamily):
    """Medusa-1: ``num_heads`` independent residual heads; block weights start at zero (head = target's head)."""

    family = FAMILY

    def __init__(self, config: MedusaConfig, *, rngs: nnx.Rngs):
        self.config = config
        shape = (config.num_heads, config.num_layers, config.backbone_hidden_size)
        self.weight = param(rngs, (*shape, config.backbone_hidden_size), (None, None, "embed", "embed"), value=0.0)
        self.bias = param(rngs, shape, (None, None, "embed"), value=0.0)

    def heads(self, h_BTU: Float[Array, "B T U"], dtype: jnp.dtype) -> Float[Array, "P B T U"]:
        """Every head's input to the output head, from the target's last hidden state."""
        x_PBTU = jnp.broadcast_to(h_BTU.astype(dtype), (self.config.num_heads, *h_BTU.shape))
        for i in range(self.config.num_layers):
            w_PUU, b_PU = self.weight[:, i].astype(dtype), self.bias[:, i].astype(dtype)
            x_PBTU = x_PBTU + jax.nn.silu(jnp.einsum("PBTU,PUW->PBTW", x_PBTU, w_PUU) + b_PU[:, None, None])
        return x_PBTU

    def vocab_table(self, target: Gemma4) -> jax.Array:
        return target.embed[...]

    def full_logits(self, h_BTU: jax.Array, table_VU: jax.Array | None = None) -> jax.Array:
        """The target's output head (tied embedding, soft-capped as the target caps): pass ``vocab_table(target)``."""
        if table_VU is None:
            raise ValueError("Medusa heads read the target's output head: pass table_VU=medusa.vocab_table(target).")
        logits_BTV = jnp.einsum("BTU,VU->BTV", h_BTU, table_VU.astype(h_BTU.dtype), preferred_element_type=wide(h_BTU))
        if (cap := self.config.final_logit_softcapping) is not None:
            logits_BTV = jnp.tanh(logits_BTV / cap) * cap
        return logits_BTV

    def propose(self, target, token_B, anchor, position_B, target_kv, keys_PB, *, num_tokens, pick, dtype) -> Draft:
        h_PB1U = self.heads(anchor.hidden[:, None], dtype)[:num_tokens]
        logits_PBV = jnp.stack([self.full_logits(h_B1U, target.embed[...])[:, 0] for h_B1U in h_PB1U])
        keys = [None] * num_tokens if keys_PB is None else list(keys_PB)
        tokens_PB = jnp.stack([pick(logits_BV, k) for logits_BV, k in zip(logits_PBV, keys, strict=True)])
        return Draft(tokens_BP=tokens_PB.T, logits_BPV=jnp.swapaxes(logits_PBV, 0, 1))

    def unroll(self, target: Gemma4, inputs: UnrollInputs, *, dtype: jnp.dtype, remat: str) -> list[DepthOutput]:
        """Depth j is head j on h_{p-1}: no recurrence, so remat has nothing to save."""
        heads_PBTU = self.heads(inputs.anchor.hidden, dtype)
        return [DepthOutput(normed=heads_PBTU[j]) for j in range(len(inputs.embed_PBTD))]
