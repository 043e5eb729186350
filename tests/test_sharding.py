"""The logical-axis rules: what a mesh axis cannot split is named in a warning, or refused when large."""

import logging

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from mtp import sharding
from mtp.gemma4.config import PRESETS, config_from_hf
from mtp.gemma4.model import Gemma4
from tests import hf_oracle


def abstract_target(config) -> nnx.State:
    return nnx.state(nnx.eval_shape(lambda: Gemma4(config, rngs=nnx.Rngs(0))))


def test_an_unsplit_dimension_is_named_once_per_kind(caplog):
    config = config_from_hf(hf_oracle.tiny_text_config_dict("e2b_like") | {"model_type": "gemma4_text"})
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    caplog.set_level(logging.WARNING, logger="mtp.sharding")
    shardings = sharding.state_shardings(abstract_target(config), mesh)
    # Three layers own K/V (k and v), with a single KV head each: one warning names the first, counts the rest.
    assert [r.getMessage() for r in caplog.records] == [
        "layers/0/attn/k [64, 1, 16]: kv_heads=1 is not divisible by mesh axis tensor=2, so every device along "
        "that mesh axis holds a full copy (and 5 more like it)."
    ]
    assert shardings["layers"][0]["attn"]["k"].spec == PartitionSpec("fsdp", None, None)
    assert shardings["embed"].spec == PartitionSpec("tensor", "fsdp")


def test_logical_spec_warns_for_a_named_array(caplog):
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    caplog.set_level(logging.WARNING, logger="mtp.sharding")
    spec = sharding.logical_spec((6, 3), ("embed", "heads"), mesh, name="w")
    assert spec == PartitionSpec(None, None)
    assert [r.getMessage() for r in caplog.records] == [
        "w [6, 3]: embed=6 is not divisible by mesh axis fsdp=4, heads=3 is not divisible by mesh axis tensor=2, "
        "so every device along that mesh axis holds a full copy."
    ]


def test_a_large_array_left_unsplit_is_refused():
    """A 262k-row vocabulary on a 3-way tensor axis would put the whole embedding table on every device."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:3]).reshape(1, 1, 3), sharding.MESH_AXES)
    state = abstract_target(PRESETS["gemma4_e2b"])
    with pytest.raises(ValueError, match=r"vocab=262144 is not divisible by mesh axis tensor=3.*MiB per device"):
        sharding.state_shardings(state, mesh)
    with pytest.raises(ValueError, match=r"an array \[262144, 1536\]: vocab=262144"):
        sharding.logical_spec((262144, 1536), ("vocab", "embed"), mesh)
    limit = 2 * 262144 * 1536 * 4
    assert sharding.logical_spec((262144, 1536), ("vocab", "embed"), mesh, max_replicated_bytes=limit) == (
        PartitionSpec(None, None)
    )
