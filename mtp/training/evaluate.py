"""``evaluate(config, workdir)``: a trained drafter's held-out agreement and its real speculative decoding."""

from __future__ import annotations

import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mtp.checkpoint import load_target
from mtp.checkpoint.hf_drafter import load_drafter
from mtp.data.self_distill import prompts_of
from mtp.decoding.generate import summarize, timed_generate
from mtp.training import setup
from mtp.training.config import loss_config
from mtp.training.loss import distill_loss, frozen_target, simulated_acceptance_length

log = logging.getLogger(__name__)


def evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, num_prompts: int = 16,
             max_new_tokens: int = 64) -> dict:  # fmt: skip
    """Writes ``workdir/eval.json``: offline top-1 agreement per depth, then τ and speed from real decoding."""
    workdir = pathlib.Path(workdir)
    target_dir = setup.target_directory(config, workdir)
    target = load_target(target_dir, dtype=jnp.dtype(config.target.dtype))
    drafter = load_drafter(workdir / "hf", target_config=target.config, max_draft_len=config.drafter.max_draft_len)
    template = setup.chat_template(config, target_dir)
    _, held_out = setup.data_rows(config, workdir, target, template)
    dtype = jnp.dtype(config.compute_dtype)

    @nnx.jit
    def offline(drafter, target, batch):
        return distill_loss(drafter, target, frozen_target(target, batch, dtype), batch, loss_config(config), dtype)

    agreements = [offline(drafter, target, b)[1]["top1_agreement"] for b in setup.eval_batches(config, held_out,
                                                                                                 template)]  # fmt: skip
    agreement = np.mean(jax.device_get(agreements), axis=0)
    prompts = [template.prompt_ids(m) for m in prompts_of(held_out, num_prompts)]
    draft_len = min(config.loss.depth, drafter.config.max_draft_len)
    kwargs = dict(max_new_tokens=max_new_tokens, stop_tokens=template.stop_tokens)
    plain, plain_seconds = timed_generate(target, None, prompts, draft_len=0, **kwargs)
    spec, spec_seconds = timed_generate(target, drafter, prompts, draft_len=draft_len, **kwargs)
    if [o.token_ids for o in plain] != [o.token_ids for o in spec]:
        raise AssertionError("speculative greedy output differs from plain greedy output: please report this bug")
    result = {
        "top1_agreement": agreement.tolist(),
        "simulated_acceptance_length": float(simulated_acceptance_length(jnp.asarray(agreement))),
        "speculative": summarize(spec, draft_len, spec_seconds),
        "plain": summarize(plain, 0, plain_seconds),
        "speedup": plain_seconds / spec_seconds,
    }
    (workdir / "eval.json").write_text(json.dumps(result, indent=1))
    spec = result["speculative"]
    log.info("eval: top-1 agreement %s, τ %.3f (simulated %.3f), speedup %.2fx", np.round(agreement, 3),
             spec["acceptance_length"], result["simulated_acceptance_length"], result["speedup"])  # fmt: skip
    return result
