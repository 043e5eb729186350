"""The embedded target: a 12-layer Gemma 4 causal LM (11.7M parameters) pretrained on the embedded stdlib corpus.

    python -m mtp.embedded.target --config configs/tiny_target.py --workdir /tmp/mtp_cache

Pretrains it with the trainer that distills drafters (``mtp.training.trainer.fit``, objective ``NextToken``;
checkpoints in WORKDIR/.tiny_target.training, so a killed build resumes) and writes a Gemma4ForCausalLM directory
(config.json, model.safetensors, tokenizer.json, manifest.json) to WORKDIR/tiny_target, once; ``configs/tiny.py``
gets it this way (in $MTP_CACHE or ~/.cache/mtp). Its tokenizer is the embedded byte-level BPE of 4,096 ids (Gemma
4's control ids, trained on the corpus, shipped as an asset). The held-out loss and perplexity are logged and kept
in manifest.json. ``:test`` is the seconds-long variant the tests run.

The shape was chosen by measurement (``benchmarks/tiny_target_shapes.py``: random weights, batch 1, greedy, 64
new tokens, a 2-layer 64-wide drafter; one process, medians of interleaved repetitions, on a 2-core CPU under load
~5, so absolute figures are pessimistic). Speedup = plain ms/token × τ ÷ round ms at k = 4:

| target | params | train tok/s | decode ms/token | drafter ms/step | target/drafter | round k=4 ms | speedup τ 2.5/3 |
|---|---|---|---|---|---|---|---|
| 4L w128 V512 (the old one) | 1.1M | 1,356 | 0.55 | 0.56 | 1.0 | 2.47 | 0.55 / 0.66 |
| 12L w256 V4096 (this one) | 11.7M | 305 | 6.33 | 0.87 | 7.3 | 11.56 | 1.37 / 1.64 |
| 12L w256 V4096, trained (main job) | 11.7M | 540 | 7.3 | 0.69 (128 wide) | 10.6 | 14.6 | 1.38 at τ 3.29 |
| same, idle, decode changes (main job) | 11.7M | 1,022 | 3.5 | 0.2-0.4 (128 wide) | 9-17 | 6.3 | 1.74 at τ 3.69 |
| same, self-distilled drafter (main job) | 11.7M | 1,015 | 3.8 | 0.2-0.4 | 10-19 | 6.4-7.0 | 1.87 at τ 3.73 |

24 layers of width 256 (about 12 ms per token, a ratio near 14) compiled and trained too slowly to finish this
measurement under that load, and pretraining them would take about twice this target's 15 minutes; so the ratio of
16 the issue asked for is not reached on 2 cores within the job's budget. Verifying 2-5 tokens of the trained target
costs ~1.4 decode steps (4.9 vs 3.5 ms inside the decode loop, profiled with jax.profiler: XLA:CPU's YNNPACK
products for 5 rows cost about twice its one-row path per byte), which caps the speedup at about τ ÷ 1.4 before
the prefill and the drafter.
"""

import ml_collections

SLIDING, FULL = "sliding_attention", "full_attention"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_train_steps = 240
    config.batch_size = 16
    config.seq_len = 128
    config.log_every_steps = 10
    config.eval_every_steps = 240  # the held-out loss at the start and at the end
    config.eval_batches = 16  # 16 x 16 x 128 tokens of the held-out split
    # The trainer's other settings (mtp.training.trainer.fit, the loop that distills drafters): a killed build
    # resumes from its last checkpoint; one device, whatever the machine simulates; nothing logged to W&B.
    config.checkpoint_every_steps = 40
    config.keep_checkpoints = 1
    config.compute_dtype = "float32"
    config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
    config.wandb = ml_collections.ConfigDict({"mode": "disabled", "project": "", "group": "", "name": "", "tags": ()})
    # A real Gemma 4 shape in miniature (fields of mtp.gemma4.Gemma4Config): 5 sliding layers to 1 global.
    config.model = ml_collections.ConfigDict(
        {
            "vocab_size": 4096,
            "hidden_size": 256,
            "intermediate_size": 1024,
            "num_layers": 12,
            "num_heads": 4,
            "num_kv_heads": 1,
            "head_dim": 64,
            "global_head_dim": 128,
            "layer_types": ((SLIDING,) * 5 + (FULL,)) * 2,
            "sliding_window": 128,
            "final_logit_softcapping": 30.0,
        }
    )
    # Tied embeddings: a small embedding makes the first logits ~0 (loss ln V) instead of sqrt(D)-scaled noise.
    config.embed_init_std = 0.02
    config.optimizer = ml_collections.ConfigDict(
        {
            "learning_rate": 3e-3,
            "warmup_steps": 20,
            "weight_decay": 0.01,
            "grad_clip": 1.0,
            "b1": 0.9,
            "b2": 0.95,
            "end_learning_rate_fraction": 0.1,
        }
    )
    if arg == "test":
        config.update(
            num_train_steps=20, batch_size=4, seq_len=64, log_every_steps=5, eval_every_steps=20, eval_batches=2
        )
        config.checkpoint_every_steps = 10
        config.model.update(
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=2,
            head_dim=32,
            global_head_dim=32,
            layer_types=(SLIDING, FULL),
            sliding_window=32,
        )
        config.optimizer.update(learning_rate=1e-2, warmup_steps=5)
    config.lock()
    return config
