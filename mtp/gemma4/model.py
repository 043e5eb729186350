"""The Gemma 4 text decoder in Flax NNX: prefill, decode and verify over a KV cache, or one cache-less forward."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from mtp.gemma4 import cache as cache_lib
from mtp.gemma4.attention import Attention, SelfMask, attend, cache_mask, chunk_mask
from mtp.gemma4.cache import KVCache
from mtp.gemma4.config import ATTENTION_TYPES, SLIDING, Gemma4Config
from mtp.gemma4.layers import MLP, MixtureOfExperts, RMSNorm, gelu_tanh, param, rope_inv_freq, rope_tables
from mtp.sharding import constrain_batch


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKV:
    """K/V a drafter reads: keys and values ``[B, K, S, H]`` and the position of every slot (-1 = none)."""

    keys: jax.Array
    values: jax.Array
    positions: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TargetOutput:
    """Logits (soft-capped), last hidden state after the final norm, the drafter-facing K/V per layer type, and
    (``feature_layers``) the residual stream after each chosen layer ``[B, T, L, D]``."""

    logits: jax.Array | None
    hidden: jax.Array
    drafter_kv: dict[str, LayerKV]
    features: jax.Array | None = None


def drafter_kv_from_cache(config: Gemma4Config, cache: KVCache) -> dict[str, LayerKV]:
    """The cached K/V of the target's producer layers, which the drafter reads."""
    cached = cache_lib.cached_layers(config)
    return {
        layer_type: LayerKV(
            cache.keys[cached.index(layer)], cache.values[cached.index(layer)], cache.slot_positions[layer_type]
        )
        for layer_type, layer in config.producer_layers.items()
    }


