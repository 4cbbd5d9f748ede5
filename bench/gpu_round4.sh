#!/bin/bash
# One device call (round 4, see RESULTS-seed.md): the eager reference, this tree against the previous session's
# reference/ (.whl/old_ref, see gpu_round3.sh), interleaved old/new/old/new on one machine; a sweep of the triton
# attention's tile settings; the fast path (best tiles) over all 512 requests. Logs under $OUT.
#   run (device tool): bash bench/gpu_round4.sh   carry: [".whl"]
#   RUN_TESTS=1: the @gpu tests first; SWEEP=0: skip the tile sweep (default tiles only)
set -o pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
B="python3 bench/seed_benchmark.py"
if [ -n "$RUN_TESTS" ]; then  # the GPU tests first (RUN_TESTS=1)
  timeout 180 python3 -m pytest -m gpu tests/reference -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -4
fi
VARIANTS="fast bf16 triton+compile"
if [ "${SWEEP:-1}" = 1 ]; then  # SWEEP=0: no tile sweep, only the default tiles timed
  timeout 60 python3 bench/attn_sweep.py 2>&1 | tee "$OUT/attn_sweep.log"
  read -r _ KPS BN NW < <(grep '^BEST' "$OUT/attn_sweep.log")
  export ATTN_KW="{\"keys_per_split\": ${KPS:-64}, \"attn_block_n\": ${BN:-64}, \"attn_num_warps\": ${NW:-4}}"
  echo "ATTN_KW=$ATTN_KW"
  VARIANTS="$VARIANTS,fast bf16 triton+compile (ATTN_KW)"
fi
for i in 1 2; do
  for side in old new; do
    echo "=== eager $side $i (at ${SECONDS}s)"
    if [ $side = old ]; then RP=.whl/old_ref; else RP=; fi
    REFERENCE_PATH=$RP timeout 90 $B --out "$OUT/eager_${side}_$i" --parts eager2 > "$OUT/eager_${side}_$i.log" 2>&1
    grep "eager2\]" "$OUT/eager_${side}_$i.log" | cut -c1-160
  done
done
echo "=== fast (at ${SECONDS}s)"
timeout $((580 - SECONDS)) $B --out "$OUT/fast" --parts opt --opt-batches 8 \
  --opt-only "$VARIANTS" 2>&1 | tee "$OUT/fast.log" | grep -E "^\[(fast|opt|fail)\]"
echo "done at ${SECONDS}s"
