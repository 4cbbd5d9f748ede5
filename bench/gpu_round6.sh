#!/bin/bash
# One device call (round 6, third session): is the eager step slower in a process that imported NeMo first
# (the headline run measured 13.9 ms/step there, fresh processes 9.9)? eager2 alone / after the NeMo part /
# after the NeMo part with gc.freeze() / after the fast part, on one machine.   carry: [".whl"]
set -o pipefail
OUT=${OUT:-out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
B="python3 bench/seed_benchmark.py"
run() { echo "=== $1 (at ${SECONDS}s)"; shift; env "$@" > "$OUT/$N.log" 2>&1; grep -E "^\[eager2\]|^\[nemo" "$OUT/$N.log" | cut -c1-200; }
N=a run "eager2 alone" timeout 100 $B --out $OUT/a --parts eager2
N=b run "nemo then eager2" timeout 200 $B --out $OUT/b --parts nemo,eager2
N=c run "nemo then eager2, gc frozen" EAGER_GC=freeze timeout 200 $B --out $OUT/c --parts nemo,eager2
N=e run "fast (compile, graphs) then eager2" timeout 200 $B --out $OUT/e --parts fast,eager2
echo "done at ${SECONDS}s"
