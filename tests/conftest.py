"""Test setup: 8 simulated CPU devices (set before jax is imported) and one torch thread."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # after the environment above, before anything imports jax


@pytest.fixture(scope="session")
def embedded_paths(tmp_path_factory):
    """The embedded corpus, built once per session."""
    from mtp.embedded import corpus

    return corpus.ensure_embedded_dataset(tmp_path_factory.mktemp("embedded"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from mtp.data.tokenizer import load_tokenizer
    from mtp.embedded import corpus

    return load_tokenizer(corpus.TOKENIZER_ASSET)


@pytest.fixture(scope="session")
def template(tiny_tokenizer):
    from mtp.data.chat import ChatTemplate

    return ChatTemplate(tiny_tokenizer)
