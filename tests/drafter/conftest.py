"""Shared fixtures: one random HF target per kind and one random HF assistant per (kind, ordered), with ours."""

import functools

import numpy as np
import pytest
import torch

from mtp.checkpoint.hf_drafter import load_drafter
from mtp.gemma4.config import FULL, SLIDING
from mtp.gemma4.model import LayerKV
from tests import hf_oracle


@pytest.fixture(scope="session")
def targets(oracle_target):
    """kind -> (HF target, our target loaded from its checkpoint), built on first use (tests/conftest.py)."""
    return lambda kind: (oracle_target(kind)[0], oracle_target(kind)[2])


@pytest.fixture(scope="session")
def assistants(tmp_path_factory, targets):
    """(kind, ordered) -> (HF assistant, its checkpoint directory, our drafter loaded from it)."""

    @functools.cache
    def get(kind, ordered):
        hf_model = hf_oracle.build_assistant(kind, ordered, seed=2)
        path = tmp_path_factory.mktemp(f"assistant_{kind}_{ordered}")
        hf_oracle.save_assistant(hf_model, path)
        return hf_model, path, load_drafter(path, target_config=targets(kind)[1].config)

    return get


def token_ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, hf_oracle.VOCAB, (batch, length))


def hf_step_inputs(hf_target, ids: np.ndarray, position: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """A drafter step at ``position`` as HF's generator builds it: (scaled embedding, hidden, shared K/V < pos).

    The target runs over all of ``ids`` but the last token, so steps at different positions share one forward.
    """
    forward = hf_oracle.reference_forward(hf_target, ids[:, :-1])
    with torch.no_grad():
        embed = hf_target.model.embed_tokens(torch.as_tensor(ids[:, position : position + 1])).numpy()
    shared_kv = {
        t: (forward[f"{n}_k"][:, :, :position], forward[f"{n}_v"][:, :, :position])
        for t, n in ((SLIDING, "sliding"), (FULL, "full"))
    }
    return embed, forward["hidden"][:, position - 1 : position], shared_kv


def layer_kv(shared_kv: dict) -> dict[str, LayerKV]:
    """HF's shared K/V as our LayerKV, one slot per position."""
    out = {}
    for layer_type, (k, v) in shared_kv.items():
        batch, length = k.shape[0], k.shape[2]
        out[layer_type] = LayerKV(k, v, np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)))
    return out
