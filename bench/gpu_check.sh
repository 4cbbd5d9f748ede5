#!/bin/bash
# One device call: the fast-path tests (CPU ones and the @gpu ones) and the seed benchmark, logs under $OUT.
#   run (device tool): bash bench/gpu_check.sh      carry: [".whl"]   (.whl: nemo_toolkit-3.0.0 wheel, see NOTES-fast.md)
set -o pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/nvidia-smi.txt"
[ -n "$SKIP_TESTS" ] || timeout 240 python3 -m pytest tests/reference/test_fast.py -q -p no:cacheprovider -x 2>&1 | tee "$OUT/pytest.log" | tail -15
timeout ${BENCH_TIMEOUT:-420} python3 bench/seed_benchmark.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^Decoding"
