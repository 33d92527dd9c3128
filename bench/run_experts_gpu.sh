#!/usr/bin/env bash
# One device call: build, SASS/ptxas report, expert kernel tests, benchmark. Logs and JSON land in $OUT.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
: "${EP_COMMIT:?set EP_COMMIT to the commit under test: the device copy of the work tree sits on an older checkout}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv > "$OUT/gpu.txt" 2>&1
python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
grep -E "spill" "$OUT/build.log" | sort | uniq > "$OUT/spills.txt"
# The full SASS (several MB) stays on the machine; its per-kernel report is what the notes cite, and a device call
# brings back a limited number of files from $OUT (one run lost its test log that way).
cuobjdump --dump-sass build/temp*/csrc/grouped_gemm_sm90.cu.o > /tmp/grouped_gemm.sass 2>&1
python3 bench/sass_report.py /tmp/grouped_gemm.sass "$OUT/build.log" > "$OUT/sass.txt" 2>&1
cat "$OUT/sass.txt"
# TESTS: paths (split on spaces); MARK: a marker expression for -m, kept whole (e.g. MARK="not multigpu")
timeout ${TEST_TIMEOUT:-220} python3 -m pytest -q --maxfail=25 -p no:cacheprovider ${TESTS:-tests/gpu/test_experts_cuda.py} \
  ${MARK:+-m "$MARK"} > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -25 "$OUT/tests.log"
timeout ${BENCH_TIMEOUT:-240} python3 bench/bench_experts.py --out "$OUT/experts.json" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
echo "bench rc=$?"; tail -22 "$OUT/bench.log"
