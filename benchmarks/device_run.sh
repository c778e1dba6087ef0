#!/usr/bin/env bash
# One call on a GPU machine (one H100 or H200, the project's torch already installed, no network):
# build for the local GPU, check the CUDA kernels against the CPU kernels, benchmark.
#
#   bash benchmarks/device_run.sh --quick   # <= 7 minutes: build, GPU tests, benchmarks, merges
#   bash benchmarks/device_run.sh           # <= 9 minutes: the full suite and every benchmark
#
# --quick: builds for this GPU's architecture only; runs the GPU tests (the kernel test matrix of
# tests/test_cuda_emulated.py on real CUDA, tests/test_cuda.py, opcheck on CUDA, the CUDA cases of
# the GPU-path, ACE and spectral tests); the bandwidth benchmark at 8 x 4096x11008 bf16;
# `mergekernels bench --quick --device cuda`; and `mergekernels merge --device cuda` with five
# methods on a generated Llama-shaped checkpoint, compared byte for byte with the same merge on the
# CPU (benchmarks/device_merge_check.py); compute-sanitizer on a few fused-merge cases; and whether
# the ops' input errors raise or crash (benchmarks/device_error_check.py, in both modes).
# DEVICE_SKIP="bandwidth bench" leaves out the named steps (a rerun that needs only the checks).
# Full: the same build, the whole test suite, compute-sanitizer (memcheck, racecheck) on a few CUDA
# tests where the machine allows it, `mergekernels bench --device cuda`, the bandwidth benchmark at
# 8 x 4096x11008 bf16, ACE on one Llama-7B block (4 experts, fp32), the WUDI loss and the merge check.
#
# Every step runs under a time limit cut to what is left of the mode's budget, so the run ends in
# time and its summary says which step was cut or failed. Logs and JSON files go to $OUT (default
# ./device_out): <step>.log per step, *.json, summary.txt; with DEVICE_PACK=1 the logs and JSON are
# packed into $OUT/device_run.tar.gz next to summary.txt (for transports that return few files).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=full BUDGET=530
if [[ "${1:-}" == "--quick" ]]; then MODE=quick BUDGET=420; fi
OUT=${OUT:-device_out}
LOGS=$OUT
[[ "${DEVICE_PACK:-0}" == 1 ]] && LOGS=$(mktemp -d)
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
PY=${PYTHON:-python3}
START=$SECONDS
SUMMARY=()
FAILED=0

# step NAME LIMIT COMMAND...: COMMAND under min(LIMIT, budget left) seconds, output in $LOGS/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  if [[ " ${DEVICE_SKIP:-} " == *" $name "* ]]; then
    SUMMARY+=("$(printf '%-16s %s' "$name" "skipped: DEVICE_SKIP")")
    return 0
  fi
  local left=$((BUDGET - (SECONDS - START)))
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    SUMMARY+=("$(printf '%-16s %s' "$name" "skipped: budget spent")")
    FAILED=1
    return 124
  fi
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout --signal=TERM --kill-after=5 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]} verdict=ok
  if ((rc == 124 || rc == 137)); then
    verdict="cut at ${limit}s"
  elif ((rc != 0)); then
    verdict="failed (rc $rc)"
  fi
  ((rc != 0)) && FAILED=1
  SUMMARY+=("$(printf '%-16s %-18s %4d s' "$name" "$verdict" $((SECONDS - t0)))")
  return "$rc"
}

finish() {
  {
    echo "=== summary: $MODE mode, $((SECONDS - START)) s of $BUDGET"
    printf '%s\n' "${SUMMARY[@]}"
  } | tee "$OUT/summary.txt"
  if [[ "$LOGS" != "$OUT" ]]; then
    tar -czf "$OUT/device_run.tar.gz" -C "$LOGS" .
    rm -rf "$LOGS"
  fi
}
trap finish EXIT

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,compute_cap --format=csv > "$LOGS/gpu.txt" 2>&1
ARCH=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)
# This GPU's architecture only: one nvcc target, the shortest build.
step build 200 env MK_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" "$PY" setup.py build_ext --inplace || exit 1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step info 20 "$PY" -m mergekernels info
# Input errors must raise, not crash (they crashed on the 2026-12-04 lease; see the script).
step errors 60 "$PY" benchmarks/device_error_check.py

# sanitize LIMIT TESTS: compute-sanitizer's memcheck and racecheck on the tests/test_cuda.py cases
# that match TESTS (-k), where the machine has the tool (Firecracker machines do, gVisor ones not).
sanitize() {
  command -v compute-sanitizer > /dev/null || return 0
  local tool
  for tool in memcheck racecheck; do
    step "sanitize-$tool" "$1" compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$PY" -m pytest -q -p no:cacheprovider -x tests/test_cuda.py -k "$2"
  done
}

XDIST=()
"$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n 8)
# The GPU's own tests: the CUDA-vs-CPU matrices, opcheck on CUDA, the CUDA paths of ACE and the
# spectral methods; MK_EMULATION=0 leaves out the emulated build (CI runs it on every push).
GPU_TESTS=(tests/test_cuda.py tests/test_cuda_emulated.py tests/test_gpu_paths.py tests/test_opcheck.py
  tests/test_ace.py tests/test_spectral.py)
if [[ $MODE == quick ]]; then
  step cuda-tests 130 env MK_EMULATION=0 "$PY" -m pytest -q -p no:cacheprovider "${GPU_TESTS[@]}" -k cuda \
    "${XDIST[@]}"
  step bandwidth 45 "$PY" benchmarks/bandwidth.py --device cuda --k 8 --shape 4096x11008 --repeats 10 \
    --json "$LOGS/bandwidth_cuda.json"
  step bench 40 "$PY" -m mergekernels bench --quick --device cuda --json "$LOGS/bench_quick_cuda.json" --no-progress
  step merge-check 90 "$PY" benchmarks/device_merge_check.py --dir /tmp/mk_device_models \
    --methods task_arithmetic ties dare_ties breadcrumbs della --json "$LOGS/merge_check.json"
  sanitize 45 "bitwise and (ties_weighted or dare_ties_l1 or della)"
  exit "$FAILED"
fi

step tests 180 env MK_EMULATION=0 "$PY" -m pytest -q -p no:cacheprovider tests "${XDIST[@]}"
sanitize 40 "masks or stats"
step bench 60 "$PY" -m mergekernels bench --device cuda --json "$LOGS/bench_cuda.json" --no-progress
step bandwidth 60 "$PY" benchmarks/bandwidth.py --device cuda --k 8 --shape 4096x11008 --repeats 20 \
  --json "$LOGS/bandwidth_cuda.json"
step ace 40 "$PY" benchmarks/bench_ace.py --device cuda --preset llama-7b-block --experts 4 --gate off on \
  --repeats 3 --json "$LOGS/ace_cuda.json"
step wudi 20 "$PY" benchmarks/wudi_loss.py --device cuda
step merge-check 50 "$PY" benchmarks/device_merge_check.py --dir /tmp/mk_device_models \
  --methods task_arithmetic ties dare_ties breadcrumbs della --json "$LOGS/merge_check.json"
exit "$FAILED"
