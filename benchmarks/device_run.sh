#!/usr/bin/env bash
# One call on a GPU machine: build for the local GPU, run the test suite (CUDA parity tests
# included), then the side-by-side benchmarks. Logs and JSON go to $OUT (or ./device_out).
# Usage: bash benchmarks/device_run.sh [extra bandwidth.py args]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1 || true
MK_CUDA=1 MK_CUDA_ARCHS=${MK_CUDA_ARCHS:-9.0} python -m pip install --no-build-isolation --no-deps -e . \
  > "$OUT/build.log" 2>&1 || { tail -n 60 "$OUT/build.log"; exit 1; }
python -m mergekernels info | tee "$OUT/info.txt"
python -m pytest tests -q -x -p no:cacheprovider > "$OUT/tests.log" 2>&1 || { tail -n 60 "$OUT/tests.log"; exit 1; }
tail -n 3 "$OUT/tests.log"
# The user-facing command (ceilings, then every case against its references), with its JSON.
python -m mergekernels bench --device cuda --json "$OUT/bench_cuda.json" | tee "$OUT/bench_cuda.txt"
python benchmarks/bandwidth.py --device cuda --repeats 20 --json "$OUT/results_cuda.json" "$@" | tee "$OUT/bandwidth.txt"
# ACE on one Llama-7B block (4 experts, fp32): gate off and on, full fp32 and TF32, next to the
# reference-style loop and checked against the float64 reference.
python benchmarks/bench_ace.py --device cuda --preset llama-7b-block --gate off on --repeats 3 \
  --json "$OUT/ace_cuda.json" | tee "$OUT/ace.txt"
python benchmarks/bench_ace.py --device cuda --preset llama-7b-block --gate off on --repeats 3 --tf32 \
  --json "$OUT/ace_cuda_tf32.json" | tee "$OUT/ace_tf32.txt"
python benchmarks/wudi_loss.py --device cuda | tee "$OUT/wudi.txt"
