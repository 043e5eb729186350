"""Speculative decoding with a Gemma 4 target and an MTP drafter, both from Hugging Face directories.

    python decode.py --config configs/hf_pair.py --config.target.hf_path=DIR --config.drafter.hf_path=DIR \
        --config.prompt="Why is the sky blue?" --config.draft_len=4 --config.output=out.json

``draft_len=0`` is plain autoregressive decoding (the baseline; no drafter needed). Prompts come from
``prompts_file`` (JSONL, one ``{"token_ids": [...]}`` or ``{"text": "..."}`` per line; text goes through the
target's tokenizer and chat template) or ``prompt`` (one text prompt). Runs in seconds on the tiny checkpoints.
"""

import ml_collections

from mtp.data.tokenizer import GEMMA4_STOP_TOKENS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.target = ml_collections.ConfigDict({"hf_path": "", "dtype": "float32"})
    config.drafter = ml_collections.ConfigDict({"hf_path": ""})
    config.prompts_file = ""
    config.prompt = ""
    config.draft_len = 4
    config.temperature = 0.0
    config.top_k = 0
    config.top_p = 1.0
    config.max_new_tokens = 64
    config.batch_size = 1
    config.stop_tokens = GEMMA4_STOP_TOKENS
    config.max_cache_len = 0  # 0: sized from the longest prompt
    config.seed = 0
    config.output = ""
    config.lock()
    return config
