#!/bin/bash
# The one device command: the GPU tests (the fast path, its Triton kernels compiled on the card, the decoder against
# NeMo's own module), then the seed benchmark -- the eager reference (fp32 / bf16, median of 3 interleaved runs each)
# in a fresh process, then parity, the fast path's defaults and its float8 K/V cache over all 512 requests, NeMo
# 3.0.0's loop (fp32 / bf16 autocast) in a second one -- and one merged table (card and date on every row). Logs,
# results.json and table.md under $OUT; bench/RESULTS.md keeps the tables.
#   run (device tool): bash bench/gpu_check.sh      carry: [".whl"]
#   .whl: nemo_toolkit-3.0.0, omegaconf-2.3.0, antlr4-python3-runtime-4.9.3 wheels (pip download --no-deps)
# SKIP_TESTS=1 leaves the tests out; further arguments go to both benchmark processes (e.g. --quick).
set -o pipefail
source bench/device_env.sh  # $OUT, NeMo wheels, PYTHONPATH, run_gpu_tests
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/nvidia-smi.txt"
[ -z "$SKIP_TESTS" ] && run_gpu_tests
# the eager reference first, in a fresh process (host-bound: nothing else loaded, nothing compiled yet)
timeout ${EAGER_TIMEOUT:-150} python3 bench/seed_benchmark.py --out "$OUT/eager" --parts eager "$@" 2>&1 \
  | tee "$OUT/eager.log" | grep -E "^\[(eager|fail|t)\]" | cut -c1-300
timeout ${BENCH_TIMEOUT:-300} python3 bench/seed_benchmark.py --out "$OUT/rest" --parts parity,fast,fast_fp8,nemo "$@" \
  2>&1 | tee "$OUT/bench.log" | grep -v "^Decoding"
python3 bench/seed_benchmark.py --merge "$OUT/eager" "$OUT/rest" --out "$OUT"
