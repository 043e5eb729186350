"""Every config loads; the full-size train steps lower and compile on an 8-device mesh from shapes alone."""

import importlib
import pathlib

import pytest

from mtp import sharding as sharding_lib
from mtp.target.config import PRESETS
from mtp.training.dry_run import compile_train_step
from tests.target.test_config import param_count

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parents[2] / "configs").glob("*.py"))
FULL_SIZE = {"gemma4_e2b": "gemma4_e2b", "gemma4_e4b": "gemma4_e4b", "gemma4_26b_a4b": "gemma4_26b_a4b",
             "gemma4_31b": "gemma4_31b"}  # fmt: skip


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.is_locked, "configs must be locked so unknown --config keys fail"
    with pytest.raises(AttributeError, match="Did you mean"):
        config.seedd = 1


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_train_step_compiles_on_8_devices(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    compiled = compile_train_step(config, PRESETS[FULL_SIZE[name]], mesh)
    memory = compiled.memory_analysis()
    print(f"{name}: per-device arguments {memory.argument_size_in_bytes / 2**30:.2f} GiB, temporaries "
          f"{memory.temp_size_in_bytes / 2**30:.2f} GiB (XLA:CPU estimate; batch {config.batch_size} x "
          f"{config.seq_len} on data=2, fsdp=4)")  # fmt: skip
    # The frozen target's bf16 parameters alone, split 4 ways: the arguments can be no smaller than that.
    assert memory.argument_size_in_bytes > 0.9 * 2 * param_count(PRESETS[FULL_SIZE[name]]) / 4
