# Sourced by bench/gpu_check.sh: $OUT, NeMo's wheels from .whl (when the device call carries it: nemo_toolkit-3.0.0,
# omegaconf-2.3.0, antlr4-python3-runtime-4.9.3) into /tmp/site, and a PYTHONPATH with this checkout first. A failed
# wheel install stops the calling script. run_gpu_tests: the GPU tests (KERNEL_TESTS_TIMEOUT, GPU_TESTS_TIMEOUT s).
OUT=${OUT:-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
run_gpu_tests() {  # fastpath/kernels.py's tests compiled on the card, then the GPU tests; logs under $OUT
  # KERNEL_TESTS_TIMEOUT=0 leaves the kernel tests out (when fastpath/kernels.py is unchanged since they last ran)
  [ "${KERNEL_TESTS_TIMEOUT:-100}" != 0 ] && timeout ${KERNEL_TESTS_TIMEOUT:-100} python3 -m pytest \
    tests/fastpath/test_kernels.py -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest-kernels.log" | tail -2
  # the released shape's GPU tests (local transformer, generate_speech) first, each result on its own line as it
  # comes (-v), so a call cut short still tells which passed
  local first="local_transformer or generate_speech"
  timeout ${GPU_TESTS_TIMEOUT:-200} bash -c "python3 -m pytest -m gpu tests/fastpath -k '$first' -v -p no:cacheprovider; \
    python3 -m pytest -m gpu tests/reference tests/fastpath -k 'not ($first)' -v -p no:cacheprovider" 2>&1 \
    | tee "$OUT/pytest-gpu.log" | grep -E "PASSED|FAILED|ERROR|passed|failed" | cut -c1-200
}
