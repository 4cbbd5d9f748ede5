#!/bin/bash
# Deferred value sums in the split-KV attention (attn_defer_sum), one device call: the kernel tests compiled on the
# card, attention sweeps with --defer (bf16 and float8, head-major; each tile in its own process) whose best tiles go
# on as ATTN_KW_DEFER / ATTN_KW_FP8_DEFER, then the ablation rows R6.3 / R6.6 (exact-path defaults without / with)
# and R6.4 / R6.7 (float8 cache without / with), 3 batches each in one process.
#   run (device tool): bash bench/gpu_round9.sh      carry: [".whl"]
set -o pipefail
source bench/device_env.sh  # $OUT, NeMo wheels, PYTHONPATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
[ -z "$SKIP_TESTS" ] && timeout 120 python3 -m pytest tests/reference/test_kernels.py -q -p no:cacheprovider 2>&1 \
  | tee "$OUT/pytest-kernels.log" | tail -4
timeout 150 python3 bench/attn_sweep.py --defer --head-major 2>&1 | tee "$OUT/attn_sweep_defer.md"
timeout 150 python3 bench/attn_sweep.py --defer --fp8 --head-major 2>&1 | tee "$OUT/attn_sweep_fp8_defer.md"
export ATTN_KW_DEFER=$(grep -s "^BEST " "$OUT/attn_sweep_defer.md" | cut -c6-)
export ATTN_KW_FP8_DEFER=$(grep -s "^BEST " "$OUT/attn_sweep_fp8_defer.md" | cut -c6-)
echo "ATTN_KW_DEFER=$ATTN_KW_DEFER ATTN_KW_FP8_DEFER=$ATTN_KW_FP8_DEFER"
O="R6.3 defaults (round 6),R6.6 defaults + deferred value sums,R6.4 defaults (round 6) + float8 K/V cache"
O="$O,R6.7 float8 K/V cache + deferred value sums"
timeout 240 python3 bench/seed_benchmark.py --out "$OUT/opt" --parts opt --opt-batches 3 --opt-only "$O" 2>&1 \
  | tee "$OUT/opt.log" | grep -E "^\[(fast|fail|skip)\]"
exit 0
