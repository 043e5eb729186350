"""One interface for every drafter family: what it reads from the target, how it drafts, how training unrolls it.

The decode loop, the training loss and evaluation see only ``DrafterFamily``; nothing outside ``mtp.drafter``
branches on the family. Per round a drafter reads the ``Anchor`` (the target's state at the last committed
position: last hidden state and the residual stream after its ``feature_layers``), the newest token and the
target's committed K/V, and proposes P tokens. The state carried between rounds is the anchor itself, taken from
the verification forward at the last accepted position, so no family keeps a cache across rounds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from mtp.gemma4.layers import first_argmax
from mtp.gemma4.model import Gemma4, LayerKV, TargetOutput

# pick(logits_BV, keys_B or None) -> tokens_B: argmax, or one sample per row with the row's own key.
Pick = Callable[[jax.Array, jax.Array | None], jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Anchor:
    """The target at the position before the newest token: last hidden ``[..., D]``, chosen layers ``[..., L, D]``."""

    hidden: jax.Array
    features: jax.Array | None = None

    @classmethod
    def at(cls, out: TargetOutput, index_B: Int[Array, " B"]) -> Anchor:
        """Row b's state at position ``index_B[b]`` of a forward's output."""
        rows = jnp.arange(index_B.shape[0])
        features = None if out.features is None else out.features[rows, index_B]
        return cls(out.hidden[rows, index_B], features)

    def keep_where(self, keep_B: jax.Array, new: Anchor) -> Anchor:
        """This anchor on rows where ``keep_B``, else ``new``."""
        return jax.tree.map(lambda old, x: jnp.where(keep_B.reshape(-1, *[1] * (x.ndim - 1)), old, x), self, new)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Draft:
    """The drafted tokens ``[B, P]`` and the drafter's raw logits ``[B, P, V]`` at each step."""

    tokens_BP: jax.Array
    logits_BPV: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DepthOutput:
    """One depth of the training unroll: the head's input ``normed`` ``[B, T, E]`` and the state fed onwards."""

    normed: jax.Array
    projected: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UnrollInputs:
    """Teacher-forced inputs at every anchor p of a packed batch (T anchors, maybe a chunk of the sequence).

    ``embed_PBTD``: the target's scaled embedding of x_{p+j} for each depth j; ``anchor``: the target at p-1;
    ``target_kv`` and ``key_segments_BS`` span the whole sequence (a chunk's anchors still see every slot).
    """

    embed_PBTD: jax.Array
    anchor: Anchor
    positions_BT: jax.Array
    segments_BT: jax.Array
    target_kv: dict[str, LayerKV]
    key_segments_BS: jax.Array


def wide(x: jax.Array) -> jnp.dtype:
    """Logits accumulate in float32 (or wider): they feed a softmax, and bf16 rounds ±30 in steps of 0.125."""
    return jnp.promote_types(x.dtype, jnp.float32)


def checkpointed(module: nnx.Module, fn: Callable, remat: bool) -> Callable:
    """``fn(module, *args)`` as a function of ``args``; under ``jax.checkpoint`` (recomputed backwards) if ``remat``."""
    if not remat:
        return lambda *args: fn(module, *args)
    graph, state = nnx.split(module)
    rerun = jax.checkpoint(lambda state, *args: fn(nnx.merge(graph, state), *args))
    return lambda *args: rerun(state, *args)


class DrafterFamily(nnx.Module):
    """What every drafter provides; ``config`` has ``max_draft_len`` and ``validate_against(target_config)``."""

    family: ClassVar[str]
    config: Any

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Target layers whose output the drafter reads (``Gemma4(..., feature_layers=...)``), none by default."""
        return ()

    def propose(
        self,
        target: Gemma4,
        token_B: Int[Array, " B"],
        anchor: Anchor,
        position_B: Int[Array, " B"],
        target_kv: dict[str, LayerKV],
        keys_PB: jax.Array | None,
        *,
        num_tokens: int,
        pick: Pick,
        dtype: jnp.dtype,
    ) -> Draft:
        """``num_tokens`` drafts after ``token_B`` (at ``position_B``), each chosen by ``pick`` with ``keys_PB[j]``."""
        raise NotImplementedError

    def unroll(self, target: Gemma4, inputs: UnrollInputs, *, dtype: jnp.dtype, remat: str) -> list[DepthOutput]:
        """Depth j at every anchor p: the step that predicts x_{p+j+1}, exactly as ``propose`` runs it."""
        raise NotImplementedError

    def vocab_table(self, target: Gemma4) -> jax.Array:
        """The ``[V, E]`` table of the drafting head (its own, or the target's when tied to it)."""
        return self.embed[...]

    def full_logits(self, h_BTE: Float[Array, "B T E"], table_VE: jax.Array | None = None) -> jax.Array:
        """Logits over the whole vocabulary from the head's input (what the training loss compares)."""
        table_VE = self.embed[...] if table_VE is None else table_VE
        return jnp.einsum("BTE,VE->BTV", h_BTE, table_VE.astype(h_BTE.dtype), preferred_element_type=wide(h_BTE))

    def drafted_tokens(self, h_BTE: jax.Array, logits_BTV: jax.Array) -> jax.Array:
        """The greedy draft from the head's input and its full logits."""
        return first_argmax(logits_BTV)

    def head_clusters(self, h_BTE: jax.Array) -> tuple[jax.Array, jax.Array, int] | None:
        """A clustered head's (cluster scores ``[B, T, C]``, token ordering ``[V]``, clusters kept); None: plain."""
        return None


def make_pick(temperature: float, sample_logits: Callable[[jax.Array], jax.Array] | None) -> Pick:
    """Argmax at temperature 0, else a sample of ``softmax(sample_logits(logits))`` with each row's own key."""
    if temperature <= 0:
        return lambda logits_BV, keys_B: first_argmax(logits_BV)
    if sample_logits is None:
        sample_logits = lambda logits_BV: logits_BV.astype(jnp.float32) / temperature
    return lambda logits_BV, keys_B: jax.vmap(jax.random.categorical)(keys_B, sample_logits(logits_BV)).astype(
        jnp.int32
    )
