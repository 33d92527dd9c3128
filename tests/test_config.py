import re

import pytest

from ep_runtime.config import CONFIG_DIR, ModelConfig, load_config


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


@pytest.mark.parametrize("override,message", [
    ("act_mode=fp8", "runtime.act_mode: expected one of ('nvfp4', 'bf16'), got 'fp8'"),
    ("topk_method=bogus", "model.topk_method: expected one of ('noaux_tc', 'greedy'), got 'bogus'"),
])
def test_invalid_choice_names_the_field(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config("tiny", [override])


def test_hidden_size_must_be_a_multiple_of_64():
    with pytest.raises(ValueError, match="model.hidden_size"):
        load_config("tiny", ["hidden_size=100"])


def test_unknown_config_name_lists_the_known_ones():
    with pytest.raises(FileNotFoundError, match="tiny"):
        load_config("no_such_model")


@pytest.mark.parametrize("override,key", [
    ("max_tokens=2.5", "runtime.max_tokens"),
    ("max_tokens=1e3", "runtime.max_tokens"),  # 1e3 is a number, but not an integer
    ("world_size=2.0", "runtime.world_size"),
    ("tokens=1.5", "runtime.tokens"),
    ("iters=true", "runtime.iters"),
    ("seed=x", "runtime.seed"),
    ("barrier_timeout_s=abc", "runtime.barrier_timeout_s"),
    ("hidden_size=128.0", "model.hidden_size"),
    ("hidden_size=abc", "model.hidden_size"),
    ("name=7", "model.name"),
])
def test_a_value_of_the_wrong_type_names_the_key(override, key):
    with pytest.raises(ValueError, match=rf"{re.escape(key)}: expected (an integer|a number|a string), got .* \(\w+\)"):
        load_config("tiny", [override])


@pytest.mark.parametrize("override,key,value", [
    ("barrier_timeout_s=.inf", "runtime.barrier_timeout_s", "inf"),
    ("routed_scaling_factor=.nan", "model.routed_scaling_factor", "nan"),
])
def test_a_non_finite_number_is_rejected_naming_the_key(override, key, value):
    with pytest.raises(ValueError, match=rf"{re.escape(key)}: expected a finite number, got {value}"):
        load_config("tiny", [override])


@pytest.mark.parametrize("value,got", [("1", "1 (int)"), ("yes please", "'yes please' (str)")])
def test_a_flag_takes_true_or_false_only(value, got):
    with pytest.raises(ValueError, match=rf"runtime\.expert_load: expected true or false, got {re.escape(got)}"):
        load_config("tiny", [f"expert_load={value}"])


def test_a_flag_is_set_by_true():
    assert load_config("tiny", ["expert_load=true"]).runtime.expert_load is True


@pytest.mark.parametrize("text,value", [("1e3", 1000.0), ("25e-1", 2.5), (".5E+1", 5.0)])
def test_numbers_in_exponent_notation_are_numbers(text, value, tmp_path):
    # YAML 1.1 (PyYAML) would read the first two as strings
    assert load_config("tiny", [f"routed_scaling_factor={text}"]).model.routed_scaling_factor == value
    f = tmp_path / "c.yaml"
    f.write_text((CONFIG_DIR / "tiny.yaml").read_text().replace("routed_scaling_factor: 2.5",
                                                                f"routed_scaling_factor: {text}"))
    assert load_config(str(f)).model.routed_scaling_factor == value


def test_a_layers_config_may_hold_fewer_tokens_than_the_main_jobs_default():
    assert load_config("tiny", ["max_tokens=16"]).runtime.max_tokens == 16


def test_a_value_of_the_wrong_type_reports_the_value_and_its_type():
    with pytest.raises(ValueError, match=r"runtime\.max_tokens: expected an integer, got 2\.5 \(float\)"):
        load_config("tiny", ["max_tokens=2.5", "tokens=2"])


@pytest.mark.parametrize("override,key", [
    ("n_group=0", "model.n_group"),
    ("topk_group=0", "model.topk_group"),
    ("n_shared_experts=-1", "model.n_shared_experts"),
    ("num_moe_layers=0", "model.num_moe_layers"),
    ("num_hash_layers=3", "model.num_hash_layers"),  # tiny has 2 MoE layers
    ("vocab_size=-1", "model.vocab_size"),
    ("routed_scaling_factor=0", "model.routed_scaling_factor"),
    ("world_size=0", "runtime.world_size"),
    ("iters=0", "runtime.iters"),
    ("layer=-1", "runtime.layer"),
    ("layer=2", "runtime.layer"),  # tiny has MoE layers 0 and 1
    ("seed=-1", "runtime.seed"),
    ("seed=4294967296", "runtime.seed"),
    ("barrier_timeout_s=0", "runtime.barrier_timeout_s"),
    ("shared_split_tokens=-1", "runtime.shared_split_tokens"),
])
def test_a_value_out_of_range_names_the_key(override, key):
    with pytest.raises(ValueError, match=rf"{key}: expected .*, got"):
        load_config("tiny", [override])


@pytest.mark.parametrize("limit", [".nan", ".inf", "0", "-1"])
def test_swiglu_limit_must_be_null_or_finite_and_positive(limit):
    with pytest.raises(ValueError, match=r"model\.swiglu_limit"):
        load_config("tiny", [f"swiglu_limit={limit}"])


GROUPED = dict(name="t", hidden_size=64, moe_intermediate_size=64, n_routed_experts=8, scoring_func="sigmoid",
               n_group=4)


def test_grouped_routing_rejects_a_top_k_larger_than_the_kept_groups_hold():
    with pytest.raises(ValueError, match=r"model\.num_experts_per_tok: expected at most .* = 2, got 4"):
        ModelConfig(**GROUPED, num_experts_per_tok=4, topk_group=1)


def test_grouped_routing_accepts_a_top_k_the_kept_groups_hold():
    assert ModelConfig(**GROUPED, num_experts_per_tok=4, topk_group=2).num_experts_per_tok == 4


def test_n_group_must_divide_the_routed_experts():
    with pytest.raises(ValueError, match=r"model\.n_group: expected a divisor of n_routed_experts=8, got 3"):
        ModelConfig(**{**GROUPED, "n_group": 3}, num_experts_per_tok=2)


def test_top_k_cannot_exceed_the_routed_experts():
    with pytest.raises(ValueError, match=r"model\.num_experts_per_tok: expected 1\.\.8, got 9"):
        ModelConfig(**{**GROUPED, "n_group": 1}, num_experts_per_tok=9)


def test_dp_token_mode_refuses_dynamic_activation_scales():
    with pytest.raises(ValueError, match=re.escape("runtime.act_scale: token_mode 'dp' quantizes each rank's tokens "
                                                   "on that rank, so it needs 'static' scales (or act_mode 'bf16'), "
                                                   "got 'dynamic'")):
        load_config("tiny", ["token_mode=dp", "act_scale=dynamic"])


@pytest.mark.parametrize("overrides", [["act_scale=static"], ["act_mode=bf16", "act_scale=dynamic"]])
def test_dp_token_mode_takes_per_row_activation_scales(overrides):
    assert load_config("tiny", ["token_mode=dp", *overrides]).runtime.token_mode == "dp"


def test_hash_layers_with_sigmoid_scoring_are_rejected():
    # V3's sigmoid routing picks experts by score: its hash layers would have ignored the table.
    with pytest.raises(ValueError, match=re.escape("model.num_hash_layers: hash layers route with scoring_func "
                                                   "'sqrtsoftplus', got 1 hash layers with 'sigmoid'")):
        load_config("tiny", ["scoring_func=sigmoid"])


@pytest.mark.parametrize("text,section,got", [
    ("model: [1, 2]\n", "model", "list [1, 2]"),
    ("model: 3\n", "model", "int 3"),
    ("model: {}\nruntime: [x]\n", "runtime", "list ['x']"),
])
def test_a_config_section_that_is_not_a_mapping_is_named(tmp_path, text, section, got):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"config {path}: section '{section}' expected a mapping of keys to "
                                                   f"values, got {got}")):
        load_config(str(path))


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {hidden_size: [\n")
    with pytest.raises(ValueError, match=re.escape(f"config {path}: malformed YAML (")):
        load_config(str(path))


def test_a_malformed_override_value_names_the_override():
    with pytest.raises(ValueError, match=re.escape("override 'world_size=[1': malformed value (")):
        load_config("tiny", ["world_size=[1"])


def test_a_barrier_timeout_past_the_kernels_range_is_rejected():
    with pytest.raises(ValueError, match=re.escape("runtime.barrier_timeout_s: expected at most 1e+09 s, got 2000000000.0")):
        load_config("tiny", ["barrier_timeout_s=2000000000.0"])
