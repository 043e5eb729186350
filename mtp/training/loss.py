"""The distillation loss: any drafter family unrolled K depths against a frozen target, exactly as at inference.

Anchor p (every position at once): the target has processed x_0..x_{p-1}; the newest token x_p is not yet in its
cache. Depth j predicts x_{p+j+1}, whose teacher distribution is the target's at position p+j; how the drafter
gets there is its family's ``unroll`` (``mtp.drafter.interface``): the Gemma 4 drafter reads (embed(x_{p+j}), its
own projected state) over the target's K/V at positions < p, Medusa's head j reads h_{p-1}, EAGLE-3 feeds its own
features back.

The teacher for (anchor p, depth j) is the target's distribution at position p+j: one [B, T, V] tensor for every
depth, shifted. Where it fits (``whole_teacher_bytes``) the target's vocabulary projection and softmax run once and
each depth's student logits are aligned to it; otherwise (full-size configs) both projections run per depth in
sequence chunks under remat, so [B, T, V] logits never exist for all depths at once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mtp.drafter.interface import Anchor, DepthOutput, DrafterFamily, UnrollInputs, wide
from mtp.gemma4.layers import first_argmax, transposed
from mtp.gemma4.model import Gemma4, TargetOutput
from mtp.sharding import constrain_replicated
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
    seq_chunk: int = 0  # anchors per chunk of the drafter's unroll and loss (0: the whole sequence at once)
    # The teacher's logits are computed once for all depths (not per depth in chunks) when seq_chunk is off and the
    # float32 [B, T, V] tensors that path holds, (2 * depth + 3) of them, take at most this many bytes (the traced,
    # global batch). 0: always per depth.
    whole_teacher_bytes: int = 1 << 30

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


def frozen_target(target: Gemma4, batch: dict, dtype: jnp.dtype, feature_layers: tuple[int, ...] = ()) -> TargetOutput:
    """The target's hidden states, drafter-facing K/V and (``feature_layers``: the drafter's) chosen layers' states
    for the whole packed sequence; never differentiated."""
    out, _ = target(
        batch["tokens"],
        positions_BT=batch["positions"],
        segments_BT=batch["segment_ids"],
        return_logits=False,
        feature_layers=tuple(feature_layers),
        dtype=dtype,
    )
    return jax.lax.stop_gradient(out)


@jax.custom_vjp
def cross_entropy(p_BTV: jax.Array, logits_BTV: jax.Array) -> jax.Array:
    """-Σ p log softmax(logits) per position, for p whose rows sum to 1 (a softmax); the backward rebuilds
    softmax(logits) from the logits, (softmax - p) · g, instead of storing log-softmax and running its backward."""
    return _cross_entropy_forward(p_BTV, logits_BTV)[0]


def _cross_entropy_forward(p_BTV, logits_BTV):
    s_BTV = logits_BTV.astype(jnp.promote_types(logits_BTV.dtype, jnp.float32))
    max_BT1 = jnp.max(s_BTV, axis=-1, keepdims=True)
    log_sum_BT = jnp.log(jnp.sum(jnp.exp(s_BTV - max_BT1), axis=-1))
    # Σ p (max - s) >= 0 rather than Σ p s: no cancellation against the log-sum-exp when the logits are large.
    loss_BT = log_sum_BT + jnp.sum(p_BTV * (max_BT1 - s_BTV), axis=-1)
    return loss_BT, (p_BTV, logits_BTV, max_BT1[..., 0] + log_sum_BT)


def _cross_entropy_backward(saved, grad_BT):
    p_BTV, logits_BTV, log_sum_exp_BT = saved
    log_q_BTV = logits_BTV.astype(log_sum_exp_BT.dtype) - log_sum_exp_BT[..., None]
    grad_logits = grad_BT[..., None] * (jnp.exp(log_q_BTV) - p_BTV)
    grad_p = -grad_BT[..., None] * log_q_BTV  # dead code (removed by XLA) wherever p is the frozen teacher's
    return grad_p.astype(p_BTV.dtype), grad_logits.astype(logits_BTV.dtype)


cross_entropy.defvjp(_cross_entropy_forward, _cross_entropy_backward)


def teacher_distribution(teacher_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The teacher's softmax p and its Σ p log p per position, one [B, T, V] tensor written."""
    t_BTV = teacher_logits.astype(jnp.float32)
    log_sum_exp_BT1 = jax.nn.logsumexp(t_BTV, axis=-1, keepdims=True)
    p_BTV = jnp.exp(t_BTV - log_sum_exp_BT1)
    return p_BTV, jnp.sum(p_BTV * (t_BTV - log_sum_exp_BT1), axis=-1)


