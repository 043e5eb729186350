"""The keys every training config has; ``configs/*.py`` start from ``base_config()`` and change what they need."""

from __future__ import annotations

import ml_collections

from mtp.evaluation.config import eval_config
from mtp.training.loss import LossConfig


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_train_steps = 1000
    c.batch_size = 8
    c.seq_len = 512
    c.log_every_steps = 10
    c.eval_every_steps = 200
    c.eval_batches = 4
    c.checkpoint_every_steps = 200
    c.keep_checkpoints = 3
    # Train steps per compiled call (one lax.scan): on CPU each call maps its temporaries anew, so several steps per
    # call are faster (benchmarks/steps_per_call.py). Must divide num_train_steps and the log/eval/checkpoint periods.
    c.steps_per_call = 1
    c.compute_dtype = "float32"  # "bfloat16" for bf16 compute (params and optimizer state stay float32)
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})

    # The frozen target: a Hugging Face Gemma 4 directory, or (embedded_tiny) the tiny LM trained on the
    # embedded corpus the first time it is needed.
    # ``preset`` names the published shape (mtp.gemma4.config.PRESETS) that a dry run compiles without weights.
    c.target = ml_collections.ConfigDict({"hf_path": "", "embedded_tiny": False, "dtype": "float32", "preset": ""})
    c.drafter = ml_collections.ConfigDict(
        {
            "family": "gemma4",  # or "medusa", "eagle3" (mtp.drafter.families; those ignore the centroid keys)
            "init_from": "",  # a gemma4_assistant directory to start from (e.g. Google's official drafter)
            "num_layers": 4,
            "hidden_size": 256,
            "num_heads": 4,
            "intermediate_size": 1024,
            "max_draft_len": 8,
            "use_ordered_embeddings": False,
            "num_centroids": 2048,
            "centroid_intermediate_top_k": 32,
            "init_embed_from_target": True,
        }
    )
    c.data = ml_collections.ConfigDict(
        {
            "train_files": "",  # comma-separated paths / globs (.jsonl, .parquet, .txt) or a hub data set name
            "eval_files": "",
            "tokenizer": "",  # defaults to the target directory's tokenizer.json
            "embedded": False,  # the corpus made from this machine's Python standard library
            "thought_primer": False,  # model turns open with an empty thought channel (the 26B/31B templates)
            "num_workers": 0,
            "self_distill": ml_collections.ConfigDict(
                {"enabled": False, "temperature": 0.0, "max_new_tokens": 256, "batch_size": 16, "max_prompts": 0}
            ),
        }
    )
    c.loss = ml_collections.ConfigDict(
        {
            "depth": 4,
            "divergence": "kl",
            "depth_decay": 0.8,
            "chunk_size": 256,
            "centroid_weight": 1.0,
            "remat": "none",
            "seq_chunk": 0,
            # The teacher's softmax once for all depths while its [B, T, V] tensors fit in this many bytes.
            "whole_teacher_bytes": 1 << 30,
        }
    )
    c.optimizer = ml_collections.ConfigDict(
        {
            "learning_rate": 1e-3,
            "warmup_steps": 100,
            "weight_decay": 0.01,
            "grad_clip": 1.0,
            "b1": 0.9,
            "b2": 0.95,
            "end_learning_rate_fraction": 0.1,
        }
    )
    c.wandb = ml_collections.ConfigDict({"mode": "offline", "project": "", "group": "", "name": "", "tags": ()})
    c.eval = eval_config()  # what eval.py (and the main job at its end) measures
    return c


def full_size_config(
    *,
    preset: str,
    hidden_size: int,
    num_heads: int,
    intermediate_size: int,
    use_ordered_embeddings: bool,
    remat: str = "depth",
) -> ml_collections.ConfigDict:
    """What the released-target configs share: 4 drafter layers, 2048-token sequences, bf16, self-distillation,
    fully sharded over every device (the base mesh: data=1, fsdp=-1): weights and batch split as many ways."""
    config = base_config()
    config.target.preset = preset
    config.update(
        num_train_steps=20_000,
        batch_size=64,
        seq_len=2048,
        log_every_steps=50,
        eval_every_steps=1000,
        checkpoint_every_steps=1000,
        compute_dtype="bfloat16",
    )
    config.target.dtype = "bfloat16"
    config.drafter.update(
        num_layers=4,
        hidden_size=hidden_size,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        use_ordered_embeddings=use_ordered_embeddings,
        num_centroids=2048,
        centroid_intermediate_top_k=32,
    )
    config.data.self_distill.update(enabled=True, temperature=0.0, max_new_tokens=1024, batch_size=64)
    # Vocabulary chunks of 64 positions: [B, 64, V] float32 logits are 0.5 GiB per device at B=8, V=262k.
    # The drafter's unroll and loss in chunks of 256 anchors: one chunk's activations at a time.
    config.loss.update(depth=4, chunk_size=64, remat=remat, seq_chunk=256)
    config.optimizer.update(learning_rate=3e-4, warmup_steps=500)
    return finalize(config)


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Locks the config: an unknown ``--config.key`` then fails, naming the closest existing keys."""
    config.lock()
    return config


def loss_config(config: ml_collections.ConfigDict) -> LossConfig:
    return LossConfig(**config.loss.to_dict())