def layer_groups(config: Gemma4Config) -> list[tuple[int, int, int]]:
    """(first layer, period, repeats): the K/V-owning layers, then the KV-shared ones, each as the shortest period
    of layer types that repeats to fill it (Gemma 4: 4-5 sliding layers then a full one)."""
    groups = []
    for start, stop in ((0, config.first_shared_layer), (config.first_shared_layer, config.num_layers)):
        types = config.layer_types[start:stop]
        if types:
            period = next(
                p for p in range(1, len(types) + 1) if len(types) % p == 0 and types == types[:p] * (len(types) // p)
            )
            groups.append((start, period, len(types) // period))
    return groups


class DecoderLayer(nnx.Module):
    """Attention, dense MLP (+ experts), per-layer-embedding residual, and the learned layer scalar."""

    def __init__(self, config: Gemma4Config, layer: int, *, rngs: nnx.Rngs):
        width, eps, layer_type = config.hidden_size, config.rms_norm_eps, config.layer_types[layer]
        self.attn = Attention(
            width,
            config.num_heads,
            config.kv_heads(layer_type),
            config.head_dim_of(layer_type),
            eps,
            owns_kv=not config.shares_kv(layer),
            keys_are_values=config.keys_are_values(layer),
            rngs=rngs,
        )
        self.input_norm = RMSNorm(width, eps, axis_name="embed")
        self.post_attn_norm = RMSNorm(width, eps, axis_name="embed")
        self.pre_ffw_norm = RMSNorm(width, eps, axis_name="embed")
        self.post_ffw_norm = RMSNorm(width, eps, axis_name="embed")
        self.mlp = MLP(width, config.mlp_width(layer), rngs=rngs)
        self.moe = nnx.data(None)
        if config.enable_moe:
            self.moe = MixtureOfExperts(
                width, config.moe_intermediate_size, config.num_experts, config.top_k_experts, eps, rngs=rngs
            )
            self.post_ffw_norm_1 = RMSNorm(width, eps, axis_name="embed")
            self.pre_ffw_norm_2 = RMSNorm(width, eps, axis_name="embed")
            self.post_ffw_norm_2 = RMSNorm(width, eps, axis_name="embed")
        self.ple_gate = nnx.data(None)
        if config.per_layer_input_dim:
            self.ple_gate = param(rngs, (width, config.per_layer_input_dim), ("embed", None))
            self.ple_proj = param(rngs, (config.per_layer_input_dim, width), (None, "embed"))
            self.ple_norm = RMSNorm(width, eps, axis_name="embed")
        self.layer_scalar = param(None, (1,), (None,), value=1.0)

    def attend_and_feed(
        self,
        x_BTD: jax.Array,
        h_BTD: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        kv_blocks: list,
        ple_BTG: jax.Array | None,
        implementation: str,
        self_mask: SelfMask | None = None,
    ) -> jax.Array:
        """The rest of the layer once its normed input ``h`` and the K/V it reads are known."""
        attn_BTNH = attend(self.attn.queries(h_BTD, *rope), kv_blocks, implementation, self_mask=self_mask)
        x_BTD = x_BTD + self.post_attn_norm(self.attn.output(attn_BTNH))
        return constrain_batch(self.feed_forward(x_BTD, ple_BTG))

    def feed_forward(self, x_BTD: jax.Array, ple_BTG: jax.Array | None) -> jax.Array:
        h_BTD = self.mlp(self.pre_ffw_norm(x_BTD))
        if self.moe is not None:
            experts_BTD = self.moe(self.pre_ffw_norm_2(x_BTD), x_BTD)
            h_BTD = self.post_ffw_norm_1(h_BTD) + self.post_ffw_norm_2(experts_BTD)
        x_BTD = x_BTD + self.post_ffw_norm(h_BTD)
        if self.ple_gate is not None:
            gate_BTG = gelu_tanh(jnp.einsum("BTD,DG->BTG", x_BTD, self.ple_gate[...].astype(x_BTD.dtype)))
            h_BTD = jnp.einsum("BTG,GD->BTD", gate_BTG * ple_BTG, self.ple_proj[...].astype(x_BTD.dtype))
            x_BTD = x_BTD + self.ple_norm(h_BTD)
        return x_BTD * self.layer_scalar[...].astype(x_BTD.dtype)


class Gemma4(nnx.Module):
    """A Gemma 4 text decoder (``Gemma4ForCausalLM``) with tied, sqrt(D)-scaled embeddings."""

    def __init__(self, config: Gemma4Config, *, rngs: nnx.Rngs):
        self.config = config
        width = config.hidden_size
        self.embed = param(rngs, (config.vocab_size, width), ("vocab", "embed"), scale=1.0)
        self.layers = nnx.List([DecoderLayer(config, i, rngs=rngs) for i in range(config.num_layers)])
        self.final_norm = RMSNorm(width, config.rms_norm_eps, axis_name="embed")
        self.ple_embed = nnx.data(None)
        if config.per_layer_input_dim:
            layers, dim = config.num_layers, config.per_layer_input_dim
            self.ple_embed = param(rngs, (config.per_layer_vocab_size, layers, dim), ("vocab", None, None), scale=1.0)
            self.ple_model_proj = param(rngs, (width, layers, dim), ("embed", None, None))
            self.ple_proj_norm = RMSNorm(dim, config.rms_norm_eps)

    def embed_tokens(self, tokens_BT: jax.Array) -> jax.Array:
        """The scaled input embedding; the scale is rounded to the table's dtype, as in transformers."""
        table = self.embed[...]
        return table[tokens_BT] * jnp.asarray(math.sqrt(self.config.hidden_size), table.dtype)

    def logits(
        self,
        hidden_BTD: Float[Array, "B T D"],
        embed_VD: jax.Array | None = None,
        *,
        head_DV: jax.Array | None = None,
    ) -> Float[Array, "B T V"]:
        """Float32 (or wider) logits: bf16 would round logits near ±30 in steps of 0.125 before any softmax.

        ``embed_VD``: the table, already fetched (training shares one gathered copy over its draft depths).
        ``head_DV``: the table transposed, [D, V], instead (same logits): XLA:CPU multiplies a few rows, e.g. the
        k + 1 tokens of a verification, by it about twice as fast as by the [V, D] table (one row: no faster).
        """
        if head_DV is None:  # a lazy transpose: XLA folds it into the product (the same HLO as contracting V D)
            head_DV = (self.embed[...] if embed_VD is None else embed_VD).T
        logits_BTV = jnp.einsum(
            "BTD,DV->BTV",
            hidden_BTD,
            head_DV.astype(hidden_BTD.dtype),
            preferred_element_type=jnp.promote_types(hidden_BTD.dtype, jnp.float32),
        )
        if (cap := self.config.final_logit_softcapping) is not None:
            logits_BTV = jnp.tanh(logits_BTV / cap) * cap
        return logits_BTV

    def per_layer_inputs(self, tokens_BT: jax.Array, x_BTD: jax.Array) -> jax.Array:
        """PLE: the per-layer token embedding mixed with a projection of the scaled input embedding."""
        dim, table = self.config.per_layer_input_dim, self.ple_embed[...]
        tok_BTLG = table[tokens_BT] * jnp.asarray(math.sqrt(dim), table.dtype)
        proj_BTLG = jnp.einsum("BTD,DLG->BTLG", x_BTD, self.ple_model_proj[...].astype(x_BTD.dtype))
        proj_BTLG = self.ple_proj_norm(proj_BTLG * self.config.hidden_size**-0.5)
        return (proj_BTLG + tok_BTLG.astype(x_BTD.dtype)) * 2**-0.5

    def scanned_layers(
        self,
        x_BTD: jax.Array,
        ple_BTLG: jax.Array | None,
        rope: dict,
        masks: dict,
        feature_layers: tuple[int, ...] = (),
        self_masks: dict[str, SelfMask] | None = None,
    ) -> tuple[jax.Array, dict[str, tuple[jax.Array, jax.Array]], jax.Array]:
        """The cache-less forward as one ``lax.scan`` per run of repeating layers (``layer_groups``).

        Each step picks its layers' parameters with ``lax.switch``, so the parameters keep their per-layer layout
        (checkpoints, sharding) while XLA compiles one period of layers and keeps one period's temporaries alive.
        Returns the final state, the K/V ``[B, K, T, H]`` of the last owning layer of each type (the producers) and
        the state after each of ``feature_layers`` ``[L, B, T, D]`` (kept in the carry: one state per chosen layer).
        ``self_masks``: each type's mask as structure too, for the splash kernel.
        """
        config = self.config
        batch, length, _ = x_BTD.shape
        kv = {
            t: (jnp.zeros((batch, config.kv_heads(t), length, config.head_dim_of(t)), x_BTD.dtype),) * 2
            for t in ATTENTION_TYPES
        }
        features_LBTD = jnp.zeros((len(feature_layers), *x_BTD.shape), x_BTD.dtype)
        for start, period, count in layer_groups(config):
            graphs = [nnx.split(self.layers[start + r])[0] for r in range(period)]
            states = [[nnx.split(self.layers[start + g * period + r])[1] for g in range(count)] for r in range(period)]
            ple_GBTPd = None
            if ple_BTLG is not None:
                ple_BTGPd = ple_BTLG[:, :, start : start + count * period].reshape(batch, length, count, period, -1)
                ple_GBTPd = jnp.moveaxis(ple_BTGPd, 2, 0)

            def one_period(carry, xs, start=start, period=period, count=count, graphs=graphs, states=states):
                x_BTD, kv, features_LBTD = carry
                g, ple_BTPd = xs
                for r in range(period):
                    i, layer_type = start + r, config.layer_types[start + r]
                    state = jax.lax.switch(g, [lambda s=s: s for s in states[r]])
                    layer = nnx.merge(graphs[r], state)
                    h_BTD = layer.input_norm(x_BTD)
                    if not config.shares_kv(i):
                        k_BTKH, v_BTKH = layer.attn.keys_values(h_BTD, *rope[layer_type])
                        kv = kv | {layer_type: (k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3))}
                    ple_BTG = None if ple_BTPd is None else ple_BTPd[:, :, r]
                    kv_blocks = [(*kv[layer_type], masks[layer_type])]
                    self_mask = None if self_masks is None else self_masks[layer_type]
                    x_BTD = layer.attend_and_feed(
                        x_BTD, h_BTD, rope[layer_type], kv_blocks, ple_BTG, config.attention_impl, self_mask
                    )
                    for f, chosen in enumerate(feature_layers):
                        if start <= chosen < start + count * period and (chosen - start) % period == r:
                            keep = g == (chosen - start) // period
                            features_LBTD = features_LBTD.at[f].set(jnp.where(keep, x_BTD, features_LBTD[f]))
                return (x_BTD, kv, features_LBTD), None

            (x_BTD, kv, features_LBTD), _ = jax.lax.scan(
                one_period, (x_BTD, kv, features_LBTD), (jnp.arange(count), ple_GBTPd)
            )
        return x_BTD, kv, features_LBTD

    def __call__(
        self,
        tokens_BT: Int[Array, "B T"],
        cache: KVCache | None = None,
        *,
        num_valid_B: Int[Array, " B"] | None = None,
        positions_BT: Int[Array, "B T"] | None = None,
        segments_BT: Int[Array, "B T"] | None = None,
        return_logits: bool = True,
        prefill: bool = False,
        feature_layers: tuple[int, ...] = (),
        dtype: jnp.dtype = jnp.float32,
    ) -> tuple[TargetOutput, KVCache | None]:
        """Runs T new tokens per row.

        With a cache: the tokens sit at positions ``cache.length + [0, T)``; the first ``num_valid_B`` of each row
        are written to the cache (ragged prefill: right-padded prompts), and the caller commits what it accepts.
        Without a cache: one causal forward over the sequence (``positions_BT`` and ``segments_BT`` for packed
        documents), returning every token's K/V for the drafter. ``prefill=True`` promises an empty cache: the
        tokens attend only to each other (no work, and nothing for XLA to constant-fold, on the empty cache).
        ``feature_layers`` (static): layers whose output (the residual stream) ``TargetOutput.features`` returns,
        from this same forward (EAGLE-style drafters fuse them).
        """
        config = self.config
        if bad := [i for i in feature_layers if not 0 <= i < config.num_layers]:
            raise ValueError(f"feature_layers {bad} are outside the target's {config.num_layers} layers.")
        batch, length = tokens_BT.shape
        index_T = jnp.arange(length, dtype=jnp.int32)
        if cache is not None:
            positions_BT = cache.length[:, None] + index_T
            limit = length if num_valid_B is None else num_valid_B[:, None]
            valid_BT = jnp.broadcast_to(index_T < limit, (batch, length))
        else:
            positions_BT = jnp.broadcast_to(index_T, (batch, length)) if positions_BT is None else positions_BT
            valid_BT = jnp.ones((batch, length), bool) if segments_BT is None else segments_BT > 0

        x_BTD = constrain_batch(self.embed_tokens(tokens_BT).astype(dtype))
        ple_BTLG = self.per_layer_inputs(tokens_BT, x_BTD) if self.ple_embed is not None else None
        rope, masks, slots, new_slot_positions = {}, {}, {}, {}
        for layer_type in ATTENTION_TYPES:
            head_dim = config.head_dim_of(layer_type)
            rope[layer_type] = rope_tables(positions_BT, rope_inv_freq(head_dim, config.rope(layer_type)), dtype)
            window = config.sliding_window if layer_type == SLIDING else None
            masks[layer_type] = [chunk_mask(positions_BT, valid_BT, segments_BT, window)]
            if cache is not None:
                slot_pos_BS = cache.slot_positions[layer_type]
                if not prefill:
                    masks[layer_type].insert(0, cache_mask(positions_BT, slot_pos_BS, cache.length, window))
                slots[layer_type] = cache_lib.write_slots(
                    positions_BT, valid_BT, slot_pos_BS.shape[1], ring=layer_type == SLIDING
                )
                new_slot_positions[layer_type] = cache_lib.scatter_BS(slot_pos_BS, positions_BT, slots[layer_type])

        blocks: dict[int, list[tuple[jax.Array, jax.Array]]] = {}
        new_keys, new_values, features = [], [], {}
        if cache is None:  # one pass over the sequence: the layers scanned, in groups of same-shaped layers
            windows = {t: config.sliding_window if t == SLIDING else None for t in ATTENTION_TYPES}
            x_BTD, producer_kv, features_LBTD = self.scanned_layers(
                x_BTD,
                ple_BTLG,
                rope,
                {t: m[0] for t, m in masks.items()},
                feature_layers,
                {t: SelfMask(segments_BT, w) for t, w in windows.items()},
            )
            features = dict(zip(feature_layers, features_LBTD, strict=True))
            blocks = {config.producer_layers[t]: [kv] for t, kv in producer_kv.items()}
        for i, layer in enumerate(self.layers if cache is not None else []):
            layer_type = config.layer_types[i]
            cos_BTH, sin_BTH = rope[layer_type]
            h_BTD = layer.input_norm(x_BTD)
            if not config.shares_kv(i):
                k_BTKH, v_BTKH = layer.attn.keys_values(h_BTD, cos_BTH, sin_BTH)
                kv = [(k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3))]
                if cache is not None:
                    c = len(new_keys)
                    if not prefill:
                        kv.insert(0, (cache.keys[c], cache.values[c]))
                    new_keys.append(cache_lib.scatter_BKSH(cache.keys[c], k_BTKH, slots[layer_type]))
                    new_values.append(cache_lib.scatter_BKSH(cache.values[c], v_BTKH, slots[layer_type]))
                blocks[i] = kv
            kv = blocks[config.kv_source(i)]
            kv_blocks = [(k, v, m) for (k, v), m in zip(kv, masks[layer_type], strict=True)]
            ple_BTG = None if ple_BTLG is None else ple_BTLG[:, :, i]
            x_BTD = layer.attend_and_feed(x_BTD, h_BTD, rope[layer_type], kv_blocks, ple_BTG, config.attention_impl)
            if i in feature_layers:
                features[i] = x_BTD

        hidden_BTD = self.final_norm(x_BTD)
        if cache is not None:
            cache = dataclasses.replace(
                cache, keys=tuple(new_keys), values=tuple(new_values), slot_positions=new_slot_positions
            )
        if cache is not None:
            drafter_kv = drafter_kv_from_cache(config, cache)
        else:
            token_positions_BT = jnp.where(valid_BT, positions_BT, -1)
            drafter_kv = {t: LayerKV(*blocks[i][-1], token_positions_BT) for t, i in config.producer_layers.items()}
        logits = self.logits(hidden_BTD) if return_logits else None
        features_BTLD = jnp.stack([features[i] for i in feature_layers], axis=2) if feature_layers else None
        return TargetOutput(logits=logits, hidden=hidden_BTD, drafter_kv=drafter_kv, features=features_BTLD), cache
