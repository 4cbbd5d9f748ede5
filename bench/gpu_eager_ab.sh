set -o pipefail
OUT=${OUT:-out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
timeout 200 python3 bench/eager_ab.py 2>&1 | tee $OUT/eager_ab.log | grep -v Decoding
echo "=== old (at ${SECONDS}s)"
REFERENCE_PATH=.whl/old_ref timeout 100 python3 bench/seed_benchmark.py --out $OUT/old --parts eager2 2>&1 | grep "eager2\]" | cut -c1-300
echo "=== new (at ${SECONDS}s)"
timeout 120 python3 bench/seed_benchmark.py --out $OUT/new --parts eager2 2>&1 | tee $OUT/eager_new.log | grep -v "^Decoding" | grep -v "^\[t\]\|not asked\|raise Runtime\|Traceback\|File " | head -60
echo "done at ${SECONDS}s"
