"""Evaluate a trained drafter (WORKDIR/hf): python eval.py --config configs/tiny.py --workdir DIR."""

from absl import app, flags
from ml_collections import config_flags

from mtp.errors import reports_user_errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "The training config of the run.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir (holds hf/); results go to WORKDIR/eval.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Also show the INFO logs of orbax, absl, grain and jax.")
flags.mark_flags_as_required(["config", "workdir"])


@reports_user_errors
def main(argv):
    del argv
    from mtp.logs import setup_logging

    setup_logging(verbose=_VERBOSE.value)  # first: some libraries log while being imported
    from mtp.training.evaluate import evaluate

    evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
