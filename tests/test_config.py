import pytest

from ep_runtime.config import load_config


@pytest.mark.parametrize("name,hidden,inter,experts,topk,limit", [
    ("deepseek_v4_pro", 7168, 3072, 384, 6, 10.0),
    ("deepseek_v4_flash", 4096, 2048, 256, 6, 10.0),
    ("deepseek_v3", 7168, 2048, 256, 8, None),
])
def test_public_model_configs_carry_the_spec_shapes(name, hidden, inter, experts, topk, limit):
    m = load_config(name).model
    assert (m.hidden_size, m.moe_intermediate_size, m.n_routed_experts, m.num_experts_per_tok, m.swiglu_limit) == \
        (hidden, inter, experts, topk, limit)


def test_v4_pro_on_eight_ranks_has_48_experts_per_rank():
    assert load_config("deepseek_v4_pro").experts_per_rank == 48


def test_overrides_apply_to_runtime_and_model():
    cfg = load_config("tiny", ["world_size=4", "runtime.act_mode=bf16", "model.swiglu_limit=null"])
    assert cfg.runtime.world_size == 4 and cfg.runtime.act_mode == "bf16" and cfg.model.swiglu_limit is None


def test_world_size_must_divide_the_experts():
    with pytest.raises(ValueError, match=r"runtime.world_size: must divide model.n_routed_experts=32, got 3"):
        load_config("tiny", ["world_size=3"])


def test_unknown_override_key_is_rejected():
    with pytest.raises(ValueError, match="unknown key 'wrld_size'"):
        load_config("tiny", ["wrld_size=4"])


def test_invalid_choice_names_the_field():
    with pytest.raises(ValueError, match="runtime.act_mode"):
        load_config("tiny", ["act_mode=fp8"])


def test_hidden_size_must_be_a_multiple_of_64():
    with pytest.raises(ValueError, match="model.hidden_size"):
        load_config("tiny", ["hidden_size=100"])


def test_unknown_config_name_lists_the_known_ones():
    with pytest.raises(FileNotFoundError, match="tiny"):
        load_config("no_such_model")
