#!/bin/bash
# Round 8 of the fast path (seventh session): CFG's conditional and unconditional halves as two chains of layers on
# two CUDA streams inside the step's graph (FastDecoder(cfg_streams=True)), so that one half's latency-bound GEMMs
# and small kernels can run beside the other half's HBM-bound attention. Rows R8.0-R8.3 (exact and float8 cache,
# without / with the streams; 3 batches each, one process).
#   run (device tool): bash bench/gpu_round11.sh      carry: [".whl"]
# TESTS=1 first runs the cfg_streams GPU test and the kernel tests compiled; SKIP_OPT=1 leaves out the rows;
# PARITY=1 the fp32 codes-vs-eager check and the bf16 teacher-forced check of cfg_streams; PROFILE=1 a torch.profiler
# table of the exact path with cfg_streams (steps 220-259); FAST=1 times the headline fast rows over all 512 requests.
set -o pipefail
source bench/device_env.sh  # $OUT, NeMo wheels, PYTHONPATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
if [ -n "$TESTS" ]; then
  timeout 200 python3 -m pytest -m gpu tests/reference/test_fast.py -k "cfg_streams" -q -p no:cacheprovider 2>&1 \
    | tee "$OUT/pytest-gpu-cfg-streams.log" | tail -2
  [ -n "$KTESTS" ] && timeout 150 python3 -m pytest tests/reference/test_kernels.py -q -p no:cacheprovider 2>&1 \
    | tee "$OUT/pytest-kernels.log" | tail -2
fi
if [ -z "$SKIP_OPT" ]; then
  R=${ROWS:-"R8.0 round-7 defaults,R8.4 CFG halves with the conditional one first,R8.5 CFG halves with attention at low priority,R8.2 float8 K/V cache,R8.6 float8 + CFG halves with attention at low priority"}
  TORCHINDUCTOR_CACHE_DIR=/tmp/ind_r8 timeout 400 python3 bench/seed_benchmark.py --out "$OUT/opt_r8" --parts opt \
    --opt-batches 3 --opt-only "$R" 2>&1 | tee "$OUT/opt_r8.log" | grep -E "^\[(fast|fail|skip|opt)"
fi
[ -n "$PARITY" ] && PARITY_ONLY="fp32 triton+compile cfg_streams,bf16 triton+compile,bf16 triton+compile cfg_streams" \
  timeout 200 python3 bench/seed_benchmark.py --out "$OUT/parity" --parts parity_opt 2>&1 | tee "$OUT/parity.log" \
  | grep -E "^\[(parity_opt|fail)\]" | cut -c1-400
if [ -n "$PROFILE" ]; then  # timelines of steps 220-259: the defaults, then CFG halves on streams ($PROFILE_KW)
  SKW=${PROFILE_KW:-'{"cfg_streams": true}'}
  for kw in '{}' "$SKW"; do
    d="$OUT/prof$([ "$kw" = '{}' ] || echo _streams)"
    PROFILE_TRACE=1 PROFILE_KW="$kw" timeout 200 python3 bench/seed_benchmark.py --out "$d" --parts profile_opt \
      --profile-attn triton --profile-from 220 > "$d.log" 2>&1
    for t in "$d"/trace-*.json; do python3 bench/trace_overlap.py "$t" | tee "${t%.json}.overlap.txt" | head -12; \
      gzip -f "$t"; done
  done
fi
[ -n "$FAST" ] && timeout 150 python3 bench/seed_benchmark.py --out "$OUT/fast" --parts fast,fast_fp8 2>&1 \
  | tee "$OUT/fast.log" | grep -E "^\[(fast|fail)\]"
exit 0
