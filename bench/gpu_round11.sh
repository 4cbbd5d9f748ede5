#!/bin/bash
# Round 7 of the fast path, second device call: the kernel tests compiled on the card (programmatic dependent launch
# drawn per example) and the GPU tests of tests/reference, then the ablation rows R7.1 / R7.4 / R7.3 / R7.5 (GELU
# epilogue without and with PDL of the triton kernels, bf16 and float8 cache; 3 batches each, one process), then
# the same rows with inductor's PDL too (TORCHINDUCTOR_ENABLE_PDL=1, a process of its own, its own inductor cache).
#   run (device tool): bash bench/gpu_round11.sh      carry: [".whl"]
set -o pipefail
source bench/device_env.sh  # $OUT, NeMo wheels, PYTHONPATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
if [ -z "$SKIP_TESTS" ]; then
  timeout 150 python3 -m pytest tests/reference/test_kernels.py -q -p no:cacheprovider 2>&1 \
    | tee "$OUT/pytest-kernels.log" | tail -3
  timeout 240 python3 -m pytest -m gpu tests/reference -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.log" | tail -3
fi
opt() {  # label, rows (comma-separated), then env assignments
  local label=$1 rows=$2; shift 2
  env "$@" TORCHINDUCTOR_CACHE_DIR="/tmp/ind_$label" timeout 200 python3 bench/seed_benchmark.py --out "$OUT/opt_$label" \
    --parts opt --opt-batches 3 --opt-only "$rows" 2>&1 | tee "$OUT/opt_$label.log" | grep -E "^\[(fast|fail|skip)\]" \
    | sed "s/^/$label /"
}
R="R7.1 + GELU epilogue (round-7 default),R7.4 + GELU epilogue + PDL,R7.3 float8 K/V cache + GELU epilogue"
R="$R,R7.5 float8 K/V cache + GELU epilogue + PDL"
opt base "$R" X=1
opt inductor_pdl "$R" TORCHINDUCTOR_ENABLE_PDL=1
exit 0
