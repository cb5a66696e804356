#!/usr/bin/env bash
# Fifteenth session, one device call: the GPU tests of the groups this and the last session
# touched (in parallel), then the end-to-end W4A16 + KV4 decode at a long prompt through the
# CLI (Llama-3-8B shapes, random weights). Logs land in $OUT.
#   PART=tests|e2e|both (default both); TEST_S: per test group (s); E2E_ARGS: bench flags;
#   GPU_K: a `pytest -k` selection of tests/test_gpu.py run first (e.g. "split_k_first").
source benchmarks/gpu_setup.sh
if [ -n "${GPU_K:-}" ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_gpu.py -k "$GPU_K" \
    2>&1 | tail -8 | tee "$OUT/tests_selected.log"
fi
if [ "${PART:-both}" != e2e ]; then
  ONLY="${ONLY:-gpu backend_hf kv4}" TEST_S="${TEST_S:-330}" bash benchmarks/gpu_tests.sh
fi
if [ "${PART:-both}" != tests ]; then
  # shellcheck disable=SC2086
  timeout "${E2E_S:-240}" python3 -m qcompile.cli bench --model benchmarks/configs/llama-3-8b \
    --random-weights ${E2E_ARGS:---batch 1 --prompt-tokens 8000 --new-tokens 64 --kv4 token} \
    2>&1 | grep -v "Warning\|warn(" | tee "$OUT/e2e.txt"
fi
