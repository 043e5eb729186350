"""The embedded corpus and tiny target, built once per test session into a private cache (fewer target steps)."""

import os

import pytest


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    from mtp.training.tiny_target import ensure_tiny_target

    root = tmp_path_factory.mktemp("mtp_cache")
    previous = os.environ.get("MTP_CACHE")
    os.environ["MTP_CACHE"] = str(root)
    ensure_tiny_target(root, steps=60)
    yield root
    if previous is None:
        os.environ.pop("MTP_CACHE")
    else:
        os.environ["MTP_CACHE"] = previous
