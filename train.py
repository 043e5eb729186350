"""Distill a drafter from a frozen Gemma 4 target: python train.py --config configs/tiny.py --workdir DIR."""

import json
import logging
import os
import pathlib

from absl import app, flags
from ml_collections import config_flags

from mtp.errors import reports_user_errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the exported drafter go here.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Also show the INFO logs of orbax, absl, grain and jax.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Only compile the train step from shapes; print its memory as JSON.")
flags.mark_flags_as_required(["config", "workdir"])


@reports_user_errors
def main(argv):
    del argv
    from mtp.logs import setup_logging

    setup_logging(verbose=_VERBOSE.value)  # first: some libraries log while being imported
    import jax

    if _DRY_RUN.value:  # no weights, no data, no workdir: what one device needs, as the last line
        from mtp.training.dry_run import dry_run

        path = config_flags.get_config_filename(flags.FLAGS["config"])
        print(json.dumps(dry_run(_CONFIG.value, pathlib.Path(path).stem)))
        return
    from mtp.training.run import run

    if os.environ.get("MTP_DISTRIBUTED"):
        jax.distributed.initialize()  # multi-host: reads the TPU / SLURM / JAX_* environment

    logging.info(
        "JAX %s: %d processes, %d devices (%s)",
        jax.__version__,
        jax.process_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
