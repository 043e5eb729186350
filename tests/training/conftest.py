"""The embedded corpus and the test variant of the tiny target, built once per test session into a private cache."""

import os

import pytest


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    from mtp.embedded.target import default_config, ensure_tiny_target

    root = tmp_path_factory.mktemp("mtp_cache")
    previous = os.environ.get("MTP_CACHE")
    os.environ["MTP_CACHE"] = str(root)
    ensure_tiny_target(root, default_config("test"), name="test", progress=False)  # what configs/tiny.py:test uses
    yield root
    if previous is None:
        os.environ.pop("MTP_CACHE")
    else:
        os.environ["MTP_CACHE"] = previous
