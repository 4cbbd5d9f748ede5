#!/bin/bash
# Round 5 of the fast path (fourth session), one device call: GPU tests (the new kernels compiled on the card, the
# fast path against the eager reference, the decoder against NeMo's module), the cumulative ablation R5.0..R5.5
# (3 batches x 480 steps each), fp32 parity of the fast variants at topk=1, a profile of the new default at steps
# 220..259, and the attention / GEMM microbenchmarks.   run (device tool): bash bench/gpu_round7.sh   carry: [".whl"]
set -o pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__)"
if [ -z "$SKIP_TESTS" ]; then
  timeout 150 python3 -m pytest tests/reference/test_kernels.py -q -p no:cacheprovider -x 2>&1 | tee "$OUT/pytest-kernels.log" | tail -6
  timeout 240 python3 -m pytest -m gpu tests/reference -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.log" | tail -8
fi
O="R5.0 triton+compile as round 4,R5.1 + uncond rows skip xattn,R5.2 + shared uncond prefix (rows),R5.3 + shared uncond prefix (grouped),R5.4 + xattn kernel,R5.5 + topk kernel (= defaults)"
timeout ${BENCH_TIMEOUT:-240} python3 bench/seed_benchmark.py --out "$OUT/opt" --parts opt,profile_opt --opt-batches 3 \
  --opt-only "$O" --profile-attn triton --profile-from 220 2>&1 | tee "$OUT/opt.log" | grep -E "^\[(fast|fail|t|skip)\]|^\|"
timeout 60 python3 bench/attn_sweep.py 2>&1 | tee "$OUT/attn_sweep.md"
[ -n "$GEMM" ] && timeout 90 python3 bench/gemm_sweep.py 2>&1 | tee "$OUT/gemm_sweep.md"
[ -n "$PARITY" ] && timeout 150 python3 bench/seed_benchmark.py --out "$OUT/parity" --parts parity_opt 2>&1 \
  | tee "$OUT/parity.log" | grep -E "^\[(parity_opt|fail)\]" | cut -c1-400
exit 0
