"""Distill a drafter for Gemma 4 31B from its own Hugging Face checkpoint, on your chat data.

    python train.py --config configs/gemma4_31b.py --workdir gs://.../gemma4_31b \
        --config.target.hf_path=/path/to/gemma-4-31B-it --config.data.train_files=/data/chats-*.jsonl

Drafter: 4 query-only layers over the target's K/V, width 1024, 32 heads, MLP 4096 (the issue's guidance for the
released assistants: 4 layers, 1024 wide for the large targets; the small-target width is our choice), centroid
head: False. Self-distillation (the target answers the prompts itself, ~+acceptance) is on, as is
the thought primer (this chat template opens model turns with an empty thought channel). Sequence length
2048, global batch 64; bf16 compute. Start from Google's official assistant with
--config.drafter.init_from=/path/to/gemma-4-31B-it-assistant. Launching on a cluster: see README.

Mesh: data=1, fsdp=-1 (every device one fsdp shard). Devices: 8 x H100 80 GB, or a TPU v5p-8 (95 GB per chip).
Check before renting: compile the step from shapes alone (no weights) and print its memory as JSON:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python train.py --config configs/gemma4_31b.py --workdir /tmp/dry --dry_run

On 8 devices XLA's estimate per device is 7.7 GiB arguments + 30.1 GiB temporaries = 37.8 GiB (budget 40 GiB;
tests/training/test_configs.py; XLA:CPU's figure, which upcasts bf16 arithmetic to float32, so a GPU/TPU needs less).
"""

from mtp.training.config import full_size_config


def get_config(arg: str | None = None):
    del arg
    config = full_size_config(
        preset="gemma4_31b", hidden_size=1024, num_heads=32, intermediate_size=4096, use_ordered_embeddings=False
    )
    config.data.thought_primer = True  # its chat template opens model turns with an empty thought channel
    return config
