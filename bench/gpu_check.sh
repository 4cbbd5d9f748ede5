#!/bin/bash
# One device call: the GPU tests of the reference (fast path, its Triton kernels, and the decoder against NeMo's own
# module) and the seed benchmark's headline table (NeMo 3.0.0's loop fp32/bf16, eager reference fp32/bf16 as the median of 3
# interleaved runs each, the fast path's defaults over all 512 requests, and the same with the float8 K/V cache (not
# exact: its own row), parity), logs and
# results.json/table.md under $OUT.
#   run (device tool): bash bench/gpu_check.sh      carry: [".whl"]
#   .whl: nemo_toolkit-3.0.0, omegaconf-2.3.0, antlr4-python3-runtime-4.9.3 wheels (pip download --no-deps)
set -o pipefail
source bench/device_env.sh  # $OUT, NeMo wheels, PYTHONPATH
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/nvidia-smi.txt"
if [ -z "$SKIP_TESTS" ]; then
  timeout 240 python3 -m pytest -m gpu tests/reference tests/fastpath -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -15
  # fastpath/kernels.py compiled on the card (on the CPU these tests run the same kernels interpreted)
  timeout 120 python3 -m pytest tests/fastpath/test_kernels.py -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest-kernels.log" | tail -3
fi
# the eager reference first, in a fresh process (host-bound: nothing else loaded, nothing compiled yet), then the
# other parts in a second process, then one table of both
timeout ${EAGER_TIMEOUT:-150} python3 bench/seed_benchmark.py --out "$OUT/eager" --parts eager2 "$@" 2>&1 \
  | tee "$OUT/eager.log" | grep -E "^\[(eager2|fail|t)\]" | cut -c1-300
timeout ${BENCH_TIMEOUT:-300} python3 bench/seed_benchmark.py --out "$OUT/rest" --parts parity,fast,fast_fp8,nemo "$@" 2>&1 \
  | tee "$OUT/bench.log" | grep -v "^Decoding"
python3 bench/seed_benchmark.py --merge "$OUT/eager" "$OUT/rest" --out "$OUT"