def divergence(teacher_logits: jax.Array, student_logits: jax.Array, kind: str) -> jax.Array:
    """Per-position loss between the teacher's and the student's (full-vocabulary) distributions."""
    p, neg_entropy = teacher_distribution(teacher_logits)
    return divergence_from(p, neg_entropy, student_logits, kind)


def divergence_from(p_BTV: jax.Array, neg_entropy_BT: jax.Array, student_logits: jax.Array, kind: str) -> jax.Array:
    """``divergence`` given the teacher's ``teacher_distribution``."""
    if kind == "kl":
        return neg_entropy_BT + cross_entropy(p_BTV, student_logits)
    # total variation: 1 - Σ min(p, q) is the probability a sampled draft is rejected
    return 1.0 - jnp.sum(jnp.minimum(p_BTV, jax.nn.softmax(student_logits.astype(jnp.float32), axis=-1)), axis=-1)


def centroid_head_loss(
    drafter: DrafterFamily,
    h_BTD: jax.Array,
    teacher_BTV: jax.Array,
    mask_BT: jax.Array,
    teacher_top_BT: jax.Array | None = None,
):
    """Σ centroid loss and Σ coverage of the target's argmax (a plain head: nothing to learn, all covered).

    ``teacher_top_BT``: the teacher's argmax when already computed (else taken from ``teacher_BTV``).
    """
    clusters = drafter.head_clusters(h_BTD)
    if clusters is None:
        return jnp.zeros((), jnp.float32), jnp.sum(mask_BT.astype(jnp.float32))
    scores_BTC, ordering_V, top_k = clusters
    if teacher_top_BT is None:
        teacher_top_BT = first_argmax(teacher_BTV)
    return centroid_loss(scores_BTC, teacher_top_BT, ordering_V, top_k, mask_BT)


