"""The embedded default target: a tiny Gemma 4 causal LM pretrained on the embedded corpus, built once per machine.

``ensure_tiny_target(root)`` trains it (next-token cross-entropy on every token of the packed conversations: this
is the target's pretraining, not chat fine-tuning) and exports a Hugging Face ``Gemma4ForCausalLM`` directory
``root/tiny_target`` with the tiny tokenizer beside it. The manifest is written last and records the settings, so
a later call with the same settings returns at once and changed settings retrain. Hyper-parameters and training
settings come from ``configs/tiny_target.py``.

    python -m mtp.embedded.target --config configs/tiny_target.py --workdir DIR
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import pathlib
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from flax import nnx

from mtp.checkpoint.hf_export import config_to_hf, save_target
from mtp.data.chat import ChatTemplate
from mtp.data.pipeline import PipelineConfig, make_eval_batches, make_train_iterator
from mtp.data.sources import load_rows
from mtp.data.tokenizer import load_tokenizer
from mtp.embedded.corpus import EMBEDDED_TOKENIZER_ASSET, ensure_embedded_dataset
from mtp.embedded.corpus import VERSION as CORPUS_VERSION
from mtp.gemma4.config import Gemma4Config
from mtp.gemma4.model import Gemma4
from mtp.training.state import make_optimizer

log = logging.getLogger(__name__)

VERSION = 2  # bump when the recipe changes in a way the config does not show, so cached targets are rebuilt
DIRECTORY = "tiny_target"
MANIFEST = "manifest.json"
CONFIG_FILE = pathlib.Path(__file__).resolve().parents[2] / "configs" / "tiny_target.py"
Batch = dict[str, jax.Array]


def default_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``configs/tiny_target.py``'s ``get_config(arg)``."""
    if not CONFIG_FILE.is_file():
        raise FileNotFoundError(f"{CONFIG_FILE} is missing: the tiny target's settings live there (a source checkout).")
    spec = importlib.util.spec_from_file_location("_mtp_tiny_target_config", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def model_config(config: ml_collections.ConfigDict) -> Gemma4Config:
    fields = config.model.to_dict()
    return Gemma4Config(**(fields | {"layer_types": tuple(fields["layer_types"])}))


def init_model(config: ml_collections.ConfigDict) -> Gemma4:
    model = Gemma4(model_config(config), rngs=nnx.Rngs(config.seed))
    model.embed.set_value(model.embed[...] * config.embed_init_std)  # Gemma4's init draws it with std 1
    return model


def token_losses(model: Gemma4, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy over every token that continues its own document, and how many there are."""
    out, _ = model(batch["tokens"], positions_BT=batch["positions"], segments_BT=batch["segment_ids"])
    logits_BTV = out.logits[:, :-1]
    segments_BT = batch["segment_ids"]
    # A target in the same (real) document as its context: never a document's <bos>, never padding.
    mask_BT = (segments_BT[:, 1:] == segments_BT[:, :-1]) & (segments_BT[:, 1:] > 0)
    log_probs_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    nll_BT = -jnp.take_along_axis(log_probs_BTV, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll_BT * mask_BT), jnp.sum(mask_BT)


@nnx.jit
def train_step(model: Gemma4, optimizer: nnx.Optimizer, batch: Batch) -> jax.Array:
    def loss_fn(model):
        total, count = token_losses(model, batch)
        return total / jnp.maximum(count, 1)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_step(model: Gemma4, batch: Batch) -> tuple[jax.Array, jax.Array]:
    return token_losses(model, batch)


def evaluate(model: Gemma4, batches: list[dict[str, np.ndarray]]) -> float:
    """Mean held-out loss per token (nats)."""
    total, count = 0.0, 0
    for batch in batches:
        loss, n = eval_step(model, {k: jnp.asarray(v) for k, v in batch.items()})
        total, count = total + float(loss), count + int(n)
    return total / max(count, 1)


def train(config: ml_collections.ConfigDict, data_root: pathlib.Path, *, progress: bool = True) -> tuple[Gemma4, dict]:
    """The trained model and what happened: losses, eval loss before and after, seconds."""
    paths = ensure_embedded_dataset(data_root)
    template = ChatTemplate(load_tokenizer(paths.tokenizer))
    if template.tokenizer.get_vocab_size() > config.model.vocab_size:
        raise ValueError(
            f"{paths.tokenizer} has {template.tokenizer.get_vocab_size()} ids; the model has "
            f"vocab_size={config.model.vocab_size}."
        )
    pipeline = PipelineConfig(seq_len=config.seq_len, global_batch_size=config.batch_size, seed=config.seed)
    one_process = {"process_index": 0, "process_count": 1}  # the same model however many processes ask for it
    eval_batches = make_eval_batches(
        load_rows(str(paths.eval)), template, pipeline, num_batches=config.eval_batches, **one_process
    )
    model = init_model(config)
    tx, _ = make_optimizer(config)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    history = {"initial_eval_loss": evaluate(model, eval_batches), "train_loss": {}}
    log.info(
        "tiny target: %d steps of %d x %d tokens; eval loss at init %.3f (ln V = %.3f)",
        config.num_train_steps,
        config.batch_size,
        config.seq_len,
        history["initial_eval_loss"],
        math.log(config.model.vocab_size),
    )
    iterator = make_train_iterator(load_rows(str(paths.train)), template, pipeline, **one_process)
    bar = tqdm.tqdm(total=config.num_train_steps, desc="target", disable=not progress, dynamic_ncols=True)
    start, window = time.perf_counter(), []
    try:
        for step in range(1, config.num_train_steps + 1):
            batch = {k: jnp.asarray(v) for k, v in next(iterator).items()}
            window.append(train_step(model, optimizer, batch))
            bar.update()
            if step % config.log_every_steps == 0 or step == config.num_train_steps:
                loss = float(np.mean(jax.device_get(window)))
                if not math.isfinite(loss):
                    raise FloatingPointError(f"tiny target: loss {loss} at step {step}.")
                history["train_loss"][step] = loss
                tokens_per_second = step * config.batch_size * config.seq_len / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_second:.0f}")
                log.debug(
                    "tiny target step %d/%d: loss %.3f (%.1f s)",
                    step,
                    config.num_train_steps,
                    loss,
                    time.perf_counter() - start,
                )
                window = []
    finally:
        bar.close()
        iterator.close()
    history["train_seconds"] = time.perf_counter() - start
    history["train_tokens_per_second"] = (
        config.num_train_steps * config.batch_size * config.seq_len / history["train_seconds"]
    )
    history["eval_loss"] = evaluate(model, eval_batches)
    history["eval_perplexity"] = math.exp(history["eval_loss"])
    log.info(
        "tiny target: held-out loss %.3f nats/token (perplexity %.1f) after %.0f s of training (%.0f tokens/s)",
        history["eval_loss"],
        history["eval_perplexity"],
        history["train_seconds"],
        history["train_tokens_per_second"],
    )
    return model, history


def _recipe(config: ml_collections.ConfigDict) -> dict:
    """What the cached directory must have been built from: the recipe version and every setting."""
    tokenizer = hashlib.sha256(EMBEDDED_TOKENIZER_ASSET.read_bytes()).hexdigest()
    return {
        "version": VERSION,
        "corpus": CORPUS_VERSION,
        "tokenizer_sha256": tokenizer,
        "config": json.loads(config.to_json()),
    }


def _complete(directory: pathlib.Path, recipe: dict) -> bool:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # no manifest yet, or a foreign one
        return json.loads((directory / MANIFEST).read_text())["recipe"] == recipe
    return False


def ensure_tiny_target(
    root: str | os.PathLike,
    config: ml_collections.ConfigDict | None = None,
    *,
    steps: int | None = None,
    seed: int | None = None,
    name: str | None = None,
    progress: bool = True,
) -> pathlib.Path:
    """``root/tiny_target[_name]``, trained on ``root/data`` the first time (``steps`` / ``seed`` override the config).

    ``name`` (a config variant such as ``"test"``) keeps a variant's target apart from the default one.
    """
    root = pathlib.Path(root)
    config = ml_collections.ConfigDict(default_config() if config is None else config)  # the caller's stays as it is
    if steps is not None:
        config.num_train_steps = steps
    if seed is not None:
        config.seed = seed
    directory, recipe = root / (f"{DIRECTORY}_{name}" if name else DIRECTORY), _recipe(config)
    if _complete(directory, recipe):
        return directory
    log.info("tiny target: none in %s for these settings; training one", directory)
    model, history = train(config, root / "data", progress=progress)
    root.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=root, prefix=f".{directory.name}."))
    try:
        save_target(model, staging)
        shutil.copyfile(ensure_embedded_dataset(root / "data").tokenizer, staging / "tokenizer.json")
        manifest = {"recipe": recipe, "hf_config": config_to_hf(model.config), **history}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")  # last: marks the model complete
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except OSError:
        if not _complete(directory, recipe):  # a concurrent call may have put the same model there first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", str(CONFIG_FILE), "The tiny target's config file.")
    _WORKDIR = flags.DEFINE_string(
        "workdir", None, "The model goes to WORKDIR/tiny_target, the corpus to WORKDIR/data."
    )
    flags.mark_flags_as_required(["workdir"])

    def main(argv):
        del argv
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        print(ensure_tiny_target(_WORKDIR.value, _CONFIG.value))

    app.run(main)
