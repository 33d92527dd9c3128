"""ModelOpt NVFP4 checkpoints: lazy per-rank reads, validation before any data is read, clear errors."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from ep_runtime.checkpoint import (INDEX_FILE, CheckpointError, CheckpointReader, Naming, load_layer,
                                   synthetic_layer, write_synthetic_checkpoint)
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
    x = layer.experts
    for local, e in enumerate(range(16, 24)):
        def f(proj, tensor):
            return t[EXPERT.format(e, proj, tensor)]

        def scale_bytes(proj):  # compared as bytes: the loader must copy every bit of the e4m3 scales
            return f(proj, "weight_scale").view(torch.uint8)

        assert torch.equal(x.w13[local], torch.cat([f("gate_proj", "weight"), f("up_proj", "weight")]))
        assert torch.equal(x.w13_scale[local].view(torch.uint8),
                           torch.cat([scale_bytes("gate_proj"), scale_bytes("up_proj")]))
        assert x.w13_alpha[local].tolist() == [f("gate_proj", "weight_scale_2").item(),
                                               f("up_proj", "weight_scale_2").item()]
        assert torch.equal(x.w2[local], f("down_proj", "weight"))
        assert torch.equal(x.w2_scale[local].view(torch.uint8), scale_bytes("down_proj"))
        assert x.w2_alpha[local].item() == f("down_proj", "weight_scale_2").item()
        assert x.l2_input_scale[local].item() == f("down_proj", "input_scale").item()


def test_a_hash_layer_has_no_router_bias_and_a_scored_layer_has_the_files(ckpt):
    t = _all_tensors(ckpt)
    assert "model.layers.0.mlp.gate.e_score_correction_bias" not in t  # as DeepSeek-V4 exports its hash layers
    hash_layer, scored = (load_layer(CheckpointReader(ckpt), CFG, layer, 0, 4) for layer in (0, 1))
    assert hash_layer.router_bias is None and hash_layer.tid2eid is not None
    assert torch.equal(scored.router_bias, t["model.layers.1.mlp.gate.e_score_correction_bias"].float())


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


@pytest.mark.parametrize("key", [EXPERT.format(5, "up_proj", "input_scale"),
                                 "model.layers.1.mlp.shared_experts.up_proj.input_scale"], ids=["expert", "shared"])
def test_the_layer_input_scale_is_the_max_over_gate_and_up_input_scales(ckpt, tmp_path, key):
    # The synthetic writer gives gate and up one input scale; raising a single up_proj scale above every other
    # one shows that up scales (the shared expert's included: it sees the same layer input) enter the max.
    def raise_up_scale(tensors):
        tensors[key] = 2 * max(v.max() for k, v in tensors.items() if k.endswith("input_scale")).reshape(1)

    t = _all_tensors(_copy(ckpt, tmp_path, raise_up_scale))
    layer = load_layer(CheckpointReader(tmp_path), CFG, 1, rank=0, world_size=4)
    scales = [t[EXPERT.format(e, p, "input_scale")].item() for e in range(8) for p in ("gate_proj", "up_proj")]
    scales += [t[f"model.layers.1.mlp.shared_experts.{p}.input_scale"].item() for p in ("gate_proj", "up_proj")]
    assert layer.experts.l1_input_scale.item() == max(scales) == t[key].item()
    assert layer.shared.l1_input_scale.item() == max(scales)


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

    t = _all_tensors(ckpt)
    b = load_layer(CheckpointReader(_copy(ckpt, tmp_path, as_bytes)), CFG, 1, 0, 4)
    for e in range(8):
        gate, up, down = (t[EXPERT.format(e, p, "weight_scale")].view(torch.uint8)
                          for p in ("gate_proj", "up_proj", "down_proj"))
        assert torch.equal(b.experts.w13_scale[e].view(torch.uint8), torch.cat([gate, up]))
        assert torch.equal(b.experts.w2_scale[e].view(torch.uint8), down)


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
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(key)}': expected a finite positive scale"):
        load_layer(CheckpointReader(path), CFG, 1, 0, 4)


def test_a_subnormal_input_scale_is_rejected_naming_its_key(ckpt, tmp_path):
    key = EXPERT.format(6, "down_proj", "input_scale")  # the runtime divides by it: 1 / 1e-40 is infinite in fp32
    path = _copy(ckpt, tmp_path, lambda t: t.__setitem__(key, torch.full((1,), 1e-40)))
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(key)}': expected a finite positive scale, got "
                                              r".*below fp32's smallest normal number"):
        load_layer(CheckpointReader(path), CFG, 1, 0, 4)


def test_truncated_single_file_is_rejected_when_the_reader_opens_it(ckpt, tmp_path):
    path = _copy(ckpt, tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        CheckpointReader(path)


def test_truncated_shard_fails_the_load_before_reading_data(ckpt, tmp_path):
    last = _shards(ckpt, tmp_path)
    last.write_bytes(last.read_bytes()[:-10])
    reader = CheckpointReader(tmp_path)
    with pytest.raises(CheckpointError, match="truncated"):
        load_layer(reader, CFG, 1, 0, 4)
    assert reader.tensors_read == []


def _shards(ckpt, dst):
    """A copy of the sharded checkpoint ckpt in dst, and its first shard (rank 0's experts of layer 1)."""
    for f in ckpt.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst / "model-00001-of-00005.safetensors"


def test_a_tensor_whose_data_span_does_not_fit_its_shape_is_named_before_any_read(ckpt, tmp_path):
    key = EXPERT.format(3, "up_proj", "weight")
    shard = _shards(ckpt, tmp_path)

    def shorten(header):
        header[key]["data_offsets"][1] -= 1
        return header

    _rewrite_header(shard, shorten)
    reader = CheckpointReader(tmp_path)
    size = CFG.moe_intermediate_size * CFG.hidden_size // 2  # packed E2M1 codes: a byte per two
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(key)}' expected {size} bytes of data for its "
                                              rf"shape and dtype, got data_offsets \[\d+, \d+\] \({size - 1} bytes\)"):
        load_layer(reader, CFG, 1, 0, 4)
    assert reader.tensors_read == []


