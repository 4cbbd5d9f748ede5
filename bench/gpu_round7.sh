#!/bin/bash
# Round 5 of the fast path (fourth session), one device call: GPU tests (the new kernels compiled on the card, the
# fast path against the eager reference, the decoder against NeMo's module), the attention and cross-attention
# kernel sweeps (their best tiles go on as ATTN_KW / XATTN_KW), the cumulative ablation R5.0..R5.7 (3 batches x 480
# steps each), a profile of the best configuration at steps 220..259; GEMM=1 adds the cuBLAS-vs-Triton GEMM sweep,
# PARITY=1 the fp32 parity of the fast variants.   run (device tool): bash bench/gpu_round7.sh   carry: [".whl"]
set -o pipefail
source bench/device_env.sh  # $OUT, NeMo wheels, PYTHONPATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__)"
if [ -z "$SKIP_TESTS" ]; then
  timeout 150 python3 -m pytest tests/reference/test_kernels.py -q -p no:cacheprovider -x 2>&1 | tee "$OUT/pytest-kernels.log" | tail -4
  timeout 240 python3 -m pytest -m gpu tests/reference -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.log" | tail -3
fi
if [ -z "$SKIP_SWEEPS" ]; then
  timeout 90 python3 bench/attn_sweep.py 2>&1 | tee "$OUT/attn_sweep.md"
  timeout 60 python3 bench/xattn_sweep.py 2>&1 | tee "$OUT/xattn_sweep.md"
fi
export ATTN_KW=${ATTN_KW:-$(grep -s "^BEST " "$OUT/attn_sweep.md" | cut -c6-)} XATTN_KW=${XATTN_KW:-$(grep -s "^BEST " "$OUT/xattn_sweep.md" | cut -c6-)}
echo "ATTN_KW=$ATTN_KW XATTN_KW=$XATTN_KW"
O=${OPT_ONLY:-"R5.0 triton+compile as round 4,R5.1 + 2 warps,R5.2 + uncond rows skip xattn,R5.3 + shared uncond prefix,R5.4 + xattn kernel,R5.5 + topk kernel,R5.6 + fused layer tails (= round-5 defaults),R5.7 defaults + ATTN_KW + XATTN_KW"}
timeout ${BENCH_TIMEOUT:-240} python3 bench/seed_benchmark.py --out "$OUT/opt" --parts opt,profile_opt --opt-batches 3 \
  --opt-only "$O" --profile-attn triton --profile-from 220 2>&1 | tee "$OUT/opt.log" | grep -E "^\[(fast|fail|skip)\]"
[ -n "$GEMM" ] && timeout 90 python3 bench/gemm_sweep.py 2>&1 | tee "$OUT/gemm_sweep.md"
[ -n "$PARITY" ] && timeout 150 python3 bench/seed_benchmark.py --out "$OUT/parity" --parts parity_opt 2>&1 \
  | tee "$OUT/parity.log" | grep -E "^\[(parity_opt|fail)\]" | cut -c1-400
exit 0