def chunked_depth_loss(
    target: Gemma4,
    drafter: DrafterFamily,
    teacher_h_PBTD,
    student_h_PBTE,
    mask_PBT,
    config: LossConfig,
    tables: tuple[jax.Array, jax.Array] | None = None,
):
    """Per depth P: Σ loss, Σ agreement, Σ centroid loss, Σ coverage over valid positions, the vocabulary projection
    chunk by chunk in one scan over (depth, chunk), so the backward pass holds one gradient of each table.

    ``tables``: the target's and the drafter's vocabulary tables, fetched once for every depth.
    """
    teacher_VD, student_VE = tables or (None, None)
    depth, batch, length = mask_PBT.shape
    chunk = min(config.chunk_size, length)
    pad = (-length) % chunk

    def split(x):  # [P, B, T, ...] -> [P * T/chunk, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
        x = x.reshape(depth, batch, -1, chunk, *x.shape[3:]).swapaxes(1, 2)
        return x.reshape(-1, batch, chunk, *x.shape[4:])

    @jax.checkpoint
    def one(carry, xs):
        teacher_h, student_h, mask, j = xs
        teacher = target.logits(teacher_h, teacher_VD)
        student = student_logits(drafter, student_h, student_VE)
        loss = divergence(teacher, student, config.divergence)
        top = first_argmax(teacher)
        agree = top == drafter.drafted_tokens(student_h, student)
        extra = centroid_head_loss(drafter, student_h, teacher, mask, top)
        mask = mask.astype(jnp.float32)
        sums = (jnp.sum(loss * mask), jnp.sum(agree * mask), extra[0], extra[1])
        at_j = jax.nn.one_hot(j, depth, dtype=jnp.float32)
        return jax.tree.map(lambda total, x: total + x * at_j, carry, sums), None

    zero = jnp.zeros((depth,), jnp.float32)
    depth_of = jnp.repeat(jnp.arange(depth), (length + pad) // chunk)
    xs = (split(teacher_h_PBTD), split(student_h_PBTE), split(mask_PBT), depth_of)
    sums, _ = jax.lax.scan(one, (zero, zero, zero, zero), xs)
    return sums


@jax.custom_vjp
def vocab_projection(h_BTE: jax.Array, table_VE: jax.Array) -> jax.Array:
    """``DrafterFamily.full_logits``'s plain head, with a backward pass that never transposes the [B, T, V] gradient."""
    return jnp.einsum("BTE,VE->BTV", h_BTE, table_VE.astype(h_BTE.dtype), preferred_element_type=wide(h_BTE))


def _projection_forward(h_BTE, table_VE):
    return vocab_projection(h_BTE, table_VE), (h_BTE, table_VE)


def _projection_backward(saved, grad_BTV):
    h_BTE, table_VE = saved
    grad_h = jnp.einsum("BTV,VE->BTE", grad_BTV, table_VE.astype(grad_BTV.dtype))
    # Contracting B, T as the major dimension of both operands: XLA:CPU would otherwise copy the gradient to [V, B T]
    # (measured: that copy alone took 14% of a tiny-pair train step).
    grad_table = transposed(jnp.einsum("BTE,BTV->EV", h_BTE.astype(grad_BTV.dtype), grad_BTV))
    return grad_h.astype(h_BTE.dtype), grad_table.astype(table_VE.dtype)


vocab_projection.defvjp(_projection_forward, _projection_backward)


def student_logits(drafter: DrafterFamily, h_BTE: jax.Array, table_VE: jax.Array) -> jax.Array:
    """The drafter's full logits; the plain head through ``vocab_projection``, a family's own head as it is."""
    if type(drafter).full_logits is DrafterFamily.full_logits and table_VE is not None:
        return vocab_projection(h_BTE, table_VE)
    return drafter.full_logits(h_BTE, table_VE)


def whole_sequence_depth_loss(
    target: Gemma4,
    drafter: DrafterFamily,
    teacher_h_BTD: jax.Array,
    student_h_PBTE: jax.Array,
    mask_PBT: jax.Array,
    config: LossConfig,
    tables: tuple[jax.Array, jax.Array],
):
    """``chunked_depth_loss``'s sums with the teacher's logits, softmax and argmax computed once at every position
    t (the distribution of x_{t+1}); depth j's student at anchor p is moved to t = p + j to meet it."""
    teacher_VD, student_VE = tables
    teacher_BTV = jax.lax.stop_gradient(target.logits(teacher_h_BTD, teacher_VD)).astype(jnp.float32)
    p_BTV, neg_entropy_BT = teacher_distribution(teacher_BTV)
    top_BT = first_argmax(teacher_BTV)
    sums = []
    for j in range(mask_PBT.shape[0]):
        student_h = shift(student_h_PBTE[j], -j)
        mask = shift(mask_PBT[j], -j, False)
        student = student_logits(drafter, student_h, student_VE)
        loss = divergence_from(p_BTV, neg_entropy_BT, student, config.divergence)
        agree = top_BT == drafter.drafted_tokens(student_h, student)
        extra = centroid_head_loss(drafter, student_h, teacher_BTV, mask, top_BT)
        mask = mask.astype(jnp.float32)
        sums.append((jnp.sum(loss * mask), jnp.sum(agree * mask), extra[0], extra[1]))
    return tuple(jnp.stack(x) for x in zip(*sums, strict=True))


def teacher_once(config: LossConfig, batch: int, length: int, vocab: int) -> bool:
    """Whether the teacher's [B, T, V] logits are computed once for all depths (else per depth, in chunks)."""
    held = (2 * config.depth + 3) * batch * length * vocab * 4
    return not config.seq_chunk and held <= config.whole_teacher_bytes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Depth:
    """One draft depth at every anchor p: the drafter's features, the teacher's state, and whether p is trained.

    ``teacher_hidden_BTD`` is the target's h_{p+j}, whose logits are the teacher for x_{p+j+1}; ``valid_BT`` says
    that x_{p+j+1} exists in p's document and is a trained (model-turn) token.
    """

    features: DepthOutput
    teacher_hidden_BTD: jax.Array
    valid_BT: jax.Array


def depth_inputs(
    target: Gemma4, target_out: TargetOutput, batch: dict, depth: int, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per depth j at every anchor p: the embedding of x_{p+j}, the teacher's h_{p+j}, whether x_{p+j+1} is trained;
    and the anchor (the target at p-1). Everything after this is independent per anchor, so it may run in chunks."""
    positions, segments = batch["positions"], batch["segment_ids"]
    loss_mask = batch["loss_mask"].astype(bool)
    anchor_ok = (positions > 0) & (segments > 0)  # depth 0 needs a previous position in the same document
    tokens_BTD = target.embed_tokens(batch["tokens"]).astype(dtype)
    embeds, teachers, valids = [], [], []
    for j in range(depth):
        same_doc = shift(segments, j) == segments
        # Predicting x_{p+j+1}: it must exist in this document and be a trained (model-turn) token.
        valids.append(anchor_ok & same_doc & (shift(segments, j + 1) == segments) & shift(loss_mask, j + 1, False))
        embeds.append(shift(tokens_BTD, j))  # = the embedding of x_{p+j} wherever depth j is trained
        teachers.append(shift(target_out.hidden, j))
    features = None if target_out.features is None else shift(target_out.features, -1)
    anchor = Anchor(shift(target_out.hidden, -1), features)
    return jnp.stack(embeds), jnp.stack(teachers), jnp.stack(valids), anchor


def check_features(drafter: DrafterFamily, target_out: TargetOutput) -> None:
    """The drafter's feature layers must come from the same forward (``frozen_target(..., feature_layers)``)."""
    wanted = len(drafter.feature_layers)
    got = 0 if target_out.features is None else target_out.features.shape[2]
    if wanted != got:
        raise ValueError(
            f"the {drafter.family} drafter reads target layers {drafter.feature_layers} but the target output holds "
            f"{got} feature layers; call frozen_target(target, batch, dtype, drafter.feature_layers)."
        )


def unroll(
    drafter: DrafterFamily,
    target: Gemma4,
    target_out: TargetOutput,
    batch: dict,
    depth: int,
    dtype: jnp.dtype = jnp.float32,
    remat: str = "none",
) -> list[Depth]:
    """The drafter's first ``depth`` draft steps at every anchor of a teacher-forced packed batch."""
    check_features(drafter, target_out)
    embed_PBTD, teacher_PBTD, valid_PBT, anchor = depth_inputs(target, target_out, batch, depth, dtype)
    segments = batch["segment_ids"]
    inputs = UnrollInputs(embed_PBTD, anchor, batch["positions"], segments, target_out.drafter_kv, segments)
    features = drafter.unroll(target, inputs, dtype=dtype, remat=remat)
    return [Depth(f, t, v) for f, t, v in zip(features, teacher_PBTD, valid_PBT, strict=True)]


def distill_loss(
    drafter: DrafterFamily,
    target: Gemma4,
    target_out: TargetOutput,
    batch: dict,
    config: LossConfig,
    dtype: jnp.dtype = jnp.float32,
) -> tuple[jax.Array, dict]:
    """Weighted loss over depths and metrics: per-depth top-1 agreement, loss, and centroid coverage.

    With ``seq_chunk``, anchors run in chunks of that many positions under remat: the drafter's activations and
    logits exist for one chunk at a time (every anchor reads only the target's K/V, never another anchor).
    """
    check_features(drafter, target_out)
    if config.depth > drafter.config.max_draft_len:
        raise ValueError(f"loss.depth={config.depth} > the drafter's max_draft_len={drafter.config.max_draft_len}.")
    # One gathered copy of each vocabulary table for every depth's projection (else XLA may hold one per depth).
    tables = (
        constrain_replicated(target.embed[...].astype(dtype)),
        constrain_replicated(drafter.vocab_table(target)),
    )
    embed_PBTD, teacher_PBTD, valid_PBT, anchor = depth_inputs(target, target_out, batch, config.depth, dtype)
    positions, segments = batch["positions"], batch["segment_ids"]
    length = positions.shape[1]
    chunk = config.seq_chunk if config.seq_chunk and length % config.seq_chunk == 0 else length

    def one_chunk(sums, xs):
        embed_PBtD, teacher_PBtD, valid_PBt, anchor_Bt, positions_Bt, segments_Bt = xs
        inputs = UnrollInputs(embed_PBtD, anchor_Bt, positions_Bt, segments_Bt, target_out.drafter_kv, segments)
        features = drafter.unroll(target, inputs, dtype=dtype, remat=config.remat)
        normed_PBtE = jnp.stack([f.normed for f in features])
        new = chunked_depth_loss(target, drafter, teacher_PBtD, normed_PBtE, valid_PBt, config, tables)
        return jax.tree.map(jnp.add, sums, new), None

    def split(x, axis):  # [..., T, ...] -> [T/chunk, ..., chunk, ...]
        x = x.reshape(*x.shape[:axis], length // chunk, chunk, *x.shape[axis + 1 :])
        return jnp.moveaxis(x, axis, 0)

    xs = (
        split(embed_PBTD, 2),
        split(teacher_PBTD, 2),
        split(valid_PBT, 2),
        jax.tree.map(lambda x: split(x, 1), anchor),
        split(positions, 1),
        split(segments, 1),
    )
    zero = jnp.zeros((config.depth,), jnp.float32)
    if teacher_once(config, positions.shape[0], length, tables[0].shape[0]):
        inputs = UnrollInputs(embed_PBTD, anchor, positions, segments, target_out.drafter_kv, segments)
        features = drafter.unroll(target, inputs, dtype=dtype, remat=config.remat)
        normed_PBTE = jnp.stack([f.normed for f in features])
        sums = whole_sequence_depth_loss(target, drafter, target_out.hidden, normed_PBTE, valid_PBT, config, tables)
        loss_P, agree_P, aux_P, cover_P = sums
    elif chunk == length:
        (loss_P, agree_P, aux_P, cover_P), _ = one_chunk((zero, zero, zero, zero), jax.tree.map(lambda x: x[0], xs))
    else:
        (loss_P, agree_P, aux_P, cover_P), _ = jax.lax.scan(jax.checkpoint(one_chunk), (zero,) * 4, xs)
    count_P = jnp.maximum(jnp.sum(valid_PBT, axis=(1, 2)), 1)
    weight_P = config.depth_decay ** jnp.arange(config.depth, dtype=jnp.float32)
    total = jnp.sum(weight_P * (loss_P + config.centroid_weight * aux_P) / count_P)
    metrics = {
        "loss_per_depth": loss_P / count_P,
        "top1_agreement": agree_P / count_P,
        "centroid_coverage": cover_P / count_P,
    }
    return total / jnp.sum(weight_P), metrics


def simulated_acceptance_length(top1_agreement: jax.Array) -> jax.Array:
    """Expected τ under greedy verification if depth j is accepted with its top-1 agreement rate:
    1 + Σ_j Π_{i<=j} a_i (the agreements are conditional on the earlier depths being right by construction:
    depth j is trained on the true prefix)."""
    return 1.0 + jnp.sum(jnp.cumprod(top1_agreement))