def test_bytes_past_a_shards_last_tensor_fail_the_load_before_any_read(ckpt, tmp_path):
    shard = _shards(ckpt, tmp_path)
    shard.write_bytes(shard.read_bytes() + bytes(64))
    reader = CheckpointReader(tmp_path)
    with pytest.raises(CheckpointError, match=rf"{re.escape(shard.name)}: cannot open"):
        load_layer(reader, CFG, 1, 0, 4)
    assert reader.tensors_read == []


def test_the_index_file_given_as_the_path_reads_its_checkpoint(ckpt):
    by_index = load_layer(CheckpointReader(ckpt / INDEX_FILE), CFG, 1, 0, 4)
    by_dir = load_layer(CheckpointReader(ckpt), CFG, 1, 0, 4)
    assert torch.equal(by_index.experts.w13, by_dir.experts.w13)


def test_a_file_that_is_neither_safetensors_nor_the_index_is_rejected(tmp_path):
    f = tmp_path / "config.json"
    f.write_text("{}")
    with pytest.raises(CheckpointError, match=rf"expected a directory, its {INDEX_FILE} or a \.safetensors file, "
                                              rf"got {re.escape(str(f))}"):
        CheckpointReader(f)


def test_corrupt_header_is_reported_with_the_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!!}")
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt header"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("layer", [-1, 1.0])
def test_a_layer_index_that_is_not_a_non_negative_int_is_rejected_before_reading(ckpt, layer):
    with pytest.raises(CheckpointError, match=rf"layer: expected a layer index >= 0, got {layer}"):
        load_layer(CheckpointReader(ckpt), CFG, layer, 0, 1)


def test_world_size_not_dividing_the_experts_is_rejected(ckpt):
    with pytest.raises(CheckpointError, match="world_size: must divide n_routed_experts=32, got 5"):
        load_layer(CheckpointReader(ckpt), CFG, 1, 0, 5)


@pytest.mark.parametrize("layer", [-1, 2])
def test_a_synthetic_layer_outside_the_models_moe_layers_is_rejected(layer):
    with pytest.raises(ValueError, match=rf"layer: expected 0..1 \(model.num_moe_layers=2\), got {layer}"):
        synthetic_layer(CFG, layer, 0, 1, 0, "cpu")


def test_a_non_nvfp4_quant_config_is_rejected(ckpt, tmp_path):
    path = _copy(ckpt, tmp_path)
    (path / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8"}}))
    with pytest.raises(CheckpointError, match="quant_algo expected NVFP4, got 'FP8'"):
        CheckpointReader(path)


def test_a_missing_checkpoint_path_is_reported(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointReader(tmp_path / "nope")


def _rewrite_header(f, edit):
    """Rewrite the JSON header of safetensors file f as edit(header) returns it; the data stays as it is."""
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(edit(json.loads(raw[8:8 + n]))).encode()
    f.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n:])


W = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}  # the header entry of torch.zeros(4) saved as "w"


@pytest.mark.parametrize("entry,expected", [
    ({"dtype": "F32", "shape": [4]}, "header field 'data_offsets' expected"),
    ({**W, "data_offsets": ["a", "b"]}, "header field 'data_offsets' expected"),
    ({**W, "data_offsets": [16, 0]}, "header field 'data_offsets' expected"),
    ({"shape": [4], "data_offsets": [0, 16]}, "header field 'dtype' expected"),
    ({**W, "shape": 5}, "header field 'shape' expected"),
    ({**W, "shape": [-4]}, "header field 'shape' expected"),
    ("x", "expected a header entry object"),
], ids=["no-offsets", "string-offsets", "reversed-offsets", "no-dtype", "int-shape", "negative-shape", "string"])
def test_malformed_header_entry_is_named_with_its_file_and_tensor(tmp_path, entry, expected):
    f = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(4)}, str(f))
    _rewrite_header(f, lambda h: {**h, "w": entry})
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor 'w' {re.escape(expected)}.*, got"):
        CheckpointReader(tmp_path)


