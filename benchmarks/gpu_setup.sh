# Sourced by the session scripts on the GPU machine: install the package (no deps: the
# machine has no registry), record the GPU and versions in $OUT/env.txt.
set -o pipefail
: "${OUT:?set OUT}"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv > "$OUT/env.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" >> "$OUT/env.txt"

# gpu_tests SECONDS LOG PYTEST_ARGS...: the gpu-marked tests, verbose, into LOG; prints the
# PASS / FAIL / ERROR lines (and slow-test durations).
gpu_tests() {
  local seconds=$1 log=$2
  shift 2
  timeout "$seconds" python3 -m pytest -v -p no:cacheprovider -rfE --tb=short -m gpu "$@" \
    > "$log" 2>&1
  grep -E "PASS|FAIL|ERROR|s call" "$log" | cut -c1-150 | tail -30
}
