"""The main job, as the README's quick start runs it on a machine without a GPU. `--device cpu` keeps it that job on
GPU machines too, where the default is the V4-Pro layer on the GPUs (run by bench/run_gpu.sh)."""
import json
import subprocess
import sys

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
