"""ModelOpt NVFP4 checkpoints: lazy per-rank reads, validation before any data is read, clear errors."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ep_runtime.checkpoint import CheckpointError, CheckpointReader, Naming, load_layer, write_synthetic_checkpoint
from ep_runtime.config import load_config

CFG = load_config("tiny").model  # 32 experts, hash layer 0
EXPERT = "model.layers.1.mlp.experts.{}.{}.{}"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Two layers, four expert shards (8 experts each) plus one file for routers and shared experts."""
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt"), CFG, num_layers=2, shards=4)


def _all_tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _copy(ckpt, dst, edit=None):
    """A single-file copy of ckpt, with `edit(tensors)` applied."""
    tensors = _all_tensors(ckpt)
    if edit:
        edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_loaded_stacks_hold_the_files_tensors_for_the_local_experts(ckpt):
    layer = load_layer(CheckpointReader(ckpt), CFG, 1, rank=2, world_size=4)
    t = _all_tensors(ckpt)
    for local, e in enumerate(range(16, 24)):
        gate, up = t[EXPERT.format(e, "gate_proj", "weight")], t[EXPERT.format(e, "up_proj", "weight")]
        assert torch.equal(layer.experts.w13[local], torch.cat([gate, up]))
        assert torch.equal(layer.experts.w2[local], t[EXPERT.format(e, "down_proj", "weight")])
        assert layer.experts.w2_alpha[local].item() == t[EXPERT.format(e, "down_proj", "weight_scale_2")].item()
        assert layer.experts.l2_input_scale[local].item() == t[EXPERT.format(e, "down_proj", "input_scale")].item()


def test_a_rank_reads_only_its_own_experts(ckpt):
    reader = CheckpointReader(ckpt)
    load_layer(reader, CFG, 1, rank=1, world_size=4)
    experts_read = {int(k.split(".")[5]) for k in reader.tensors_read if ".experts." in k}
    assert experts_read == set(range(8, 16))


def test_a_rank_loads_with_the_other_ranks_shards_deleted(ckpt, tmp_path):
    for f in ckpt.iterdir():
        if not f.name.startswith(("model-00001", "model-00003", "model-00004")):  # keep shard 2 + common
            (tmp_path / f.name).write_bytes(f.read_bytes())
    layer = load_layer(CheckpointReader(tmp_path), CFG, 1, rank=1, world_size=4)
    assert layer.experts.num_experts == 8


def test_single_file_checkpoints_load_like_sharded_ones(ckpt, tmp_path):
    a = load_layer(CheckpointReader(ckpt), CFG, 0, 0, 2)
    b = load_layer(CheckpointReader(_copy(ckpt, tmp_path)), CFG, 0, 0, 2)
    assert torch.equal(a.experts.w13, b.experts.w13) and torch.equal(a.tid2eid, b.tid2eid)


def test_the_layer_input_scale_is_the_max_over_gate_and_up_input_scales(ckpt):
    t = _all_tensors(ckpt)
    layer = load_layer(CheckpointReader(ckpt), CFG, 1, rank=0, world_size=4)
    scales = [t[EXPERT.format(e, p, "input_scale")].item() for e in range(8) for p in ("gate_proj", "up_proj")]
    scales.append(t["model.layers.1.mlp.shared_experts.gate_proj.input_scale"].item())
    assert layer.experts.l1_input_scale.item() == max(scales)


def test_a_key_map_hook_reads_other_namings(ckpt, tmp_path):
    def rename(tensors):
        for k in list(tensors):
            tensors[k.replace("model.layers.", "backbone.blocks.")] = tensors.pop(k)

    path = _copy(ckpt, tmp_path, rename)
    naming = Naming(key_map=lambda k: k.replace("model.layers.", "backbone.blocks."))
    assert load_layer(CheckpointReader(path, naming), CFG, 1, 0, 4).experts.num_experts == 8


def test_scales_stored_as_bytes_are_reinterpreted_as_e4m3(ckpt, tmp_path):
    def as_bytes(tensors):
        for k in [k for k in tensors if k.endswith("weight_scale")]:
            tensors[k] = tensors[k].view(torch.uint8)

    a = load_layer(CheckpointReader(ckpt), CFG, 1, 0, 4)
    b = load_layer(CheckpointReader(_copy(ckpt, tmp_path, as_bytes)), CFG, 1, 0, 4)
    assert torch.equal(a.experts.w13_scale.view(torch.uint8), b.experts.w13_scale.view(torch.uint8))


def test_missing_tensor_is_named(ckpt, tmp_path):
    key = EXPERT.format(3, "up_proj", "weight_scale")
    path = _copy(ckpt, tmp_path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=f"missing tensor '{key}'"):
        load_layer(CheckpointReader(path), CFG, 1, 0, 4)


def test_wrong_dtype_is_named(ckpt, tmp_path):
    key = EXPERT.format(2, "gate_proj", "weight")
    path = _copy(ckpt, tmp_path, lambda t: t.__setitem__(key, t[key].to(torch.int16)))
    with pytest.raises(CheckpointError, match=f"'{key}' expected dtype U8, got I16"):
        load_layer(CheckpointReader(path), CFG, 1, 0, 4)


def test_wrong_shape_is_named(ckpt, tmp_path):
    key = EXPERT.format(5, "down_proj", "weight")
    path = _copy(ckpt, tmp_path, lambda t: t.__setitem__(key, t[key][:, :-1].contiguous()))
    with pytest.raises(CheckpointError, match=f"'{key}' expected shape \\(256, 64\\), got \\(256, 63\\)"):
        load_layer(CheckpointReader(path), CFG, 1, 0, 4)


def test_non_positive_global_scale_is_rejected(ckpt, tmp_path):
    key = EXPERT.format(1, "gate_proj", "weight_scale_2")
    path = _copy(ckpt, tmp_path, lambda t: t.__setitem__(key, torch.zeros(1)))
    with pytest.raises(CheckpointError, match=key):
        load_layer(CheckpointReader(path), CFG, 1, 0, 4)


def test_truncated_file_is_detected_before_any_tensor_is_read(ckpt, tmp_path):
    path = _copy(ckpt, tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        reader = CheckpointReader(path)
        load_layer(reader, CFG, 1, 0, 4)


def test_truncated_shard_fails_the_load_before_reading_data(ckpt, tmp_path):
    for f in ckpt.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    last = tmp_path / "model-00001-of-00005.safetensors"
    last.write_bytes(last.read_bytes()[:-10])
    reader = CheckpointReader(tmp_path)
    with pytest.raises(CheckpointError, match="truncated"):
        load_layer(reader, CFG, 1, 0, 4)
    assert reader.tensors_read == []


def test_corrupt_header_is_reported_with_the_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!!}")
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt header"):
        CheckpointReader(tmp_path)


def test_world_size_not_dividing_the_experts_is_rejected(ckpt):
    with pytest.raises(CheckpointError, match="world_size: must divide n_routed_experts=32, got 5"):
        load_layer(CheckpointReader(ckpt), CFG, 1, 0, 5)


def test_a_non_nvfp4_quant_config_is_rejected(ckpt, tmp_path):
    path = _copy(ckpt, tmp_path)
    (path / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8"}}))
    with pytest.raises(CheckpointError, match="quant_algo expected NVFP4, got 'FP8'"):
        CheckpointReader(path)


def test_a_missing_checkpoint_path_is_reported(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointReader(tmp_path / "nope")
