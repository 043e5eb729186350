"""Training the centroid-masked head: balanced clusters of the tied embedding, and a loss on the centroid scores.

At inference the head scores only the tokens of the top-J clusters, so what matters is that the target's next
token lies in those clusters (its coverage). Clusters must have exactly V / C tokens each (``token_ordering`` is
a [C, V / C] table), so they come from recursive median splits along the principal axis: balanced by
construction, deterministic, and cheap for a 262k vocabulary. The centroid scores are then trained with a
cross-entropy towards the cluster that holds the target's argmax token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def balanced_clusters(embed_VD: np.ndarray, num_clusters: int) -> np.ndarray:
    """A token ordering: ``ordering.reshape(C, V // C)[c]`` are the tokens of cluster c, similar rows together."""
    vocab = embed_VD.shape[0]
    if vocab % num_clusters:
        raise ValueError(f"vocab_size={vocab} is not divisible by num_centroids={num_clusters}.")
    if num_clusters & (num_clusters - 1):
        raise ValueError(f"num_centroids={num_clusters} must be a power of two for balanced median splits.")
    groups = [np.arange(vocab)]
    while len(groups) < num_clusters:
        split = []
        for group in groups:
            rows = embed_VD[group] - embed_VD[group].mean(axis=0)
            _, _, vt = np.linalg.svd(rows, full_matrices=False)
            order = group[np.argsort(rows @ vt[0], kind="stable")]
            split += [order[: len(order) // 2], order[len(order) // 2 :]]
        groups = split
    return np.concatenate(groups).astype(np.int32)


def cluster_means(embed_VD: np.ndarray, ordering: np.ndarray, num_clusters: int) -> np.ndarray:
    """Initial centroid projection ``[D, C]``: each cluster's mean embedding."""
    return embed_VD[ordering].reshape(num_clusters, -1, embed_VD.shape[1]).mean(axis=1).T


def centroid_loss(
    scores_BTC: jax.Array, teacher_top_BT: jax.Array, ordering_V: jax.Array, top_k: int, mask_BT: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Σ cross-entropy towards the cluster of the target's argmax token ``teacher_top_BT``, and Σ coverage (that
    cluster in the top-k)."""
    num_clusters = scores_BTC.shape[-1]
    cluster_of_token = (
        jnp.zeros_like(ordering_V)
        .at[ordering_V]
        .set(jnp.arange(ordering_V.shape[0], dtype=ordering_V.dtype) // (ordering_V.shape[0] // num_clusters))
    )
    wanted_BT = cluster_of_token[teacher_top_BT]
    log_probs = jax.nn.log_softmax(scores_BTC.astype(jnp.float32), axis=-1)
    nll_BT = -jnp.take_along_axis(log_probs, wanted_BT[..., None], axis=-1)[..., 0]
    _, top_BTK = jax.lax.top_k(scores_BTC, top_k)
    covered_BT = jnp.any(top_BTK == wanted_BT[..., None], axis=-1)
    mask = mask_BT.astype(jnp.float32)
    return jnp.sum(nll_BT * mask), jnp.sum(covered_BT * mask)
