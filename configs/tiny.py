"""The embedded default: a drafter distilled from a tiny Gemma 4 LM, all made on this machine.

    python train.py --config configs/tiny.py --workdir /tmp/mtp_tiny

The first run builds a chat corpus from this machine's Python standard library docstrings, trains the tiny
Gemma 4 target on it (about a minute; cached in $MTP_CACHE or ~/.cache/mtp), then distills a 2-layer drafter for
300 steps (a few minutes on 2 CPU cores). Expected: top-1 agreement at depth 0 rises from ~0 to well above 0.5 and
the simulated acceptance length from ~1.0 to ~2; the drafter lands in WORKDIR/hf as a gemma4_assistant checkpoint.
``--config=configs/tiny.py:test`` is the seconds-long variant the tests run.
"""

from mtp.training.config import base_config, finalize


def get_config(arg: str | None = None):
    config = base_config()
    config.target.embedded_tiny = True
    config.data.embedded = True
    config.num_train_steps = 300
    config.batch_size = 8
    config.seq_len = 128
    config.log_every_steps = 10
    config.eval_every_steps = 100
    config.checkpoint_every_steps = 100
    config.drafter.update(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=256, max_draft_len=4,
                          num_centroids=16, centroid_intermediate_top_k=4)  # fmt: skip
    config.loss.update(depth=3, chunk_size=64)
    config.optimizer.update(learning_rate=3e-3, warmup_steps=20)
    if arg == "test":
        config.update(num_train_steps=12, batch_size=4, seq_len=64, log_every_steps=2, eval_every_steps=6,
                      checkpoint_every_steps=4, eval_batches=2)  # fmt: skip
        config.mesh.fsdp = 1  # one device, whatever the machine simulates
    return finalize(config)
