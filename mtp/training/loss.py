"""The distillation loss: the drafter unrolled K depths against a frozen target, exactly as at inference.

Anchor p (every position at once): the target has processed x_0..x_{p-1}; the newest token x_p is not yet in its
cache. Depth 0 reads (embed(x_p), h_{p-1}) at position p and attends to target K/V at positions < p; depth j reads
(embed(x_{p+j}), the drafter's own projected state from depth j-1) at the same position p and predicts x_{p+j+1},
whose teacher distribution is the target's at position p+j. The vocabulary projection runs in sequence chunks
under remat, so [B, T, V] logits never exist for all depths at once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mtp.drafter.model import DrafterFeatures
from mtp.target.model import Gemma4, TargetOutput
from mtp.training.centroids import centroid_loss

DIVERGENCES = ("kl", "tv")
# What the backward pass of the drafter's unroll keeps: everything, each layer's input, or each depth's input.
REMAT = ("none", "layer", "depth")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    depth: int = 4
    divergence: str = "kl"
    depth_decay: float = 0.8
    chunk_size: int = 128
    centroid_weight: float = 1.0
    remat: str = "none"

    def __post_init__(self):
        if self.remat not in REMAT:
            raise ValueError(f"loss.remat={self.remat!r}; choose one of {REMAT}.")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"loss.divergence={self.divergence!r}; choose one of {DIVERGENCES}.")
        if self.depth < 1:
            raise ValueError(f"loss.depth={self.depth}; train at least one draft depth.")


def shift(x_BT: jax.Array, offset: int, fill=0) -> jax.Array:
    """``y[:, t] = x[:, t + offset]`` (positive: look ahead; negative: look back), padded with ``fill``."""
    if offset == 0:
        return x_BT
    pad = jnp.full((x_BT.shape[0], abs(offset), *x_BT.shape[2:]), fill, x_BT.dtype)
    if offset > 0:
        return jnp.concatenate([x_BT[:, offset:], pad], axis=1)
    return jnp.concatenate([pad, x_BT[:, :offset]], axis=1)


def frozen_target(target: Gemma4, batch: dict, dtype: jnp.dtype) -> TargetOutput:
    """The target's hidden states and drafter-facing K/V for the whole packed sequence; never differentiated."""
    out, _ = target(
        batch["tokens"], positions_BT=batch["positions"], segments_BT=batch["segment_ids"], return_logits=False,
        dtype=dtype,
    )  # fmt: skip
    return jax.lax.stop_gradient(out)


