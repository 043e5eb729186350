"""Medusa-1, EAGLE-3-style and Gemma 4 MTP drafters on the embedded default's target, matched in size and training.

    python -m mtp.training.compare --config configs/compare_tiny.py --workdir /tmp/mtp_compare

Every family: about 1.2M parameters (Gemma 4: 2 layers 128 wide; Medusa: 6 heads of 3 residual blocks on the
target's width 256; EAGLE-3: one 128-wide layer reading target layers 2, 5, 9), the same 100 steps of 8 x 128
tokens trained on 6 draft depths, then held-out prompts decoded at batch 1, k = 1..6, greedy and T = 0.7.
Writes WORKDIR/compare.md (the table in the README) and compare.json. ``:test`` is a seconds-long variant on the
2-layer test target.
"""

import ml_collections

from configs import tiny
from mtp.training.config import finalize

FAMILIES = ("gemma4", "medusa", "eagle3")


def get_config(arg: str | None = None):
    config = tiny.get_config(arg)
    config.unlock()
    config.num_train_steps = 100
    config.eval_every_steps = config.checkpoint_every_steps = 100
    config.drafter.max_draft_len = 6
    config.loss.depth = 6
    config.eval.update(
        draft_lens=(1, 2, 3, 4, 5, 6),
        temperatures=(0.0, 0.7),
        num_prompts=16,
        max_new_tokens=(64,),
        after_training=True,
    )
    shapes = {
        "gemma4": {"num_layers": 2, "hidden_size": 128, "num_heads": 4, "intermediate_size": 512},
        "medusa": {"num_layers": 3},
        "eagle3": {"num_layers": 1, "hidden_size": 128, "num_heads": 4, "intermediate_size": 1152},
    }
    if arg == "test":
        config.update(num_train_steps=4, log_every_steps=2, eval_every_steps=4, checkpoint_every_steps=4)
        config.drafter.max_draft_len = config.loss.depth = 2
        config.eval.update(draft_lens=(1, 2), num_prompts=2, max_new_tokens=(8,))
        shapes |= {
            "gemma4": {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64},
            "medusa": {"num_layers": 1},
            "eagle3": {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64},
        }
    config.compare = ml_collections.ConfigDict({"families": FAMILIES, **shapes})
    return finalize(config)
