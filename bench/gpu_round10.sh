#!/bin/bash
# Round 7 of the fast path (sixth session), one device call: the kernel tests compiled on the card (the folded
# split combine, the one-kernel cross-attention block), the attention alone per variant (bf16 and float8, folded
# combine or the combine kernel; each in its own process with its own Triton cache, whose PTX instruction mix is
# counted), the ablation rows R7.0-R7.5 (3 batches each, one process), then the round-7 defaults and the float8
# cache over all 512 requests.
#   run (device tool): bash bench/gpu_round10.sh      carry: [".whl"]
# SKIP_TESTS=1 / SKIP_ATTN=1 / SKIP_OPT=1 / SKIP_FAST=1 leave out those parts; GPU_TESTS=1 adds the GPU tests of
# tests/reference; PARITY=1 the float8 cache's parity (teacher-forced logits vs fp32 sdpa, prior on and off).
set -o pipefail
source bench/device_env.sh  # $OUT, NeMo wheels, PYTHONPATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
if [ -z "$SKIP_TESTS" ]; then
  timeout 150 python3 -m pytest tests/reference/test_kernels.py -q -p no:cacheprovider -k "${KERNEL_TESTS:-}" 2>&1 \
    | tee "$OUT/pytest-kernels.log" | tail -4
  [ -n "$GPU_TESTS" ] && timeout 240 python3 -m pytest -m gpu tests/reference -q -p no:cacheprovider 2>&1 \
    | tee "$OUT/pytest-gpu.log" | tail -4
fi
attn() {  # label, attn_sweep.py arguments: one tile in a fresh process with a fresh Triton cache
  local label=$1; shift
  local tc="$OUT/tc/$label"; mkdir -p "$tc"
  TRITON_CACHE_DIR="$tc" timeout 90 python3 bench/attn_sweep.py "$@" 2>&1 | grep -E "^\| [0-9]|rror" \
    | sed "s/^/$label /" | tee -a "$OUT/attn_variants.md"
  local ptx; ptx=$(find "$tc" -name "split_kernel*.ptx" | head -1)
  [ -n "$ptx" ] && echo "$label ptx: $(wc -l < "$ptx") lines; $(grep -oE "^\s*(fma|mul|add|sub|cvt|max|neg)[.a-z0-9]*" "$ptx" \
    | sed 's/^\s*//' | sort | uniq -c | sort -rn | head -12 | awk '{printf "%s %s, ", $1, $2}')" | tee -a "$OUT/ptx.txt"
  rm -rf "$tc"
}
if [ -z "$SKIP_ATTN" ]; then
  attn bf16_fold --head-major --one 32,32,1,-
  attn bf16_nofold --head-major --no-fold --one 32,32,1,-
  attn bf16_fold_64w1 --head-major --one 64,64,1,-
  attn bf16_fold_64w2 --head-major --one 64,64,2,-
  attn fp8_nofold --fp8 --head-major --no-fold --one 64,64,1,-
  attn fp8_fold --fp8 --head-major --one 64,64,1,-
fi
if [ -z "$SKIP_OPT" ]; then
  O="R7.0 defaults (round 7),R7.1 defaults (round 7) + folded combine,R7.2 defaults (round 7) without xattn_fused"
  O="$O,R7.3 defaults (round 7) + float8 K/V cache,R7.4 float8 K/V cache without the folded combine"
  O="$O,R7.5 float8 K/V cache without xattn_fused"
  timeout 330 python3 bench/seed_benchmark.py --out "$OUT/opt" --parts opt --opt-batches 3 --opt-only "$O" 2>&1 \
    | tee "$OUT/opt.log" | grep -E "^\[(fast|fail|skip)\]"
fi
[ -z "$SKIP_FAST" ] && timeout 150 python3 bench/seed_benchmark.py --out "$OUT/fast" --parts fast,fast_fp8 2>&1 \
  | tee "$OUT/fast.log" | grep -E "^\[(fast|fail)\]"
[ -n "$PARITY" ] && PARITY_ONLY="fp32 triton+compile fp8 K/V,bf16 triton+compile fp8 K/V" \
  timeout 120 python3 bench/seed_benchmark.py --out "$OUT/parity" --parts parity_opt 2>&1 | tee "$OUT/parity.log" \
  | grep -E "^\[(parity_opt|fail)\]" | cut -c1-400
exit 0
