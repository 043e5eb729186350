"""Shared fixtures: the embedded corpus built once per session, and a template on the tiny tokenizer."""

import pytest

from mtp.data import embedded
from mtp.data.chat import ChatTemplate
from mtp.data.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def embedded_paths(tmp_path_factory):
    return embedded.ensure_embedded_dataset(tmp_path_factory.mktemp("embedded"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return load_tokenizer(embedded.TOKENIZER_ASSET)


@pytest.fixture(scope="session")
def template(tiny_tokenizer):
    return ChatTemplate(tiny_tokenizer)
