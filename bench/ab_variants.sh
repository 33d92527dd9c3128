#!/usr/bin/env bash
# A/B timing of build variants of the expert kernels in one device call (the tool behind the notes' "A/B calls").
#   VARIANTS="base mine" CASES="l1:128:128:256,l2:1:8:64:6" [ROUNDS=3] [TESTS="tests/gpu/test_experts_cuda.py"
#   TEST_VARIANTS="mine"] bash bench/ab_variants.sh        (repo root; wheels in .whl/; carry .whl and ab_alt)
# A variant v is ab_alt/v.cu (it replaces csrc/grouped_gemm_sm90.cu), or ab_alt/v/ (a whole tree: setup.py csrc
# ep_runtime bench configs), or neither (the work tree as it is). All build at once; then every round times every
# variant with bench/ab_time.py, starting one variant later each round, because the place in a round moves timings
# by 3-5 % on its own (NOTES_experts.md, tenth session). Output: $OUT/ab.log and the build and test logs.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; LOG="$OUT/ab.log"
: "${VARIANTS:?name the variants}" "${CASES:?name the cases (layer:m:block_n:block_m[:active],...)}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,power.draw,power.limit --format=csv >> "$LOG"
t0=$SECONDS
for v in $VARIANTS; do
  d=/tmp/ab_$v; rm -rf "$d"; mkdir -p "$d"
  src="work tree"
  if [ -d "ab_alt/$v" ]; then cp -r "ab_alt/$v"/. "$d"/; src="ab_alt/$v/"
  else cp -r setup.py csrc ep_runtime bench configs "$d"/; fi
  mkdir -p "$d/bench" && cp bench/ab_time.py bench/bench_experts.py bench/bar_ogs.py "$d"/bench/
  [ -f "ab_alt/$v.cu" ] && cp "ab_alt/$v.cu" "$d/csrc/grouped_gemm_sm90.cu" && src="$src + ab_alt/$v.cu"
  # logged: a leftover ab_alt/<name>/ silently replaces the work tree under that name
  echo "== $v builds from: $src" >> "$LOG"
  rm -f "$d"/ep_runtime/*.so
  (cd "$d" && PYTHONPATH=/tmp/site python3 setup.py -q build_ext --inplace --force > "$OUT/build_$v.log" 2>&1
   rc=$?; spills=$(grep -c 'Registers are spilled' "$OUT/build_$v.log"); c75=$(grep -c C75 "$OUT/build_$v.log")
   echo "== $v build rc=$rc spills $spills C75 $c75" >> "$LOG") &
done
wait
echo "builds took $((SECONDS - t0)) s" >> "$LOG"
read -r -a vs <<< "$VARIANTS"
for r in $(seq 0 $((${ROUNDS:-2} - 1))); do
  for i in "${!vs[@]}"; do
    v=${vs[$(((i + r) % ${#vs[@]}))]}
    echo "-- $v round $((r + 1))" >> "$LOG"
    PYTHONPATH=/tmp/ab_$v:/tmp/site timeout "${CASE_TIMEOUT:-180}" python3 "/tmp/ab_$v/bench/ab_time.py" "$CASES" \
      >> "$LOG" 2>&1
  done
done
for v in ${TEST_VARIANTS:-}; do
  cp -r tests "/tmp/ab_$v"/
  (cd "/tmp/ab_$v" && PYTHONPATH=/tmp/ab_$v:/tmp/site timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q \
     -p no:cacheprovider ${TESTS:-tests/gpu/test_experts_cuda.py} > "$OUT/tests_$v.log" 2>&1
   echo "tests $v rc=$? $(tail -1 "$OUT/tests_$v.log")" >> "$LOG")
done
cat "$LOG"
