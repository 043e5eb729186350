"""What a training run is built from: the target directory, the data, the drafter, the iterators."""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mtp.data.chat import ChatTemplate
from mtp.data.pipeline import PipelineConfig, make_eval_batches, make_train_iterator
from mtp.data.sources import load_rows
from mtp.data.tokenizer import load_tokenizer
from mtp.drafter.config import DrafterConfig
from mtp.drafter.families import SHAPE_KEYS as FAMILY_SHAPE
from mtp.drafter.families import build as build_family
from mtp.drafter.model import Drafter
from mtp.embedded.corpus import ensure_embedded_dataset
from mtp.gemma4.model import Gemma4
from mtp.multihost import host_value
from mtp.training.centroids import balanced_clusters, cluster_means

log = logging.getLogger(__name__)


def cache_root() -> pathlib.Path:
    """Where the embedded corpus and tiny target live (built once per machine): $MTP_CACHE or ~/.cache/mtp."""
    return pathlib.Path(os.environ.get("MTP_CACHE", pathlib.Path.home() / ".cache" / "mtp"))


def target_directory(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
    if config.target.hf_path:
        return pathlib.Path(config.target.hf_path)
    if config.target.embedded_tiny:
        from mtp.embedded.target import default_config, ensure_tiny_target

        variant = config.target.get("embedded_variant") or None
        return pathlib.Path(ensure_tiny_target(cache_root(), default_config(variant), name=variant))
    raise ValueError("Set --config.target.hf_path to a Hugging Face Gemma 4 directory (or target.embedded_tiny).")


def chat_template(config: ml_collections.ConfigDict, target_dir: pathlib.Path) -> ChatTemplate:
    """The target's chat template; ``data.thought_primer`` for targets whose template opens model turns with an
    empty thought channel (26B-A4B, 31B)."""
    return ChatTemplate(
        load_tokenizer(config.data.tokenizer or target_dir), thought_primer=config.data.get("thought_primer", False)
    )


class _Subset(Sequence):
    """Some rows of a data set, by index (the held-out split when no eval files are given)."""

    def __init__(self, rows: Sequence, indices: np.ndarray):
        self.rows, self.indices = rows, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.rows[int(self.indices[i])]


def data_rows(
    config: ml_collections.ConfigDict, workdir: os.PathLike, target: Gemma4, template: ChatTemplate, mesh=None
) -> tuple[Sequence, Sequence]:
    """Train and held-out rows; with self-distillation, the target's own answers to their prompts (decoded with
    each batch split over ``mesh``'s data-parallel devices)."""
    if config.data.embedded:
        paths = ensure_embedded_dataset(cache_root() / "data")
        train_files, eval_files = [str(paths.train)], [str(paths.eval)]
    else:
        if not config.data.train_files:
            raise ValueError("Set --config.data.train_files (JSONL / Parquet / text files or a hub name).")
        train_files = config.data.train_files.split(",")
        eval_files = config.data.eval_files.split(",") if config.data.eval_files else []
    train, held_out = load_rows(train_files), load_rows(eval_files) if eval_files else None
    if held_out is None:  # every 50th row is held out, deterministically
        index = np.arange(len(train))
        train, held_out = _Subset(train, index[index % 50 != 0]), _Subset(train, index[index % 50 == 0])
    sd = config.data.self_distill
    if sd.enabled:
        from mtp.data.self_distill import regenerate

        def regenerated(rows, name: str, max_prompts: int):
            path = regenerate(
                target,
                template,
                rows,
                workdir / "self_distill" / name,
                temperature=sd.temperature,
                max_new_tokens=sd.max_new_tokens,
                batch_size=sd.batch_size,
                max_prompts=max_prompts,
                seed=config.seed,
                mesh=mesh,
            )
            return load_rows([str(path)])

        # A prompt budget caps the held-out set in the same proportion: it only feeds the training-time eval loss.
        held_out_prompts = -(-sd.max_prompts * len(held_out) // max(len(train), 1)) if sd.max_prompts else 0
        train = regenerated(train, "train.jsonl", sd.max_prompts)
        held_out = regenerated(held_out, "eval.jsonl", held_out_prompts)
    return train, held_out


def pipeline_config(config: ml_collections.ConfigDict) -> PipelineConfig:
    return PipelineConfig(
        seq_len=config.seq_len,
        global_batch_size=config.batch_size,
        seed=config.seed,
        num_workers=config.data.num_workers,
    )


def train_iterator(config: ml_collections.ConfigDict, rows: Sequence, template: ChatTemplate):
    return make_train_iterator(rows, template, pipeline_config(config))


def eval_batches(config: ml_collections.ConfigDict, rows: Sequence, template: ChatTemplate) -> list[dict]:
    return make_eval_batches(rows, template, pipeline_config(config), num_batches=config.eval_batches)


def drafter_config_for(config: ml_collections.ConfigDict, target_config) -> DrafterConfig:
    d = config.drafter
    return DrafterConfig.for_target(
        target_config,
        num_layers=d.num_layers,
        hidden_size=d.hidden_size,
        num_heads=d.num_heads,
        intermediate_size=d.intermediate_size,
        max_draft_len=d.max_draft_len,
        use_ordered_embeddings=d.use_ordered_embeddings,
        num_centroids=d.num_centroids,
        centroid_intermediate_top_k=d.centroid_intermediate_top_k,
    )


def projected_embedding(target: Gemma4, width: int, seed: int) -> np.ndarray:
    """A random orthonormal projection of the target's embedding to ``width``, scaled to rows of RMS width**-0.5:
    similar tokens start with similar rows, which gives the centroid clusters meaning from step 0.

    Computed where the target's table lives (sharded across hosts on a cluster); only the drafter-sized result
    comes to the host.
    """
    table = target.embed.get_value()
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(table.shape[1], width)))

    @jax.jit
    def project(table_VD, q_DW):
        rows_VW = jnp.dot(table_VD.astype(jnp.float32), q_DW, precision=jax.lax.Precision.HIGHEST)
        return rows_VW * (width**-0.5 / jnp.sqrt(jnp.mean(rows_VW**2)))

    return host_value(project(table, q.astype(np.float32)))


def build_drafter(config: ml_collections.ConfigDict, target: Gemma4) -> Drafter:
    """A new drafter shaped by the config (head initialised from the target's embedding), or one loaded from HF."""
    d = config.drafter
    if d.family != "gemma4":  # the other families: mtp.drafter.families
        return build_family(d.family, target, **{k: d[k] for k in FAMILY_SHAPE}, seed=config.seed)
    if d.init_from:
        from mtp.checkpoint.hf_drafter import load_drafter

        return load_drafter(d.init_from, target_config=target.config, max_draft_len=d.max_draft_len)
    drafter_config = drafter_config_for(config, target.config)
    drafter = Drafter(drafter_config, rngs=nnx.Rngs(config.seed))
    if d.init_embed_from_target:
        rows = projected_embedding(target, drafter_config.hidden_size, config.seed)
        drafter.embed[...] = jnp.asarray(rows, drafter.embed[...].dtype)
    if drafter_config.use_ordered_embeddings:
        table = np.asarray(drafter.embed[...], np.float32)
        ordering = balanced_clusters(table, drafter_config.num_centroids)
        drafter.token_ordering[...] = jnp.asarray(ordering)
        drafter.centroids[...] = jnp.asarray(cluster_means(table, ordering, drafter_config.num_centroids))
    return drafter
