#!/usr/bin/env bash
# Everything a 4-GPU machine runs for the runtime, in one device call (under 10 minutes): build, then the
# 4-GPU tests and benchmarks, then three chains at once on disjoint GPUs: 2-GPU tests + benchmarks on GPUs
# 0,1; the 1-GPU layer benchmark on GPU 2; the single-GPU test suite on GPU 3. Each step has a timeout.
# Output in $OUT (bench/results without it): gpu_run.log and the result JSON files.
#   bash bench/run_gpu.sh            (repo root; the nvidia-cutlass and nvshmem4py wheels in .whl/)
set -uo pipefail
OUT=${OUT:-$PWD/bench/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "cannot install the carried wheels from .whl/"; exit 1; }
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# NVLink multicast must stay off on these machines (it can take the host's GPUs down).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
# Result files name their commit through ep_runtime.provenance: EP_COMMIT when the caller sets it, else HEAD marked
# -dirty where the copied work tree differs from it (a GPU machine's checkout can be older than the tree).
export EP_RUNTIME_BUILD_JOBS=16

step() {  # step LOG NAME TIMEOUT GPUS CMD...
  local log=$1 name=$2 limit=$3 gpus=$4; shift 4
  local t0=$SECONDS
  echo "===== $name (GPUs $gpus): $*" >> "$log"
  CUDA_VISIBLE_DEVICES=$gpus timeout "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  echo "===== $name rc=$rc $((SECONDS - t0))s" | tee -a "$log"
}
tests() {  # tests LOG NAME TIMEOUT GPUS PORT NPROC FILE
  step "$1" "$2" "$3" "$4" torchrun --master-port "$5" --nproc-per-node "$6" -m pytest -q -rfE -p no:cacheprovider \
    -m multigpu -s "$7"
}
bench_steps() {  # bench_steps LOG GPUS PORT N
  step "$1" "allreduce$4" 100 "$2" torchrun --master-port "$3" --nproc-per-node "$4" bench/bench_allreduce.py
  step "$1" "layer$4" 200 "$2" torchrun --master-port "$3" --nproc-per-node "$4" bench/bench_layer.py --iters 10 --chain 4
}

LOG="$OUT/gpu_run.log"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; nvidia-smi topo -m; } >> "$LOG" 2>&1
step "$LOG" build 300 0 python3 setup.py -q build_ext --inplace
[ -n "$(ls ep_runtime/_C*.so 2>/dev/null)" ] || { tail -30 "$LOG"; exit 1; }

tests "$LOG" multi4-allreduce 100 0,1,2,3 29500 4 tests/gpu/test_allreduce.py
tests "$LOG" multi4-layer 120 0,1,2,3 29500 4 tests/gpu/test_layer_multigpu.py
bench_steps "$LOG" 0,1,2,3 29500 4
step "$LOG" main4 120 0,1,2,3 torchrun --master-port 29500 --nproc-per-node 4 -m ep_runtime.cli --graph \
  --set tokens=128 --out "$OUT/main_4gpu.json"

( tests "$LOG.a" multi2-allreduce 100 0,1 29510 2 tests/gpu/test_allreduce.py
  tests "$LOG.a" multi2-layer 100 0,1 29510 2 tests/gpu/test_layer_multigpu.py
  bench_steps "$LOG.a" 0,1 29510 2 ) &
( step "$LOG.b" layer1 280 2 python3 bench/bench_layer.py --iters 10 --chain 4 ) &
( step "$LOG.c" tests1 280 3 python3 -m pytest -q -rfE -p no:cacheprovider -m gpu -s tests/gpu/test_layer.py tests/gpu ) &
wait
for part in a b c; do cat "$LOG.$part" >> "$LOG" && rm -f "$LOG.$part"; done
grep -E "^=====|passed|failed|^T=|^\{|wrote" "$LOG" | tail -60
