#!/bin/bash
# Round 8 of the fast path (seventh session).
# (1) CFG's conditional and unconditional halves as two chains of layers on two CUDA streams inside the step's graph
#     (FastDecoder(cfg_streams=True), commit fe3644b, removed after runs AU-AW: slower with every stream priority).
#     Its rows R8.1, R8.3-R8.6 went with it; fe3644b has them and this script's version that ran them.
# (2) The step's prologue and epilogue fused (fuse_step_ends): rows R8.7-R8.10, off / on, exact and float8 cache.
#   run (device tool): bash bench/gpu_round11.sh      carry: [".whl"]
# ROWS: the --opt-only labels (default R8.7-R8.10, 3 batches each, one process); SKIP_OPT=1 leaves them out.
# TESTS=1 first runs the GPU tests and the kernel tests compiled; PARITY=1 the fp32 codes-vs-eager check of the
# default fast path and the bf16 teacher-forced check; PROFILE=1 torch.profiler tables and kernel timelines of steps
# 220-259, the defaults and with $PROFILE_KW (FastDecoder options, JSON), each timeline summarised by
# bench/trace_overlap.py; FAST=1 times the headline fast rows over all 512 requests.
set -o pipefail
source bench/device_env.sh  # $OUT, NeMo wheels, PYTHONPATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
[ -n "$TESTS" ] && run_gpu_tests  # bench/device_env.sh
if [ -z "$SKIP_OPT" ]; then
  R=${ROWS:-"R8.7 round-7 defaults without fused step ends,R8.8 + fused step ends,R8.9 float8 without fused step ends,R8.10 float8 + fused step ends"}
  TORCHINDUCTOR_CACHE_DIR=/tmp/ind_r8 timeout 400 python3 bench/seed_benchmark.py --out "$OUT/opt_r8" --parts opt \
    --opt-batches 3 --opt-only "$R" 2>&1 | tee "$OUT/opt_r8.log" | grep -E "^\[(fast|fail|skip|opt)"
fi
[ -n "$PARITY" ] && PARITY_ONLY="fp32 triton+compile,bf16 triton+compile" \
  timeout 200 python3 bench/seed_benchmark.py --out "$OUT/parity" --parts parity_opt 2>&1 | tee "$OUT/parity.log" \
  | grep -E "^\[(parity_opt|fail)\]" | cut -c1-400
if [ -n "$PROFILE" ]; then  # timelines of steps 220-259: the defaults, then with $PROFILE_KW
  for kw in '{}' ${PROFILE_KW:+"$PROFILE_KW"}; do
    d="$OUT/prof$([ "$kw" = '{}' ] || echo _kw)"
    PROFILE_TRACE=1 PROFILE_KW="$kw" timeout 200 python3 bench/seed_benchmark.py --out "$d" --parts profile_opt \
      --profile-attn triton --profile-from 220 > "$d.log" 2>&1
    for t in "$d"/trace-*.json; do python3 bench/trace_overlap.py "$t" | tee "${t%.json}.overlap.txt" | head -12; \
      gzip -f "$t"; done
  done
fi
[ -n "$FAST" ] && timeout 150 python3 bench/seed_benchmark.py --out "$OUT/fast" --parts fast,fast_fp8 2>&1 \
  | tee "$OUT/fast.log" | grep -E "^\[(fast|fail)\]"
exit 0
