"""DrafterConfig: fitting a target, validation messages, and the HF gemma4_assistant config round trip."""

import copy

import numpy as np
import pytest
from flax import nnx

from mtp.checkpoint.hf_drafter import drafter_layouts
from mtp.drafter.config import DrafterConfig, DrafterConfigError, config_from_hf, config_to_hf
from mtp.drafter.model import Drafter
from mtp.gemma4 import config as target_config_lib
from mtp.gemma4.config import RopeConfig
from tests import hf_oracle


def target_config(kind):
    return target_config_lib.config_from_hf({**hf_oracle.tiny_text_config_dict(kind), "model_type": "gemma4_text"})


def assistant_dict(kind, ordered):
    return {**copy.deepcopy(hf_oracle.tiny_assistant_config_dict(kind, ordered)), "model_type": "gemma4_assistant"}


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("kind", hf_oracle.TARGET_KINDS)
def test_for_target_builds_the_fixture_assistant(kind, ordered):
    """for_target reproduces the hand-written HF assistant config; our params match HF's tensors one to one."""
    fitted = DrafterConfig.for_target(
        target_config(kind),
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        final_logit_softcapping=30.0,
        use_ordered_embeddings=ordered,
        num_centroids=16,
        centroid_intermediate_top_k=4,
    )
    assert fitted == config_from_hf(assistant_dict(kind, ordered))
    assert config_from_hf(config_to_hf(fitted)) == fitted
    model = nnx.eval_shape(lambda: Drafter(fitted, rngs=nnx.Rngs(0)))
    ours = {path: v.get_value().shape for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert ours == {path: layout.shape for path, layout in drafter_layouts(fitted).items()}
    hf_state = hf_oracle.build_assistant(kind, ordered).state_dict()
    hf_tensors = {k: tuple(v.shape) for k, v in hf_state.items() if k != "lm_head.weight"}
    expected = {layout.key: layout.hf_shape for layout in drafter_layouts(fitted).values()}
    if ordered:
        expected["masked_embedding.token_ordering"] = (hf_oracle.VOCAB,)
    assert hf_tensors == expected


def test_hf_round_trip_keeps_unusual_values():
    config = DrafterConfig.for_target(target_config("keqv_like"), num_layers=3, layer_types=("full_attention",) * 3)
    config = config.replace(rope_sliding=RopeConfig(5_000.0, 0.5, 2.0), rope_full=RopeConfig(1e6, 0.25, 8.0))
    config = config.replace(rms_norm_eps=1e-5, final_logit_softcapping=None)
    assert config_from_hf(config_to_hf(config)) == config
    assert config_from_hf(config_to_hf(config), max_draft_len=3).max_draft_len == 3


MISMATCHES = {
    "backbone": (
        "dense",
        {"backbone_hidden_size": 48},
        "drafter backbone_hidden_size = 48 but target hidden_size = 64",
    ),
    "vocab": ("dense", {"vocab_size": 256}, "drafter vocab_size = 256 but target vocab_size = 512"),
    "window": ("dense", {"sliding_window": 16}, "drafter sliding_window = 16 but target sliding_window = 8"),
    "head_dim": ("dense", {"head_dim": 32}, "sliding_attention head dim = 32 but target layer 4 head dim = 16"),
    "global_head_dim": (
        "e2b_like",
        {"global_head_dim": 64},
        "full_attention head dim = 64 but target layer 2 head dim = 32",
    ),
    "kv_heads": ("dense", {"num_kv_heads": 1}, "sliding_attention KV heads = 1 but target layer 4 KV heads = 2"),
    "global_kv_heads": (
        "keqv_like",
        {"num_global_kv_heads": 2},
        "full_attention KV heads = 2 but target layer 5 KV heads = 1",
    ),
    "rope": (
        "dense",
        {"rope_full": RopeConfig(theta=10_000.0)},
        "full_attention RoPE = RopeConfig(theta=10000.0, rotary_fraction=1.0, factor=1.0) but target",
    ),
}


@pytest.mark.parametrize("case", MISMATCHES)
def test_mismatch_with_target_names_field_and_both_values(case):
    kind, change, message = MISMATCHES[case]
    target = target_config(kind)
    config = DrafterConfig.for_target(target).replace(**change)
    with pytest.raises(DrafterConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.validate_against(target)


def test_inconsistent_configs_are_rejected():
    base = DrafterConfig.for_target(target_config("dense"))
    with pytest.raises(DrafterConfigError, match="num_heads=3 is not a multiple of sliding_attention KV heads=2"):
        base.replace(num_heads=3)
    with pytest.raises(DrafterConfigError, match="vocab_size=512 is not a multiple of num_centroids=48"):
        base.replace(use_ordered_embeddings=True, num_centroids=48)
    with pytest.raises(DrafterConfigError, match="centroid_intermediate_top_k=32 must be in"):
        base.replace(use_ordered_embeddings=True, num_centroids=16)
    with pytest.raises(DrafterConfigError, match="last drafter layer must be full attention"):
        base.replace(layer_types=("full_attention",) * 3 + ("sliding_attention",))
    base.replace(num_centroids=48)  # the centroid options only matter with use_ordered_embeddings


HF_ERRORS = {
    "llama": (
        {"model_type": "llama"},
        r"x/config\.json: model_type is 'llama'; a Gemma 4 MTP drafter has model_type 'gemma4_assistant'",
    ),
    "target": ({"model_type": "gemma4"}, r"model_type is 'gemma4'.*targets"),
    "ple default": ({"text_config.hidden_size_per_layer_input": None}, "hidden_size_per_layer_input = 256"),
    "ple vocab": ({"text_config.vocab_size_per_layer_input": 512}, "vocab_size_per_layer_input = 512"),
    "moe": ({"text_config.enable_moe_block": True}, "enable_moe_block = True"),
    "double mlp": ({"text_config.use_double_wide_mlp": True}, "use_double_wide_mlp = True"),
    "shared": ({"text_config.num_kv_shared_layers": 2}, "num_kv_shared_layers = 2; every assistant layer"),
    "unknown key": ({"mystery": 1}, r"unsupported assistant config keys \['mystery'\]"),
    "untied": ({"tie_word_embeddings": False}, "tie_word_embeddings=False"),
    "text problem": ({"text_config.hidden_activation": "relu"}, "text_config: hidden_activation 'relu'"),
}


@pytest.mark.parametrize("case", HF_ERRORS)
def test_bad_hf_configs(case):
    change, message = HF_ERRORS[case]
    config = assistant_dict("dense", False)
    for key, value in change.items():
        node, *path = key.split(".")
        if path:
            if value is None:
                config[node].pop(path[0])
            else:
                config[node][path[0]] = value
        else:
            config[key] = value
    with pytest.raises(DrafterConfigError, match=message):
        config_from_hf(config, source="x/config.json")


def test_zero_shared_layers_means_all_shared():
    """transformers' assistant config turns num_kv_shared_layers=0 into all layers."""
    config = assistant_dict("dense", False)
    config["text_config"]["num_kv_shared_layers"] = 0
    assert config_from_hf(config) == config_from_hf(assistant_dict("dense", False))
    assert np.all(np.array(config_to_hf(config_from_hf(config))["text_config"]["num_kv_shared_layers"]) == 4)
