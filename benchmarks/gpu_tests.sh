#!/usr/bin/env bash
# Every gpu-marked and kernel test on the GPU, in parallel groups (Triton compiles on the CPU
# cores; the GPU is mostly idle during tests), each group's log in $OUT/tests_<group>.log and
# a summary in $OUT/tests_summary.txt.   TEST_S: time limit per group (s, default 420);
# ONLY: the groups to run (default all), e.g. ONLY="gpu w4a16_kernels".
set -o pipefail
: "${OUT:?set OUT to a results folder}"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
declare -A GROUPS_=(
  [gpu]="tests/test_gpu.py"
  [w4a16_kernels]="tests/test_lowering_w4a16.py"
  [backend_hf]="tests/test_backend.py tests/test_hf_models.py tests/test_fuse.py"
  [w4a8]="tests/test_w4a8.py"
  [kv4]="tests/test_kv4.py"
  [decode_t]="tests/test_kv4.py -k transposed_decode"  # (a subset of kv4: its gpu-only failures)
  [decode]="tests/test_decode_attention.py"
)
for g in ${ONLY:-${!GROUPS_[@]}}; do
  # shellcheck disable=SC2086
  # SIGINT at the limit: pytest stops and still prints its failures (and hypothesis its
  # falsifying examples) instead of dying silently mid-run
  timeout -s INT -k 30 "${TEST_S:-420}" python3 -m pytest -q -p no:cacheprovider -rfE --tb=short \
    --durations=8 ${GROUPS_[$g]} > "$OUT/tests_$g.log" 2>&1 &
done
wait
for g in ${ONLY:-${!GROUPS_[@]}}; do
  echo "== $g: $(grep -E '^(FAILED|ERROR)|passed|failed' "$OUT/tests_$g.log" | tail -12)"
done | tee "$OUT/tests_summary.txt"
