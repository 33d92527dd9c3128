#!/usr/bin/env bash
# Communication pieces on a GPU machine: build, single-GPU tests (staging; all-reduce on emulated ranks),
# multi-GPU all-reduce tests under torchrun, then the all-reduce benchmark. Logs and the benchmark JSON go
# to $OUT (bench/results without it). Worst case (every step at its timeout) stays under 10 minutes.
#   usage (repo root, the nvidia-cutlass wheel in .whl/):  bash bench/run_comm_gpu.sh N_GPUS
set -uo pipefail
N=${1:?usage: bench/run_comm_gpu.sh N_GPUS}
OUT=${OUT:-$PWD/bench/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "cannot install the carried wheels from .whl/"; exit 1; }
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# NVLink multicast must stay off on these machines (it can take the host's GPUs down).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export EP_COMMIT=${EP_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m; } > "$OUT/gpu_topo.txt" 2>&1
python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build ok"

status=0
timeout 120 python3 -m pytest -q -rfE -p no:cacheprovider -m gpu tests/gpu/test_staging.py tests/gpu/test_allreduce.py 2>&1 \
  | tee "$OUT/test_1gpu.log" | tail -15 || status=1
timeout 200 torchrun --nproc-per-node "$N" -m pytest -q -rfE -p no:cacheprovider -m multigpu \
  tests/gpu/test_allreduce.py > "$OUT/test_allreduce_${N}gpu.log" 2>&1 || status=1
grep -E "passed|failed|error|Error" "$OUT/test_allreduce_${N}gpu.log" | tail -25
timeout 200 torchrun --nproc-per-node "$N" bench/bench_allreduce.py > "$OUT/bench_allreduce_${N}gpu.log" 2>&1 \
  || status=1
grep -vE "^\[rank[0-9]+\]:\[W|^W[0-9]{4}" "$OUT/bench_allreduce_${N}gpu.log" | tail -40
exit $status
