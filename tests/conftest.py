"""Test setup: 8 simulated CPU devices and the suite's code generation (tests/codegen.py), set before jax is
imported; one torch thread; the session's shared fixtures: the embedded corpus, the tiny test target, and one
finished run of configs/tiny.py:test."""

import functools
import gc
import os

import pytest

from tests.codegen import XLA_FLAGS

os.environ.setdefault("XLA_FLAGS", XLA_FLAGS)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Python's cyclic garbage collector, at its default thresholds, walks the suite's ever larger heap (jaxprs, compiled
# programs, torch models) about 5,400 times per 100 s of tests: 9.3 s of 97 s in tests/decoding/test_engine.py and
# test_lossless.py. Collecting after 50,000 new objects instead of 700 leaves 2.7 s, at the same peak memory.
gc.set_threshold(50_000, 20, 100)


def pytest_collection_finish(session):
    """The full-size dry runs start now, in the background, if any of their tests will run."""
    names = [
        item.callspec.params["name"]
        for item in session.items
        if item.name.startswith("test_full_size_train_step_fits_its_budget")
    ]
    if names:
        from tests.training import dry_runs

        dry_runs.start(names)


@pytest.fixture(scope="session")
def embedded_paths(embedded_cache):
    """The embedded corpus, built once per session (the one the test target was trained on)."""
    from mtp.embedded import corpus

    return corpus.ensure_embedded_dataset(embedded_cache / "data")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from mtp.data.tokenizer import load_tokenizer
    from mtp.embedded import corpus

    return load_tokenizer(corpus.TOKENIZER_ASSET)


@pytest.fixture(scope="session")
def template(tiny_tokenizer):
    from mtp.data.chat import ChatTemplate

    return ChatTemplate(tiny_tokenizer)


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """The embedded corpus and the test variant of the tiny target, built once per session into a private cache."""
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


@pytest.fixture(scope="session")
def tiny_run(embedded_cache, tmp_path_factory):
    """``train.py --config configs/tiny.py:test`` once per session (its evaluation included): (workdir, what
    ``run`` returned). Tests that change the workdir work on a copy."""
    from configs import tiny
    from mtp.training.run import run

    workdir = tmp_path_factory.mktemp("job") / "run"
    return workdir, run(tiny.get_config("test"), workdir, progress=False)


@pytest.fixture(scope="session")
def oracle_target(tmp_path_factory):
    """kind -> (random HF target of that kind (seed 1), its checkpoint directory, our target loaded from it), built
    on first use and shared by the oracle, drafter, engine and parity tests."""
    from mtp.checkpoint.hf_target import load_target
    from tests import hf_oracle

    @functools.cache
    def get(kind):
        hf_model = hf_oracle.build_target(kind, seed=1)
        path = tmp_path_factory.mktemp(f"target_{kind}")
        hf_oracle.save_target(hf_model, path)
        return hf_model, path, load_target(path)

    return get
