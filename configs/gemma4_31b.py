"""Distill a drafter for Gemma 4 31B from its own Hugging Face checkpoint, on your chat data.

    python train.py --config configs/gemma4_31b.py --workdir gs://.../gemma4_31b \
        --config.target.hf_path=/path/to/gemma-4-31B-it --config.data.train_files=/data/chats-*.jsonl

Drafter: 4 query-only layers over the target's K/V, width 1024, 32 heads, MLP 4096 (the issue's guidance for the
released assistants: 4 layers, 1024 wide for the large targets; the small-target width is our choice), centroid
head: False. Self-distillation (the target answers the prompts itself, ~+acceptance) is on. Sequence length
2048, global batch 64; bf16 compute. Start from Google's official assistant with
--config.drafter.init_from=/path/to/gemma-4-31B-it-assistant. Launching on a cluster: see README.
"""

from mtp.training.config import base_config, finalize


def get_config(arg: str | None = None):
    config = base_config()
    config.update(num_train_steps=20_000, batch_size=64, seq_len=2048, log_every_steps=50, eval_every_steps=1000,
                  checkpoint_every_steps=1000, compute_dtype="bfloat16")  # fmt: skip
    config.target.dtype = "bfloat16"
    config.drafter.update(num_layers=4, hidden_size=1024, num_heads=32, intermediate_size=4096,
                          use_ordered_embeddings=False, num_centroids=2048, centroid_intermediate_top_k=32)  # fmt: skip
    config.data.self_distill.update(enabled=True, temperature=0.0, max_new_tokens=1024, batch_size=64)
    config.loss.update(depth=4, chunk_size=256)
    config.optimizer.update(learning_rate=3e-4, warmup_steps=500)
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    return finalize(config)
