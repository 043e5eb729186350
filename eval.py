"""Measure a drafter by real speculative decoding: python eval.py --config configs/tiny.py --workdir DIR.

A training run's drafter (DIR/hf) by default, or any gemma4_assistant directory against any Gemma 4 target:
--config.eval.drafter_path=D --config.eval.target_path=T --config.eval.output_dir=O. Sweeps, prompt sets and
categories: --config.eval.* (mtp/evaluation/config.py). Results merge into DIR/eval/results.json.
"""

from absl import app, flags
from ml_collections import config_flags

from mtp.errors import reports_user_errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "The training config of the run.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir (holds hf/); results go to WORKDIR/eval.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Also show the INFO logs of orbax, absl, grain and jax.")
flags.mark_flags_as_required(["config"])


@reports_user_errors
def main(argv):
    del argv
    from mtp.logs import setup_logging

    setup_logging(verbose=_VERBOSE.value)  # first: some libraries log while being imported
    from mtp.training.evaluate import evaluate

    evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
