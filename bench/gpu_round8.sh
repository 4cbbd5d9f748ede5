#!/bin/bash
# Round 6 of the fast path (fifth session), one device call: the kernel tests compiled on the card (the float8 K/V
# cache's write bit for bit against reference.kernels.fp8_quantize), attention sweeps -- bf16 position- and
# head-major (3 tiles each), float8 both layouts (each tile in its own process) -- whose best tiles go on as ATTN_KW /
# ATTN_KW_FP8, the ablation R5.6 (defaults), R5.7 (+ ATTN_KW), R6.2 (+ head-major), R6.0 / R6.1 (float8 cache with the
# defaults' / its best tiles), 3 batches each in one process, then the defaults and the float8 cache over all 512
# requests.
#   run (device tool): bash bench/gpu_round8.sh      carry: [".whl"]
# KERNEL_TESTS: the kernel tests' -k expression (default all; "float8 or fp8": the float8 ones); SKIP_TESTS=1,
# SKIP_FAST=1 leave out the tests / the 512-request runs; PARITY=1 adds the float8 cache's parity (teacher-forced
# logits vs fp32 sdpa, prior on and off); PROFILE=1 a profile of the float8 cache at steps 220..259; GPU_TESTS=1 the
# GPU tests of tests/reference too; OPT_ONLY="label,label": after the tests, only those ablation rows.
set -o pipefail
source bench/device_env.sh  # $OUT, NeMo wheels, PYTHONPATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
if [ -z "$SKIP_TESTS" ]; then
  timeout 120 python3 -m pytest tests/reference/test_kernels.py -q -p no:cacheprovider -k "${KERNEL_TESTS:-}" 2>&1 \
    | tee "$OUT/pytest-kernels.log" | tail -4
  [ -n "$GPU_TESTS" ] && timeout 240 python3 -m pytest -m gpu tests/reference -q -p no:cacheprovider 2>&1 \
    | tee "$OUT/pytest-gpu.log" | tail -4
fi
if [ -n "$OPT_ONLY" ]; then  # just these ablation rows (comma-separated labels), 3 batches each
  timeout 300 python3 bench/seed_benchmark.py --out "$OUT/opt" --parts opt --opt-batches 3 --opt-only "$OPT_ONLY" 2>&1 \
    | tee "$OUT/opt.log" | grep -E "^\[(fast|fail|skip|opt)\]"
  exit 0
fi
best() {  # the faster of two sweep outputs' BEST lines
  awk '/^BEST_US/ {print $2, FILENAME}' "$@" | sort -n | head -1 | cut -d" " -f2 | xargs grep "^BEST " | cut -c6-
}
timeout 60 python3 bench/attn_sweep.py --short 2>&1 | tee "$OUT/attn_sweep_bf16.md"
timeout 60 python3 bench/attn_sweep.py --short --head-major 2>&1 | tee "$OUT/attn_sweep_bf16_hm.md"
timeout 150 python3 bench/attn_sweep.py --fp8 2>&1 | tee "$OUT/attn_sweep_fp8.md"
timeout 150 python3 bench/attn_sweep.py --fp8 --head-major 2>&1 | tee "$OUT/attn_sweep_fp8_hm.md"
export ATTN_KW=${ATTN_KW:-$(grep -s "^BEST " "$OUT/attn_sweep_bf16.md" | cut -c6-)}
export ATTN_KW_FP8=${ATTN_KW_FP8:-$(best "$OUT/attn_sweep_fp8.md" "$OUT/attn_sweep_fp8_hm.md")}
echo "ATTN_KW=$ATTN_KW ATTN_KW_FP8=$ATTN_KW_FP8"
O="R5.6 + fused layer tails (= round-5 defaults),R5.7 defaults + ATTN_KW + XATTN_KW,R6.2 defaults + head-major cache + ATTN_KW"
O="$O,R6.0 defaults + float8 K/V cache,R6.1 float8 K/V cache + ATTN_KW_FP8"
timeout 240 python3 bench/seed_benchmark.py --out "$OUT/opt" --parts opt --opt-batches 3 --opt-only "$O" 2>&1 \
  | tee "$OUT/opt.log" | grep -E "^\[(fast|fail|skip)\]"
[ -z "$SKIP_FAST" ] && timeout 150 python3 bench/seed_benchmark.py --out "$OUT/fast" --parts fast,fast_fp8 2>&1 \
  | tee "$OUT/fast.log" | grep -E "^\[(fast|fail)\]"
[ -n "$PARITY" ] && PARITY_ONLY="bf16 triton+compile,fp32 triton+compile fp8 K/V,bf16 triton+compile fp8 K/V" \
  timeout 120 python3 bench/seed_benchmark.py --out "$OUT/parity" --parts parity_opt 2>&1 | tee "$OUT/parity.log" \
  | grep -E "^\[(parity_opt|fail)\]" | cut -c1-400
[ -n "$PROFILE" ] && PROFILE_FP8=1 timeout 90 python3 bench/seed_benchmark.py --out "$OUT/prof" --parts profile_opt \
  --profile-attn triton --profile-from 220 2>&1 | tail -3
exit 0
