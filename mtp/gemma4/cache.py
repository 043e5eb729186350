"""The target's KV cache: ``[B, K, S, H]`` per non-shared layer, sliding layers in a ring bounded by the window.

Writing a chunk never moves ``length`` (the committed token count per row): the caller commits what it accepts
(``commit``), so a verification forward of k+1 draft positions can be rolled back for free. Entries at
positions ``>= length`` are stale and masked; a sliding ring of ``window + max_chunk`` slots is exactly large
enough that no entry still visible to the target (window W) or a drafter (window W+1) is overwritten by a
rejected chunk.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mtp.gemma4.config import ATTENTION_TYPES, SLIDING, Gemma4Config


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys/values of the cached layers, the position held by every slot (-1 = empty), committed lengths."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    slot_positions: dict[str, jax.Array]
    length: jax.Array

    @classmethod
    def init(
        cls, config: Gemma4Config, batch: int, max_len: int, *, max_chunk: int = 1, dtype: jnp.dtype = jnp.float32
    ) -> KVCache:
        """An empty cache for ``max_len`` tokens per row, written ``max_chunk`` tokens at a time after prefill."""
        sizes = cache_sizes(config, max_len, max_chunk)
        keys, values = [], []
        for layer in cached_layers(config):
            layer_type = config.layer_types[layer]
            shape = (batch, config.kv_heads(layer_type), sizes[layer_type], config.head_dim_of(layer_type))
            keys.append(jnp.zeros(shape, dtype))
            values.append(jnp.zeros(shape, dtype))
        return cls(
            keys=tuple(keys),
            values=tuple(values),
            slot_positions={t: jnp.full((batch, sizes[t]), -1, jnp.int32) for t in ATTENTION_TYPES},
            length=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.slot_positions["full_attention"].shape[1]

    def commit(self, num_tokens_B: jax.Array) -> KVCache:
        """Accepts the next ``num_tokens_B`` written tokens of each row."""
        return dataclasses.replace(self, length=self.length + num_tokens_B.astype(jnp.int32))

    def rollback_to(self, length_B: jax.Array) -> KVCache:
        return dataclasses.replace(self, length=length_B.astype(jnp.int32))


def cached_layers(config: Gemma4Config) -> list[int]:
    """Layers that own K/V (the KV-shared layers read their producer's)."""
    return [i for i in range(config.num_layers) if not config.shares_kv(i)]


def cache_sizes(config: Gemma4Config, max_len: int, max_chunk: int) -> dict[str, int]:
    return {"full_attention": max_len, SLIDING: min(max_len, config.sliding_window + max_chunk)}


def write_slots(positions_BT: jax.Array, valid_BT: jax.Array, size: int, *, ring: bool) -> jax.Array:
    """Slot of each new token, or ``size`` (dropped) for pads and for ring entries a later token overwrites."""
    last_B1 = jnp.max(jnp.where(valid_BT, positions_BT, -1), axis=1, keepdims=True)
    keep = valid_BT & (positions_BT > last_B1 - size) if ring else valid_BT & (positions_BT < size)
    slots = positions_BT % size if ring else positions_BT
    return jnp.where(keep, slots, size)


def scatter_BKSH(cache_BKSH: jax.Array, new_BTKH: jax.Array, slots_BT: jax.Array) -> jax.Array:
    batch_BT = jnp.broadcast_to(jnp.arange(slots_BT.shape[0])[:, None], slots_BT.shape)
    return cache_BKSH.at[batch_BT, :, slots_BT].set(new_BTKH.astype(cache_BKSH.dtype), mode="drop")


def scatter_BS(slot_pos_BS: jax.Array, positions_BT: jax.Array, slots_BT: jax.Array) -> jax.Array:
    batch_BT = jnp.broadcast_to(jnp.arange(slots_BT.shape[0])[:, None], slots_BT.shape)
    return slot_pos_BS.at[batch_BT, slots_BT].set(positions_BT, mode="drop")
