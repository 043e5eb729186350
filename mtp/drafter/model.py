"""The Gemma 4 MTP drafter (HF ``Gemma4AssistantForCausalLM``) in Flax NNX: query-only layers over the target's K/V.

Letters beyond the package's: U the target's (backbone) width, I = 2U the pre-projection's input, J the chosen
centroid clusters, R the tokens per cluster (V / C), M the tokens of the chosen clusters (J * R).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from mtp.drafter.config import DrafterConfig
from mtp.drafter.interface import DepthOutput, Draft, DrafterFamily, UnrollInputs, checkpointed, wide
from mtp.gemma4.attention import attend
from mtp.gemma4.config import SLIDING
from mtp.gemma4.layers import RMSNorm, param, project, rope_inv_freq, rope_tables
from mtp.gemma4.model import DecoderLayer, Gemma4, LayerKV
from mtp.sharding import constrain_batch


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DrafterOutput:
    """Logits ``[B, T, V]`` (never soft-capped) and the projected state ``[B, T, U]`` fed to the next step."""

    logits_BTV: jax.Array
    projected_BTD: jax.Array


# The final-normed state ``[B, T, D]`` (the head's input) and the projected state ``[B, T, U]``.
DrafterFeatures = DepthOutput


class TokenOrdering(nnx.Variable):
    """Canonical token id of each slot of the cluster-ordered vocabulary: loaded, never trained by gradient."""


def target_kv_mask(
    positions_BT: Int[Array, "B T"],
    slot_positions_BS: Int[Array, "B S"],
    window: int | None,
    segments_BT: jax.Array | None = None,
    key_segments_BS: jax.Array | None = None,
) -> Bool[Array, "B T S"]:
    """Which target K/V slots a query at position p sees: committed slots 0 <= s < p, same segment, and on
    sliding layers p - s <= W + 1, i.e. the last W + 1 entries, as transformers' assistant does (its
    bidirectional window mask |q - k| <= W on the flipped K/V); the target itself sees W tokens, itself included.
    """
    q_pos, k_pos = positions_BT[:, :, None], slot_positions_BS[:, None, :]
    mask = (k_pos >= 0) & (k_pos < q_pos)
    if window is not None:
        mask &= q_pos - k_pos <= window + 1
    if segments_BT is not None:
        mask &= segments_BT[:, :, None] == key_segments_BS[:, None, :]
    return mask


class Drafter(DrafterFamily):
    """pre_projection -> query-only decoder layers over the target's K/V -> final norm -> (logits, projection)."""

    family = "gemma4"

    def __init__(self, config: DrafterConfig, *, rngs: nnx.Rngs):
        self.config = config
        width, backbone = config.hidden_size, config.backbone_hidden_size
        self.pre_projection = param(rngs, (2 * backbone, width), ("embed", "embed"))
        self.layers = nnx.List([DecoderLayer(config, i, rngs=rngs) for i in range(config.num_layers)])
        self.final_norm = RMSNorm(width, config.rms_norm_eps, axis_name="embed")
        self.post_projection = param(rngs, (width, backbone), ("embed", "embed"))
        # Tied with the head: unit-scale rows give O(1) logits from the unit-RMS final state.
        self.embed = param(rngs, (config.vocab_size, width), ("vocab", "embed"), scale=width**-0.5)
        self.centroids = nnx.data(None)
        self.token_ordering = nnx.data(None)
        if config.use_ordered_embeddings:
            self.centroids = param(rngs, (width, config.num_centroids), ("embed", None))
            self.token_ordering = TokenOrdering(jnp.arange(config.vocab_size, dtype=jnp.int32), axes=(None,))

    def __call__(
        self,
        token_embed_BTD: Float[Array, "B T U"],
        hidden_BTD: Float[Array, "B T U"],
        positions_BT: Int[Array, "B T"],
        target_kv: dict[str, LayerKV],
        *,
        segments_BT: Int[Array, "B T"] | None = None,
        key_segments_BS: Int[Array, "B S"] | None = None,
        dtype: jnp.dtype = jnp.float32,
    ) -> DrafterOutput:
        """One drafter forward for T queries (T=1 when decoding, a whole sequence when training).

        ``features`` and a head in one call; see ``features`` for the inputs.
        """
        out = self.features(
            token_embed_BTD,
            hidden_BTD,
            positions_BT,
            target_kv,
            segments_BT=segments_BT,
            key_segments_BS=key_segments_BS,
            dtype=dtype,
        )
        return DrafterOutput(logits_BTV=self.logits(out.normed), projected_BTD=out.projected)

    def features(
        self,
        token_embed_BTD: Float[Array, "B T U"],
        hidden_BTD: Float[Array, "B T U"],
        positions_BT: Int[Array, "B T"],
        target_kv: dict[str, LayerKV],
        *,
        segments_BT: Int[Array, "B T"] | None = None,
        key_segments_BS: Int[Array, "B S"] | None = None,
        dtype: jnp.dtype = jnp.float32,
        remat_layers: bool = False,
    ) -> DrafterFeatures:
        """Everything up to the head (training runs the vocabulary projection itself, in chunks).

        ``token_embed`` is the target's scaled embedding of each input token, ``hidden`` the target's last hidden
        state (or the previous draft step's projection), ``positions`` the query positions (RoPE on queries only,
        constant over the draft steps). ``target_kv`` holds the K/V of the target's producer layers; see
        ``target_kv_mask`` for what each query sees. With ``segments`` (packed sequences) a query sees only K/V
        slots of its own segment (``key_segments``). A query that sees no slot gets a zero attention output.
        ``remat_layers`` recomputes each layer in the backward pass instead of keeping its activations.
        """
        config = self.config
        if (segments_BT is None) != (key_segments_BS is None):
            raise ValueError("Pass both segments_BT and key_segments_BS (packed sequences) or neither.")
        x_BTI = jnp.concatenate([token_embed_BTD, hidden_BTD], axis=-1).astype(dtype)
        x_BTD = constrain_batch(project(x_BTI, self.pre_projection[...].astype(dtype)))
        rope, blocks, visible = {}, {}, {}
        for layer_type in config.attention_types:
            kv = target_kv[layer_type]
            head_dim, kv_heads = config.head_dim_of(layer_type), config.kv_heads(layer_type)
            if kv.keys.shape[1] != kv_heads or kv.keys.shape[3] != head_dim or kv.values.shape != kv.keys.shape:
                raise ValueError(
                    f"{layer_type} target K/V has keys {kv.keys.shape} and values {kv.values.shape}; the drafter "
                    f"expects [B, {kv_heads}, S, {head_dim}]."
                )
            rope[layer_type] = rope_tables(positions_BT, rope_inv_freq(head_dim, config.rope(layer_type)), dtype)
            window = config.sliding_window if layer_type == SLIDING else None
            mask_BTS = target_kv_mask(positions_BT, kv.positions, window, segments_BT, key_segments_BS)
            blocks[layer_type] = (kv.keys, kv.values, mask_BTS)
            visible[layer_type] = jnp.any(mask_BTS, axis=-1)[:, :, None, None]

        def one_layer(layer, layer_type, x_BTD):
            h_BTD = layer.input_norm(x_BTD)
            q_BTNH = layer.attn.queries(h_BTD, *rope[layer_type])
            attn_BTNH = jnp.where(visible[layer_type], attend(q_BTNH, [blocks[layer_type]], config.attention_impl), 0)
            x_BTD = x_BTD + layer.post_attn_norm(layer.attn.output(attn_BTNH))
            return constrain_batch(layer.feed_forward(x_BTD, None))

        for i, layer in enumerate(self.layers):
            if remat_layers:  # the backward pass keeps each layer's input only, and recomputes the rest
                graph, params = nnx.split(layer)
                rerun = functools.partial(
                    lambda g, t, p, x: one_layer(nnx.merge(g, p), t, x), graph, config.layer_types[i]
                )
                x_BTD = jax.checkpoint(rerun)(params, x_BTD)
            else:
                x_BTD = one_layer(layer, config.layer_types[i], x_BTD)

        h_BTD = self.final_norm(x_BTD)
        projected_BTU = project(h_BTD, self.post_projection[...].astype(dtype))
        return DrafterFeatures(normed=h_BTD, projected=projected_BTU)

    def logits(self, h_BTD: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        """The drafting head: the tied head, or the centroid-masked head when ``use_ordered_embeddings``."""
        if self.centroids is None:
            return self.full_logits(h_BTD)
        return self.masked_logits(h_BTD, self.embed[...].astype(h_BTD.dtype))

    def propose(self, target, token_B, anchor, position_B, target_kv, keys_PB, *, num_tokens, pick, dtype) -> Draft:
        """Recurrent steps at the constant query position: step j feeds ``(embed(tok_j), h_j)``, ``h_{j+1}`` its
        projected state; ``h_0`` is the target's last hidden state."""
        positions_B1 = position_B[:, None]

        def step(carry, keys_B):
            token_B, hidden_BU = carry
            out = self(target.embed_tokens(token_B[:, None]), hidden_BU[:, None], positions_B1, target_kv, dtype=dtype)
            logits_BV = out.logits_BTV[:, 0]
            next_B = pick(logits_BV, keys_B)
            return (next_B, out.projected_BTD[:, 0]), (next_B, logits_BV)

        _, (tokens_PB, logits_PBV) = jax.lax.scan(step, (token_B, anchor.hidden), keys_PB, length=num_tokens)
        return Draft(tokens_BP=tokens_PB.T, logits_BPV=jnp.swapaxes(logits_PBV, 0, 1))

    def unroll(self, target: Gemma4, inputs: UnrollInputs, *, dtype: jnp.dtype, remat: str) -> list[DepthOutput]:
        """Depth 0 reads (embed(x_p), h_{p-1}); depth j the embedding of x_{p+j} and depth j-1's projected state."""

        def features(drafter, embed_BTD, state_BTD):
            return drafter.features(
                embed_BTD,
                state_BTD,
                inputs.positions_BT,
                inputs.target_kv,
                segments_BT=inputs.segments_BT,
                key_segments_BS=inputs.key_segments_BS,
                dtype=dtype,
                remat_layers=remat == "layer",
            )

        run = checkpointed(self, features, remat == "depth")
        out, state_BTD = [], inputs.anchor.hidden
        for embed_BTD in inputs.embed_PBTD:
            out.append(run(embed_BTD, state_BTD))
            state_BTD = out[-1].projected
        return out

    def drafted_tokens(self, h_BTD: jax.Array, logits_BTV: jax.Array) -> jax.Array:
        """The tied head's argmax, or (centroid head) the argmax over the tokens of its top clusters, as
        ``masked_logits`` proposes them, from the full logits."""
        if self.centroids is None:
            return super().drafted_tokens(h_BTD, logits_BTV)
        batch, length, _ = h_BTD.shape
        _, top_BTJ = jax.lax.top_k(self.centroid_scores(h_BTD), self.config.centroid_intermediate_top_k)
        ids_BTM = self.token_ordering[...].reshape(self.config.num_centroids, -1)[top_BTJ].reshape(batch, length, -1)
        best_BT1 = jnp.argmax(jnp.take_along_axis(logits_BTV, ids_BTM, axis=-1), axis=-1, keepdims=True)
        return jnp.take_along_axis(ids_BTM, best_BT1, axis=-1)[..., 0]

    def head_clusters(self, h_BTD: jax.Array) -> tuple[jax.Array, jax.Array, int] | None:
        if self.centroids is None:
            return None
        return self.centroid_scores(h_BTD), self.token_ordering[...], self.config.centroid_intermediate_top_k

    def centroid_scores(self, h_BTD: Float[Array, "B T D"]) -> Float[Array, "B T C"]:
        return jnp.einsum("BTD,DC->BTC", h_BTD, self.centroids[...].astype(h_BTD.dtype))

    def masked_logits(self, h_BTD: jax.Array, embed_VD: jax.Array) -> jax.Array:
        """Scores of the tokens of the top-J centroid clusters; every other token gets (row's lowest score - 1).

        transformers fills with the batch-global lowest score - 1; the per-row fill keeps rows independent (and
        equals transformers' for one query). Only the drafter's logits change: the table stays in token order.
        The top-k choice carries no gradient, so the centroids learn only from a loss of their own; the gather is
        M x D per query, cheap when decoding but large for long training sequences.
        """
        config = self.config
        batch, length, _ = h_BTD.shape
        _, top_BTJ = jax.lax.top_k(self.centroid_scores(h_BTD), config.centroid_intermediate_top_k)
        ordering_CR = self.token_ordering[...].reshape(config.num_centroids, -1)
        ids_BTM = ordering_CR[top_BTJ].reshape(batch, length, -1)
        selected_BTM = jnp.einsum("BTD,BTMD->BTM", h_BTD, embed_VD[ids_BTM], preferred_element_type=wide(h_BTD))
        fill_BT1 = jnp.min(selected_BTM, axis=-1, keepdims=True) - 1
        logits_BTV = jnp.broadcast_to(fill_BT1, (batch, length, config.vocab_size))
        b_BTM = jnp.arange(batch)[:, None, None]
        t_BTM = jnp.arange(length)[None, :, None]
        return logits_BTV.at[b_BTM, t_BTM, ids_BTM].set(selected_BTM)