def divergence(teacher_logits: jax.Array, student_logits: jax.Array, kind: str) -> jax.Array:
    """Per-position loss between the teacher's and the student's (full-vocabulary) distributions."""
    p = jax.nn.softmax(teacher_logits.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    if kind == "kl":
        log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
        loss = jnp.sum(p * (log_p - log_q), axis=-1)
    else:  # total variation: 1 - Σ min(p, q) is the probability a sampled draft is rejected
        loss = 1.0 - jnp.sum(jnp.minimum(p, jnp.exp(log_q)), axis=-1)
    return loss


def drafted_tokens(drafter: nnx.Module, h_BTD: jax.Array, logits_BTV: jax.Array) -> jax.Array:
    """The greedy draft of the head the drafter drafts with: the tied head's argmax, or (centroid head) the argmax
    over the tokens of its top clusters, as ``Drafter.masked_logits`` proposes them, from the full logits."""
    if drafter.centroids is None:
        return jnp.argmax(logits_BTV, axis=-1)
    batch, length, _ = h_BTD.shape
    _, top_BTJ = jax.lax.top_k(drafter.centroid_scores(h_BTD), drafter.config.centroid_intermediate_top_k)
    ids_BTM = drafter.token_ordering[...].reshape(drafter.config.num_centroids, -1)[top_BTJ].reshape(batch, length, -1)
    best_BT1 = jnp.argmax(jnp.take_along_axis(logits_BTV, ids_BTM, axis=-1), axis=-1, keepdims=True)
    return jnp.take_along_axis(ids_BTM, best_BT1, axis=-1)[..., 0]


def centroid_head_loss(drafter: nnx.Module, h_BTD: jax.Array, teacher_BTV: jax.Array, mask_BT: jax.Array):
    """Σ centroid loss and Σ coverage of the target's argmax (a plain head: nothing to learn, all covered)."""
    if drafter.centroids is None:
        return jnp.zeros((), jnp.float32), jnp.sum(mask_BT.astype(jnp.float32))
    top_k = drafter.config.centroid_intermediate_top_k
    return centroid_loss(drafter.centroid_scores(h_BTD), teacher_BTV, drafter.token_ordering[...], top_k, mask_BT)


def chunked_depth_loss(target: Gemma4, drafter: nnx.Module, teacher_h_BTD, student_h_BTE, mask_BT, config: LossConfig):
    """Σ loss, Σ agreement, Σ centroid coverage over valid positions, the vocab projection chunk by chunk."""
    batch, length = mask_BT.shape
    chunk = min(config.chunk_size, length)
    pad = (-length) % chunk

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(batch, -1, chunk, *x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def one(carry, xs):
        teacher_h, student_h, mask = xs
        teacher = target.logits(teacher_h)
        student = drafter.full_logits(student_h)
        loss = divergence(teacher, student, config.divergence)
        agree = jnp.argmax(teacher, axis=-1) == drafted_tokens(drafter, student_h, student)
        extra = centroid_head_loss(drafter, student_h, teacher, mask)
        mask = mask.astype(jnp.float32)
        sums = (jnp.sum(loss * mask), jnp.sum(agree * mask), extra[0], extra[1])
        return jax.tree.map(jnp.add, carry, sums), None

    zero = jnp.zeros((), jnp.float32)
    sums, _ = jax.lax.scan(one, (zero, zero, zero, zero), (split(teacher_h_BTD), split(student_h_BTE), split(mask_BT)))
    return sums


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Depth:
    """One draft depth at every anchor p: the drafter's features, the teacher's state, and whether p is trained.

    ``teacher_hidden_BTD`` is the target's h_{p+j}, whose logits are the teacher for x_{p+j+1}; ``valid_BT`` says
    that x_{p+j+1} exists in p's document and is a trained (model-turn) token.
    """

    features: DrafterFeatures
    teacher_hidden_BTD: jax.Array
    valid_BT: jax.Array


def unroll(drafter: nnx.Module, target: Gemma4, target_out: TargetOutput, batch: dict, depth: int,
           dtype: jnp.dtype = jnp.float32, remat: str = "none") -> list[Depth]:  # fmt: skip
    """The drafter's first ``depth`` draft steps at every anchor of a teacher-forced packed batch."""

    def features(drafter, embed_BTD, state_BTD, positions, kv, segments):
        return drafter.features(embed_BTD, state_BTD, positions, kv, segments_BT=segments, key_segments_BS=segments,
                                dtype=dtype, remat_layers=remat == "layer")  # fmt: skip

    if remat == "depth":  # the backward pass keeps each depth's inputs only, and recomputes the depth
        features = nnx.remat(features)
    tokens, positions, segments = batch["tokens"], batch["positions"], batch["segment_ids"]
    loss_mask = batch["loss_mask"].astype(bool)
    state_BTD = shift(target_out.hidden, -1)  # h_{p-1}: the state that produced x_p
    anchor_ok = (positions > 0) & (segments > 0)  # depth 0 needs a previous position in the same document
    depths = []
    for j in range(depth):
        same_doc = shift(segments, j) == segments
        # Predicting x_{p+j+1}: it must exist in this document and be a trained (model-turn) token.
        valid_BT = anchor_ok & same_doc & (shift(segments, j + 1) == segments) & shift(loss_mask, j + 1, False)
        embed_BTD = target.embed_tokens(shift(tokens, j)).astype(dtype)
        out = features(drafter, embed_BTD, state_BTD, positions, target_out.drafter_kv, segments)
        depths.append(Depth(out, shift(target_out.hidden, j), valid_BT))
        state_BTD = out.projected
    return depths


def distill_loss(drafter: nnx.Module, target: Gemma4, target_out: TargetOutput, batch: dict, config: LossConfig,
                 dtype: jnp.dtype = jnp.float32) -> tuple[jax.Array, dict]:  # fmt: skip
    """Weighted loss over depths and metrics: per-depth top-1 agreement, loss, and centroid coverage."""
    total, weight_sum = 0.0, 0.0
    metrics = {"loss_per_depth": [], "top1_agreement": [], "centroid_coverage": []}
    for j, d in enumerate(unroll(drafter, target, target_out, batch, config.depth, dtype, config.remat)):
        loss_sum, agree_sum, aux_sum, cover_sum = chunked_depth_loss(
            target, drafter, d.teacher_hidden_BTD, d.features.normed, d.valid_BT, config
        )
        count = jnp.maximum(jnp.sum(d.valid_BT), 1)
        weight = config.depth_decay**j
        total = total + weight * (loss_sum + config.centroid_weight * aux_sum) / count
        weight_sum += weight
        metrics["loss_per_depth"].append(loss_sum / count)
        metrics["top1_agreement"].append(agree_sum / count)
        metrics["centroid_coverage"].append(cover_sum / count)
    metrics = {k: jnp.stack(v) for k, v in metrics.items()}
    return total / weight_sum, metrics


def simulated_acceptance_length(top1_agreement: jax.Array) -> jax.Array:
    """Expected τ under greedy verification if depth j is accepted with its top-1 agreement rate:
    1 + Σ_j Π_{i<=j} a_i (the agreements are conditional on the earlier depths being right by construction:
    depth j is trained on the true prefix)."""
    return 1.0 + jnp.sum(jnp.cumprod(top1_agreement))
