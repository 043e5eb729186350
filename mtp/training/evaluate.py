"""``evaluate(config, workdir)``: a trained drafter's held-out agreement and its real speculative decoding.

Writes ``workdir/eval/results.json`` (schema in ``mtp.evaluation.results``) and prints its table. The settings come
from ``config.evaluation`` where the config has one (``configs/tiny.py``), else from ``DEFAULTS``.
"""

from __future__ import annotations

import logging
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mtp.checkpoint import load_target
from mtp.checkpoint.hf_drafter import load_drafter
from mtp.evaluation import results
from mtp.evaluation.prompts import EMBEDDED_HELD_OUT, conversation_prompts
from mtp.evaluation.sweep import sweep
from mtp.training import setup
from mtp.training.config import loss_config
from mtp.training.loss import distill_loss, frozen_target, simulated_acceptance_length

log = logging.getLogger(__name__)

DEFAULTS = {"num_prompts": 64, "max_new_tokens": 96, "draft_lens": (1, 2, 3, 4)}


def settings(config: ml_collections.ConfigDict) -> dict:
    """``config.evaluation`` over ``DEFAULTS``."""
    own = config.evaluation.to_dict() if "evaluation" in config else {}
    return DEFAULTS | {k: v for k, v in own.items() if k in DEFAULTS}


def evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, progress: bool = True) -> dict:
    """Offline top-1 agreement per depth on held-out batches, then τ and speed from decoding held-out prompts."""
    workdir = pathlib.Path(workdir)
    options = settings(config)
    target_dir, drafter_dir = setup.target_directory(config, workdir), workdir / "hf"
    target = load_target(target_dir, dtype=jnp.dtype(config.target.dtype))
    drafter = load_drafter(drafter_dir, target_config=target.config, max_draft_len=config.drafter.max_draft_len)
    template = setup.chat_template(config, target_dir)
    _, held_out = setup.data_rows(config, workdir, target, template)
    dtype = jnp.dtype(config.compute_dtype)

    @nnx.jit
    def offline(drafter, target, batch):
        return distill_loss(drafter, target, frozen_target(target, batch, dtype), batch, loss_config(config), dtype)

    batches = setup.eval_batches(config, held_out, template)
    agreement = np.mean(jax.device_get([offline(drafter, target, b)[1]["top1_agreement"] for b in batches]), axis=0)
    prompt_set = EMBEDDED_HELD_OUT if config.data.embedded else "held_out"
    prompts = conversation_prompts(held_out, template, options["num_prompts"])
    draft_lens = [k for k in options["draft_lens"] if k <= drafter.config.max_draft_len]
    runs = sweep(
        target,
        drafter,
        prompts,
        draft_lens=draft_lens,
        max_new_tokens=options["max_new_tokens"],
        stop_tokens=template.stop_tokens,
        progress=progress,
    )
    records = results.records(prompt_set, prompts, runs)
    simulated = float(simulated_acceptance_length(jnp.asarray(agreement)))
    offline_summary = {"top1_agreement": agreement.tolist(), "simulated_acceptance_length": simulated}
    path = results.write(
        workdir / "eval" / "results.json",
        target=target_dir,
        drafter=drafter_dir,
        records_=records,
        offline=offline_summary,
    )
    log.info(
        "held-out top-1 agreement per depth %s (simulated τ %.2f); greedy, batch 1, %d prompts:\n%s\nwritten to %s",
        np.round(agreement, 3),
        simulated,
        len(prompts),
        results.table([r for r in records if r["category"] == results.ALL]),
        path,
    )
    results.check_greedy_outputs(records)
    return {"records": records, "offline": offline_summary, "path": str(path)}
