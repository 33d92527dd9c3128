"""The main job, as the README's quick start runs it on a machine without a GPU. `--device cpu` keeps it that job on
GPU machines too, where the default is the V4-Pro layer on the GPUs (run by bench/run_gpu.sh)."""
import json
import subprocess
import sys

import pytest
import torch

from ep_runtime import cli
from ep_runtime.dist_utils import pick_device

REQUIRED = {"world_size", "experts_per_rank", "tokens", "backend", "median_ms", "rel_l2_vs_reference"}


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "ep_runtime.cli", "--device", "cpu", *args], capture_output=True,
                          text=True, timeout=timeout)


def _run(*args):
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def test_default_cpu_job_runs_eight_ranks_and_matches_the_reference():
    r = _run()
    assert REQUIRED <= r.keys()
    assert (r["world_size"], r["experts_per_rank"], r["backend"]) == (8, 4, "reference")
    assert r["median_ms"] > 0
    assert r["rel_l2_vs_reference"] <= 1e-5


def test_command_line_overrides_reach_the_job(tmp_path):
    out = tmp_path / "r.json"
    r = _run("--set", "world_size=2", "--set", "tokens=8", "--set", "act_mode=bf16", "--set", "iters=2",
             "--out", str(out))
    assert (r["world_size"], r["experts_per_rank"], r["tokens"], r["act_mode"]) == (2, 16, 8, "bf16")
    assert json.loads(out.read_text()) == r


def test_bad_config_values_fail_with_a_message():
    proc = _cli("--set", "world_size=3", timeout=120)
    assert proc.returncode != 0 and "world_size: must divide" in proc.stderr


def test_a_job_of_more_tokens_than_the_buffer_holds_fails_with_a_message():
    proc = _cli("--set", "max_tokens=16", "--set", "tokens=17", timeout=120)
    assert proc.returncode != 0 and "runtime.tokens: expected at most max_tokens=16, got 17" in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--graph"], "--graph: CUDA-graph replays need a GPU, got --device cpu"),
    (["--out", "/nonexistent_dir/r.json"],
     "--out: expected a file in an existing directory, got /nonexistent_dir/r.json"),
    (["--out", "/tmp"], "--out: expected a file in an existing directory, got /tmp"),
])
def test_options_the_job_cannot_honour_fail_before_it_starts(args, message):
    proc = _cli(*args, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr


def test_graph_replays_of_the_reference_backend_fail_before_the_job_starts(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the check for a GPU
    with pytest.raises(ValueError, match=r"--graph: CUDA-graph replays need the cuda backend .* got runtime.backend "
                                         r"'reference'"):
        cli.main(["--graph", "--config", "tiny", "--set", "backend=reference"])


def test_the_job_logs_its_buffer_backend_and_capacity():
    proc = _cli("--set", "world_size=1", "--set", "iters=1", "--no-reference", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SymmBuffer: backend=cpu rank=0/1 max_tokens=" in proc.stderr


@pytest.fixture
def eight_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)


def test_auto_device_gives_a_rank_of_a_two_node_job_its_local_gpu(eight_gpus, monkeypatch):
    for var, value in {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8"}.items():
        monkeypatch.setenv(var, value)
    assert pick_device("auto") == torch.device("cuda", 3)


def test_auto_device_refuses_more_ranks_on_a_node_than_gpus_instead_of_falling_back_to_cpu(eight_gpus, monkeypatch):
    for var, value in {"RANK": "0", "WORLD_SIZE": "16", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "16"}.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(RuntimeError, match="device: 16 ranks on this node need a GPU each, got 8 visible GPUs"):
        pick_device("auto")
