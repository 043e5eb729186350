"""What a run trains for: an objective turns the trained module, what it reads from a frozen model, and a batch into
a loss and its metrics. The jitted steps (``mtp.training.step``) and the trainer run every objective the same way.

An objective is a frozen dataclass with the two methods of ``Objective``, both traced inside the jitted step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from mtp.drafter.interface import DrafterFamily
from mtp.gemma4.model import Gemma4
from mtp.training.loss import LossConfig, distill_loss, frozen_target, simulated_acceptance_length


class Objective(Protocol):
    def context(self, frozen_state: nnx.State, batch: dict, module: nnx.Module) -> Any:
        """Whatever the loss reads from the frozen model (nothing for pretraining): once per step, no gradient."""

    def loss(self, module: nnx.Module, context: Any, batch: dict) -> tuple[jax.Array, dict]:
        """Differentiated with respect to the module's parameters; the metrics hold ``loss`` and ``trained_tokens``
        (the weight of the batch when metrics are averaged) and whatever else the objective reports."""


@dataclasses.dataclass(frozen=True)
class Distillation:
    """A drafter distilled from a frozen Gemma 4 target: the target's one forward is the context."""

    target_graph: nnx.GraphDef
    loss_config: LossConfig
    dtype: jnp.dtype = jnp.float32

    def context(self, target_state: nnx.State, batch: dict, drafter: DrafterFamily):
        target = nnx.merge(self.target_graph, target_state)
        return target, frozen_target(target, batch, self.dtype, drafter.feature_layers)

    def loss(self, drafter: DrafterFamily, context, batch: dict) -> tuple[jax.Array, dict]:
        target, target_out = context
        loss, metrics = distill_loss(drafter, target, target_out, batch, self.loss_config, self.dtype)
        return loss, {
            "loss": loss,
            "top1_agreement": metrics["top1_agreement"],
            "loss_per_depth": metrics["loss_per_depth"],
            "centroid_coverage": metrics["centroid_coverage"],
            "simulated_acceptance_length": simulated_acceptance_length(metrics["top1_agreement"]),
            "trained_tokens": jnp.sum(batch["loss_mask"]),
        }


@dataclasses.dataclass(frozen=True)
class NextToken:
    """Pretraining a Gemma 4 causal LM: mean next-token cross-entropy over every token that continues its own
    packed document (never a document's first token, never padding), whatever the chat loss mask says."""

    dtype: jnp.dtype = jnp.float32

    def context(self, frozen_state, batch: dict, model: Gemma4) -> None:
        return None

    def loss(self, model: Gemma4, context, batch: dict) -> tuple[jax.Array, dict]:
        del context
        out, _ = model(
            batch["tokens"], positions_BT=batch["positions"], segments_BT=batch["segment_ids"], dtype=self.dtype
        )
        logits_BTV = out.logits[:, :-1].astype(jnp.float32)
        segments_BT = batch["segment_ids"]
        mask_BT = (segments_BT[:, 1:] == segments_BT[:, :-1]) & (segments_BT[:, 1:] > 0)
        log_probs_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
        nll_BT = -jnp.take_along_axis(log_probs_BTV, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
        count = jnp.sum(mask_BT)
        loss = jnp.sum(nll_BT * mask_BT) / jnp.maximum(count, 1)
        return loss, {"loss": loss, "trained_tokens": count}
