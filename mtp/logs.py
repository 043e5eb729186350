"""Console logging for the entry points: mtp's own INFO lines, libraries' only from WARNING unless asked."""

from __future__ import annotations

import logging
import os

QUIET_LIBRARIES = ("absl", "orbax", "grain", "jax", "datasets", "wandb", "etils")


def setup_logging(*, verbose: bool = False) -> None:
    """mtp logs at INFO; orbax, absl, grain, jax, datasets and wandb at WARNING (and quiet) unless ``verbose``.

    Call it before importing the rest of mtp: some libraries log while being imported.
    """
    from absl import logging as absl_logging

    if not verbose:
        os.environ.setdefault("WANDB_SILENT", "true")  # wandb prints its run summary to the console otherwise
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        import datasets

        datasets.disable_progress_bars()  # "Generating train split" for every file it loads
