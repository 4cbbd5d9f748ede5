#!/bin/bash
# The one device command (issue 19; <= 600 s wall with the wheels' install): the GPU tests (the fast path with the
# local transformer, its Triton kernels compiled on the card, the decoder against NeMo's own module), then the batch
# sweep of both shapes -- the seed shape (decoder_context_tts, 160 context frames, 480 frames) and the released
# shape (v2607-like decoder_ce: 217 baked frames, stacking 2, the 2-layer autoregressive local transformer, 240
# decoder steps) -- at 64, 1, 8 and 32 requests (ms per decoder step, frames/s, x real time, time to the first
# frame), the released shape's fp32 parity with the local transformer, and NeMo's own loop (fp32, 64 requests) on
# each shape, each shape in its own process; one merged table (card and date on every row). Logs, results.json and
# table.md under $OUT; bench/RESULTS.md keeps the tables.
#   run (device tool): bash bench/gpu_check.sh      carry: [".whl"]
#   .whl: nemo_toolkit-3.0.0, omegaconf-2.3.0, antlr4-python3-runtime-4.9.3 wheels (pip download --no-deps)
# SKIP_TESTS=1 leaves the tests out; SEED_FULL=1 instead runs the seed shape's full benchmark as before issue 19
# (the eager reference, parity, the fast path and its float8 cache over 512 requests, NeMo's loop in fp32 and bf16).
# Further arguments go to every benchmark process (e.g. --quick).
set -o pipefail
source bench/device_env.sh  # $OUT, NeMo's wheels, PYTHONPATH, run_gpu_tests
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/nvidia-smi.txt"
T0=$SECONDS
[ -z "$SKIP_TESTS" ] && run_gpu_tests
echo "[t] tests: $((SECONDS - T0)) s"
if [ -n "$SEED_FULL" ]; then
  timeout ${EAGER_TIMEOUT:-150} python3 bench/seed_benchmark.py --out "$OUT/eager" --parts eager "$@" 2>&1 \
    | tee "$OUT/eager.log" | grep -E "^\[(eager|fail|t)\]" | cut -c1-300
  timeout ${BENCH_TIMEOUT:-300} python3 bench/seed_benchmark.py --out "$OUT/rest" --parts parity,fast,fast_fp8,nemo "$@" \
    2>&1 | tee "$OUT/bench.log" | grep -v "^Decoding"
  python3 bench/seed_benchmark.py --merge "$OUT/eager" "$OUT/rest" --out "$OUT"
  exit
fi
# what is left of the call's limit (WALL: 560 of a 600 s call, less for a shorter one; 20-40 s kept for the merge and
# the copy back), the released shape first (the targets)
WALL=${WALL:-560}
LEFT=$((WALL - SECONDS))
timeout $((LEFT * 11 / 20)) python3 bench/seed_benchmark.py --shape released --parts sweep,nemo,parity --sweep 64,1,8,32 \
  --budget-s $((LEFT * 11 / 20 - 60)) --out "$OUT/released" "$@" 2>&1 | tee "$OUT/released.log" \
  | grep -E "^\[(sweep|parity|nemo|fail|skip|t)\]" | cut -c1-400
LEFT=$((WALL + 10 - SECONDS))
timeout $LEFT python3 bench/seed_benchmark.py --shape seed --parts sweep,nemo --nemo-dtypes float32 --sweep 64,1,8,32 \
  --nemo-steps 1,160,320,478 --budget-s $((LEFT - 45)) --out "$OUT/seed" "$@" 2>&1 | tee "$OUT/seed.log" \
  | grep -E "^\[(sweep|nemo|fail|skip|t)\]" | cut -c1-400
# the device returns at most 8 files: once merged, the two runs' own files go (results.json holds every row)
python3 bench/seed_benchmark.py --merge "$OUT/released" "$OUT/seed" --out "$OUT" && rm -r "$OUT/released" "$OUT/seed"
