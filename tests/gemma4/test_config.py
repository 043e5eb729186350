"""Full-size configs: shapes via jax.eval_shape only, parameter counts equal to transformers' on the meta device."""

import jax
import numpy as np
import pytest
from flax import nnx

from mtp.gemma4.config import FULL, PRESETS, ConfigError, Gemma4Config, config_from_hf
from mtp.gemma4.model import Gemma4
from tests import hf_oracle


def hf_text_config(config: Gemma4Config) -> dict:
    """The hub-form gemma4_text config.json of one of our configs."""
    out = dict(
        model_type="gemma4_text",
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        global_head_dim=config.global_head_dim,
        layer_types=list(config.layer_types),
        sliding_window=config.sliding_window,
        attention_k_eq_v=config.attention_k_eq_v,
        final_logit_softcapping=config.final_logit_softcapping,
        hidden_size_per_layer_input=config.per_layer_input_dim,
        vocab_size_per_layer_input=config.per_layer_vocab_size or config.vocab_size,
        num_kv_shared_layers=config.num_kv_shared_layers,
        use_double_wide_mlp=config.use_double_wide_mlp,
        eos_token_id=list(config.eos_token_ids),
    )
    if config.num_global_kv_heads:
        out["num_global_key_value_heads"] = config.num_global_kv_heads
    if config.enable_moe:
        out |= dict(
            enable_moe_block=True,
            num_experts=config.num_experts,
            top_k_experts=config.top_k_experts,
            moe_intermediate_size=config.moe_intermediate_size,
        )
    return out


def param_count(config: Gemma4Config) -> int:
    abstract = nnx.eval_shape(lambda: Gemma4(config, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_full_size_param_count_matches_transformers(name):
    config = PRESETS[name]
    ours = param_count(config)
    # layer_scalar is a persistent buffer in transformers and a (frozen) parameter here.
    hf_config = hf_text_config(config)
    theirs = hf_oracle.reference_param_count(hf_config) + hf_oracle.reference_buffer_count(hf_config)
    print(f"{name}: {ours / 1e9:.3f}B parameters")
    assert ours == theirs
    assert config_from_hf(hf_text_config(config)) == config


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="llama"), "model_type is 'llama'"),
        (dict(hidden_activation="silu"), "hidden_activation"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(use_bidirectional_attention="all"), "use_bidirectional_attention"),
        (dict(rope_parameters={FULL: {"rope_type": "yarn", "rope_theta": 1.0}}), "rope_type 'yarn'"),
        (dict(some_new_option=3), "some_new_option"),
        (dict(num_kv_shared_layers=35), "num_kv_shared_layers"),
    ],
)
def test_bad_configs_are_named(change, message):
    config = hf_text_config(PRESETS["gemma4_e2b"]) | change
    with pytest.raises(ConfigError, match=message):
        config_from_hf(config, source="dir/config.json")
