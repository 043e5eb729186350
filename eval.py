"""Evaluate a trained drafter (WORKDIR/hf): python eval.py --config configs/tiny.py --workdir DIR."""

import logging

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "The training config of the run.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir (holds hf/).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from mtp.training.evaluate import evaluate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
