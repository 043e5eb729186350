"""The embedded default target: a tiny Gemma 4 causal LM pretrained on the embedded corpus, built once per machine.

``ensure_tiny_target(root)`` trains it with the trainer that distills drafters (``mtp.training.trainer.fit``, the
``NextToken`` objective: cross-entropy on every token of the packed conversations; this is the target's
pretraining, not chat fine-tuning) and exports a Hugging Face ``Gemma4ForCausalLM`` directory ``root/tiny_target``
with the tiny tokenizer beside it. The build checkpoints as it goes (``root/.tiny_target.training``), so a killed
build resumes. The manifest is written last and records the settings, so a later call with the same settings
returns at once and changed settings retrain. Hyper-parameters and training settings come from
``configs/tiny_target.py``.

    python -m mtp.embedded.target --config configs/tiny_target.py --workdir DIR
"""

from __future__ import annotations

import contextlib
import fcntl
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
from flax import nnx

from mtp.checkpoint.hf_export import config_to_hf, save_target
from mtp.data.chat import ChatTemplate
from mtp.data.pipeline import PipelineConfig, make_eval_batches, make_train_iterator
from mtp.data.sources import load_rows
from mtp.data.tokenizer import load_tokenizer
from mtp.embedded.corpus import EMBEDDED_TOKENIZER_ASSET, ensure_embedded_dataset
from mtp.embedded.corpus import VERSION as CORPUS_VERSION
from mtp.errors import UserError
from mtp.gemma4.config import Gemma4Config
from mtp.gemma4.model import Gemma4
from mtp.training.checkpoints import check_workdir, workdir_path
from mtp.training.objectives import NextToken
from mtp.training.trainer import fit, training_mesh

log = logging.getLogger(__name__)

VERSION = 3  # bump when the recipe changes in a way the config does not show, so cached targets are rebuilt
DIRECTORY = "tiny_target"
MANIFEST = "manifest.json"
RECIPE = "recipe.json"  # in the build's training workdir: the settings its checkpoints were made with
CONFIG_FILE = pathlib.Path(__file__).resolve().parents[2] / "configs" / "tiny_target.py"


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


def train(
    config: ml_collections.ConfigDict, data_root: pathlib.Path, workdir: pathlib.Path, *, progress: bool = True
) -> tuple[Gemma4, dict]:
    """The trained model and what happened (held-out loss before and after, the logged training losses, seconds),
    pretrained by the trainer (``mtp.training.trainer.fit``) in ``workdir``, which resumes an interrupted run."""
    if jax.process_count() > 1:
        raise UserError(
            f"the embedded tiny target is not built yet in {data_root.parent}, and this job runs "
            f"{jax.process_count()} processes: build it once in one process first, "
            f"python -m mtp.embedded.target --workdir {data_root.parent}"
        )
    paths = ensure_embedded_dataset(data_root)
    template = ChatTemplate(load_tokenizer(paths.tokenizer))
    if template.tokenizer.get_vocab_size() > config.model.vocab_size:
        raise ValueError(
            f"{paths.tokenizer} has {template.tokenizer.get_vocab_size()} ids; the model has "
            f"vocab_size={config.model.vocab_size}."
        )
    pipeline = PipelineConfig(seq_len=config.seq_len, global_batch_size=config.batch_size, seed=config.seed)
    eval_batches = make_eval_batches(load_rows(str(paths.eval)), template, pipeline, num_batches=config.eval_batches)
    log.info(
        "tiny target: %d steps of %d x %d tokens (ln V = %.3f nats at init)",
        config.num_train_steps,
        config.batch_size,
        config.seq_len,
        math.log(config.model.vocab_size),
    )
    workdir, mesh = workdir_path(workdir), training_mesh(config)
    check_workdir(workdir, config)
    start = time.perf_counter()
    model, _ = fit(
        config,
        workdir,
        init_model(config),
        NextToken(jnp.dtype(config.compute_dtype)),
        mesh=mesh,
        train_iter=make_train_iterator(load_rows(str(paths.train)), template, pipeline),
        eval_batches=eval_batches,
        eval_at_start=True,
        progress=progress,
        name="target",
    )
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line]
    train_loss = {r["step"]: r["loss"] for r in records if "loss" in r}
    history = {
        "initial_eval_loss": next(r["eval_loss"] for r in records if r["step"] == 0),
        "train_loss": train_loss,
        "eval_loss": records[-1]["eval_loss"],
        "eval_perplexity": math.exp(records[-1]["eval_loss"]),
        "train_tokens_per_second": float(np.median([r["tokens_per_second"] for r in records if "loss" in r])),
        "train_seconds": seconds,
    }
    if not math.isfinite(history["eval_loss"]):
        raise FloatingPointError(f"tiny target: held-out loss {history['eval_loss']} after training.")
    log.info(
        "tiny target: held-out loss %.3f nats/token (perplexity %.1f; %.3f at init) after %.0f s (median %.0f "
        "tokens/s)",
        history["eval_loss"],
        history["eval_perplexity"],
        history["initial_eval_loss"],
        seconds,
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


def _saved_recipe(path: pathlib.Path) -> dict | None:
    """The ``recipe`` a manifest or a training workdir's recipe.json records; None if missing or foreign."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return json.loads(path.read_text())["recipe"]
    return None


def _complete(directory: pathlib.Path, recipe: dict) -> bool:
    return _saved_recipe(directory / MANIFEST) == recipe


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
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):  # one builder at a time; the others then find it built
        if _complete(directory, recipe):
            return directory
        workdir = root / f".{directory.name}.training"  # the trainer's checkpoints: a killed build resumes
        if _saved_recipe(workdir / RECIPE) != recipe:
            shutil.rmtree(workdir, ignore_errors=True)  # left by other settings: they cannot be resumed
            workdir.mkdir()
            (workdir / RECIPE).write_text(json.dumps({"recipe": recipe}, indent=1) + "\n")
        else:
            log.info("tiny target: resuming the build in %s", workdir)
        log.info("tiny target: none in %s for these settings; training one", directory)
        model, history = train(config, root / "data", workdir, progress=progress)
        staging = pathlib.Path(tempfile.mkdtemp(dir=root, prefix=f".{directory.name}."))
        try:
            save_target(model, staging)
            shutil.copyfile(ensure_embedded_dataset(root / "data").tokenizer, staging / "tokenizer.json")
            manifest = {"recipe": recipe, "hf_config": config_to_hf(model.config), **history}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")  # last: marks the model complete
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(workdir)
    return directory


@contextlib.contextmanager
def _locked(directory: pathlib.Path):
    """An exclusive lock on ``directory`` for the block (released if the process dies): concurrent builds in one
    cache wait for each other instead of training side by side."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


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