def test_a_header_that_is_not_a_json_object_is_named_with_its_file(tmp_path):
    f = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(4)}, str(f))
    _rewrite_header(f, lambda h: [1, 2, 3])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt header \(expected a JSON object, got list"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("name,content,expected", [
    (INDEX_FILE, b'{"weight_map": [1, 2]}', "weight_map expected an object, got [1, 2]"),
    (INDEX_FILE, b'{"weight_map": {"w": 5}}', "weight_map['w'] expected a file name, got 5"),
    (INDEX_FILE, b"[]", "expected a JSON object, got list"),
    (INDEX_FILE, b"\xff\xfe{", "malformed JSON"),
    ("config.json", b"\xff\xff", "malformed JSON"),
    ("hf_quant_config.json", b'{"quantization": "nvfp4"}', "quantization expected an object, got 'nvfp4'"),
    ("hf_quant_config.json", b"[1]", "expected a JSON object, got list"),
    ("hf_quant_config.json", b'{"quantization": {"group_size": "abc"}}', "group_size expected 16, got 'abc'"),
    ("hf_quant_config.json", b'{"quantization": {"group_size": null}}', "group_size expected 16, got None"),
], ids=["map-list", "name-int", "index-list", "index-utf8", "config-utf8", "quant-str", "quant-list", "group-str",
        "group-null"])
def test_malformed_index_or_quant_config_is_named_with_its_file_and_field(tmp_path, name, content, expected):
    save_file({"w": torch.zeros(4)}, str(tmp_path / "model.safetensors"))
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(f"{name}: {expected}")):
        CheckpointReader(tmp_path)


def test_a_tensor_named_twice_in_the_index_is_rejected(tmp_path):
    save_file({"w": torch.zeros(4)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.ones(4)}, str(tmp_path / "b.safetensors"))
    (tmp_path / INDEX_FILE).write_text('{"weight_map": {"w": "a.safetensors", "w": "b.safetensors"}}')
    with pytest.raises(CheckpointError, match=f"{INDEX_FILE}: malformed JSON \\(key 'w' appears twice"):
        CheckpointReader(tmp_path)


def test_a_tensor_named_twice_in_one_header_is_rejected(tmp_path):
    f = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(4)}, str(f))
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    entry = json.dumps(W)
    header = f'{{"w": {entry}, "w": {entry}}}'.encode()
    f.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt header \(key 'w' appears twice"):
        CheckpointReader(tmp_path)


def test_a_tensor_in_two_files_without_an_index_is_rejected_naming_both(tmp_path):
    save_file({"w": torch.zeros(4)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.ones(4)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match="tensor 'w' is in both a.safetensors and b.safetensors"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("key,byte", [
    (EXPERT.format(2, "gate_proj", "weight_scale"), 0x7F),  # NaN
    (EXPERT.format(5, "down_proj", "weight_scale"), 0xFF),  # NaN with the sign bit
    (EXPERT.format(0, "up_proj", "weight_scale"), 0xC0),  # -2
    ("model.layers.1.mlp.shared_experts.down_proj.weight_scale", 0x80 | 0x38),  # -1
])
def test_a_nan_or_negative_block_scale_is_rejected_naming_its_key(ckpt, tmp_path, key, byte):
    def corrupt(tensors):
        tensors[key].view(torch.uint8).view(-1)[3] = byte

    path = _copy(ckpt, tmp_path, corrupt)
    with pytest.raises(CheckpointError, match=f"tensor '{key}': block scales must be finite, non-negative"):
        load_layer(CheckpointReader(path), CFG, 1, 0, 4)


@pytest.mark.parametrize("tensor,value", [("weight", float("nan")), ("e_score_correction_bias", float("inf"))])
def test_a_non_finite_router_tensor_is_rejected_naming_its_key(ckpt, tmp_path, tensor, value):
    key = f"model.layers.1.mlp.gate.{tensor}"

    def corrupt(tensors):
        tensors[key].view(-1)[5] = value

    path = _copy(ckpt, tmp_path, corrupt)
    with pytest.raises(CheckpointError, match=f"tensor '{key}': expected finite values, found {value}"):
        load_layer(CheckpointReader(path), CFG, 1, 0, 4)


def test_a_truncated_header_is_reported_once(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\xff\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(tmp_path)
    assert str(e.value) == f"checkpoint file {f}: truncated or corrupt header (255 bytes declared, 2 present)"


@pytest.mark.parametrize("rank", [-1, 2])
def test_a_synthetic_layer_for_a_rank_outside_the_world_is_rejected(rank):
    with pytest.raises(ValueError, match=rf"rank: expected 0..1, got {rank}"):
        synthetic_layer(CFG, 0, rank, 2, 0, "cpu")
