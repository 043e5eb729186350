"""The embedded tiny target: a 4-layer Gemma 4 causal LM pretrained on the embedded stdlib chat corpus.

    python -m mtp.training.tiny_target --config configs/tiny_target.py --workdir /tmp/mtp_cache

Writes a Gemma4ForCausalLM directory (config.json, model.safetensors, tokenizer.json, manifest.json) to
WORKDIR/tiny_target, once; ``configs/tiny.py`` gets it this way (in $MTP_CACHE or ~/.cache/mtp). Expected on 2 CPU
cores: 40-65 s (120 steps of 16 x 128 tokens at 0.25-0.45 s each, plus ~10 s of compiling), held-out loss 2.04
nats/token (chance: ln 512 = 6.24), bit-identical on every run. ``:test`` is the seconds-long variant the tests run.
"""

import ml_collections

SLIDING, FULL = "sliding_attention", "full_attention"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_train_steps = 120
    config.batch_size = 16
    config.seq_len = 128
    config.log_every_steps = 20
    config.eval_batches = 8  # covers the held-out split (~14k tokens) at batch 16 x 128
    # A real Gemma 4 shape in miniature (fields of mtp.target.Gemma4Config; the tiny tokenizer's 512 ids).
    config.model = ml_collections.ConfigDict(
        {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 512, "num_layers": 4, "num_heads": 4,
         "num_kv_heads": 1, "head_dim": 32, "global_head_dim": 64, "layer_types": (SLIDING, SLIDING, SLIDING, FULL),
         "sliding_window": 64, "final_logit_softcapping": 30.0}
    )  # fmt: skip
    # Tied embeddings: a small embedding makes the first logits ~0 (loss ln V) instead of sqrt(D)-scaled noise.
    config.embed_init_std = 0.02
    config.optimizer = ml_collections.ConfigDict(
        {"learning_rate": 6e-3, "warmup_steps": 12, "weight_decay": 0.01, "grad_clip": 1.0, "b1": 0.9, "b2": 0.95,
         "end_learning_rate_fraction": 0.1}
    )  # fmt: skip
    if arg == "test":
        config.update(num_train_steps=20, batch_size=4, seq_len=64, log_every_steps=5, eval_batches=2)
        config.optimizer.warmup_steps = 5
    config.lock()
    return config
