#!/bin/bash
# One device call (round 5, third session, see RESULTS-seed.md): the GPU tests, then the eager reference of this
# tree against the previous session's (.whl/prev_ref = `git archive c7ea7c3 reference`), interleaved
# prev/new/prev/new in one call so that the host's drift hits both; FAST=1 also times the fast path (all 512
# requests, best configuration). Logs under $OUT.
#   run (device tool): bash bench/gpu_round5.sh   carry: [".whl"]
set -o pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
lscpu | grep -E "Model name|^CPU\(s\)|MHz" | tee "$OUT/lscpu.txt"
B="python3 bench/seed_benchmark.py"
if [ -z "$SKIP_TESTS" ]; then
  timeout 200 python3 -m pytest -m gpu tests/reference -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -4
fi
for i in $(seq 1 "${REPS:-2}"); do
  for side in prev new; do
    echo "=== eager $side $i (at ${SECONDS}s)"
    if [ $side = prev ]; then RP=.whl/prev_ref; else RP=; fi
    REFERENCE_PATH=$RP timeout 90 $B --out "$OUT/eager_${side}_$i" --parts eager2 > "$OUT/eager_${side}_$i.log" 2>&1
    grep "eager2\]" "$OUT/eager_${side}_$i.log" | cut -c1-400
  done
done
if [ -n "$FAST" ]; then
  echo "=== fast (at ${SECONDS}s)"
  timeout $((580 - SECONDS)) $B --out "$OUT/fast" --parts opt --opt-batches 8 \
    --opt-only "fast bf16 triton+compile" 2>&1 | tee "$OUT/fast.log" | grep -E "^\[(fast|opt|fail)\]"
fi
echo "done at ${SECONDS}s"
