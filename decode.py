"""Speculative (or plain, draft_len=0) decoding: python decode.py --config configs/hf_pair.py [--config.k=v ...]."""

from absl import app, flags
from ml_collections import config_flags

from mtp.errors import reports_user_errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Decoding config file.", lock_config=True)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Also show the INFO logs of absl and jax.")


@reports_user_errors
def main(argv):
    del argv
    from mtp.logs import setup_logging

    setup_logging(verbose=_VERBOSE.value)  # first: some libraries log while being imported
    from mtp.decoding.cli import run_decode

    run_decode(_CONFIG.value)


if __name__ == "__main__":
    app.run(main)
