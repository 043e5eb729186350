"""Every config loads; each full-size train step, compiled from shapes alone on 8 devices, fits its memory budget."""

import importlib
import json
import pathlib

import pytest

from mtp.gemma4.config import PRESETS
from tests.gemma4.test_config import param_count
from tests.training import dry_runs
from tests.training.dry_runs import BUDGET_GIB

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parents[2] / "configs").glob("*.py"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.is_locked, "configs must be locked so unknown --config keys fail"
    with pytest.raises(AttributeError, match="Did you mean"):
        config.seedd = 1


def test_the_thought_primer_is_on_where_the_target_template_opens_model_turns_with_it():
    """The 26B-A4B and 31B chat templates put an empty thought channel at the start of model turns; E2B/E4B's do not."""
    primed = {
        n
        for n in ("gemma4_e2b", "gemma4_e4b", "gemma4_26b_a4b", "gemma4_31b")
        if importlib.import_module(f"configs.{n}").get_config().data.thought_primer
    }
    assert primed == {"gemma4_26b_a4b", "gemma4_31b"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BUDGET_GIB))
def test_full_size_train_step_fits_its_budget_on_8_devices(name):
    """XLA:CPU's memory analysis of the compiled step, per device, from the user's command ``python train.py
    --config configs/NAME.py --workdir W --dry_run`` (global batch 64 x 2048, the mesh the config recommends),
    started in the background when the tests were collected (tests/training/dry_runs.py)."""
    result = dry_runs.start([name])[name].result()
    used = (result["argument_bytes"] + result["temp_bytes"]) / 2**30
    print(json.dumps(result))
    # The frozen target's bf16 parameters alone, split over the fsdp axis: the arguments can be no smaller.
    assert result["argument_bytes"] > 0.9 * 2 * param_count(PRESETS[name]) / result["mesh"]["fsdp"]
    assert (result["batch_size"], result["seq_len"], result["devices"]) == (64, 2048, 8)
    assert used <= BUDGET_GIB[name], f"{name}: {used:.1f} GiB per device, over its {BUDGET_GIB[name]} GiB budget"
