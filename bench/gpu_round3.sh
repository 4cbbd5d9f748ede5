#!/bin/bash
# One device call (round 3, see RESULTS-seed.md): eager reference now vs the previous commit's reference on the same
# card, the triton attention with and without its fused cache write, GPU tests, fp32/bf16 parity of the fast
# variants, a profile at ~400 keys per row, then max-autotune GEMMs with what time is left. Logs under $OUT.
#   run (device tool): bash bench/gpu_round3.sh   carry: [".whl"]
#   .whl: nemo_toolkit-3.0.0, omegaconf-2.3.0, antlr4-python3-runtime-4.9.3 wheels; .whl/old_ref/reference: the
#   previous commit's reference/ (git archive <commit> reference | tar -x -C .whl/old_ref)
set -o pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/nvidia-smi.txt"
B="python3 bench/seed_benchmark.py"
part() {  # name, timeout, command...
  local name=$1 t=$2; shift 2
  local left=$((585 - SECONDS)); [ "$left" -lt "$t" ] && t=$left
  [ "$t" -lt 20 ] && { echo "[skip] $name: no time left"; return; }
  echo "=== $name (limit ${t}s, at ${SECONDS}s)"
  timeout "$t" "$@" 2>&1 | grep -v "^Decoding" | tee "$OUT/$name.log" | grep -E "^\[(eager2|fast|opt|fail|skip|parity_opt|info)\]|passed|failed|Error" | cut -c1-400
}
part eager_new 120 $B --out "$OUT/eager_new" --parts eager2
part eager_old 120 env REFERENCE_PATH=.whl/old_ref $B --out "$OUT/eager_old" --parts eager2
part opt 150 $B --out "$OUT/opt" --parts opt --opt-batches 2 --opt-only "fast bf16 triton+compile,fast bf16 triton+compile (separate kv write)"
part gpu_tests 180 python3 -m pytest -m gpu tests/reference -q -p no:cacheprovider
part profile 90 $B --out "$OUT/profile" --parts profile_opt --profile-attn triton --profile-from 220
part parity 180 $B --out "$OUT/parity" --parts parity_opt
part autotune 400 $B --out "$OUT/autotune" --parts opt --opt-batches 2 --opt-only "fast bf16 triton+compile+autotune"
echo "done at ${SECONDS}s"
