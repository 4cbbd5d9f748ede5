#!/bin/bash
# Round 7 of the fast path (sixth session), launch overheads: the ablation rows R7.0-R7.3 (the FFN's GELU as a
# cuBLASLt epilogue, bf16 and float8 cache; 3 batches each, one process), then R7.0 / R7.2 again with inductor's
# programmatic dependent launch (TORCHINDUCTOR_ENABLE_PDL=1) and with torch's GEMMs sent to cuBLASLt
# (BENCH_BLAS=cublaslt), each in a process of its own with its own inductor cache. (Run AK also printed CUDA's
# torch._addmm_activation GELU against tanh and erf; tests/reference/test_fast.py checks that now, TESTS=1.)
#   run (device tool): bash bench/gpu_round10.sh      carry: [".whl"]
# SKIP_OPT=1 leaves out the rows; TESTS=1 first runs the kernel tests compiled and the GPU tests; FAST=1 then times
# the defaults and the float8 cache over all 512 requests (with peak memory); PARITY=1 the float8 cache's parity
# (teacher-forced logits vs fp32 sdpa, prior on and off); SPLITK=1 the rows R7.6-R7.9 (split-K Triton GEMM for one
# product at a time, run AN) against R7.1.
set -o pipefail
source bench/device_env.sh  # $OUT, NeMo wheels, PYTHONPATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
[ -n "$TESTS" ] && run_gpu_tests  # bench/device_env.sh
opt() {  # label, rows (comma-separated), then env assignments
  local label=$1 rows=$2; shift 2
  env "$@" TORCHINDUCTOR_CACHE_DIR="/tmp/ind_$label" timeout 200 python3 bench/seed_benchmark.py --out "$OUT/opt_$label" \
    --parts opt --opt-batches 3 --opt-only "$rows" 2>&1 | tee "$OUT/opt_$label.log" | grep -E "^\[(fast|fail|skip|t\] preferred)" \
    | sed "s/^/$label /"
}
# (labels as renamed after run AK, where R7.0 / R7.2 were the then defaults without the epilogue)
R="R7.0 round-6 defaults (no GELU epilogue),R7.1 + GELU epilogue (round-7 default)"
R2="R7.2 float8 K/V cache without GELU epilogue"
if [ -z "$SKIP_OPT" ]; then
  opt base "$R,$R2,R7.3 float8 K/V cache + GELU epilogue" X=1
  opt pdl "R7.0 round-6 defaults (no GELU epilogue),$R2" TORCHINDUCTOR_ENABLE_PDL=1
  opt cublaslt "$R" BENCH_BLAS=cublaslt
fi
if [ -n "$SPLITK" ]; then
  S="R7.1 + GELU epilogue (round-7 default),R7.6 split-K for the FFN's o_net only"
  S="$S,R7.7 split-K for the FFN's o_net only in 4 slices,R7.8 split-K for the self-attention's o_net only"
  opt splitk "$S,R7.9 split-K for the cross-attention's q_net and o_net only" X=1
fi
[ -n "$FAST" ] && timeout 150 python3 bench/seed_benchmark.py --out "$OUT/fast" --parts fast,fast_fp8 2>&1 \
  | tee "$OUT/fast.log" | grep -E "^\[(fast|fail)\]"
[ -n "$PARITY" ] && PARITY_ONLY="fp32 triton+compile fp8 K/V,bf16 triton+compile,bf16 triton+compile fp8 K/V" \
  timeout 150 python3 bench/seed_benchmark.py --out "$OUT/parity" --parts parity_opt 2>&1 | tee "$OUT/parity.log" \
  | grep -E "^\[(parity_opt|fail)\]" | cut -c1-400
exit 0
