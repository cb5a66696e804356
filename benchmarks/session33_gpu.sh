#!/usr/bin/env bash
# Thirty-third session's calls (its first two ran session32_gpu.sh: pdlaba, tune + shipped;
# results/session33/). PDL is on by default from this session (`_LANE_PDL`,
# `backend._INDUCTOR_PDL`). PART is a comma-separated list of:
#   pdltests: the gpu tests that run compiled models and the lane kernel, now under PDL: the
#             new PDL-on-vs-off bits test, CUDA graphs, sibling fusion, the lane-kernel PDL
#             tests, the HF models' gpu tests.
#   bench:    end to end, Llama-3-8B shapes, 8000-token prompt, batch 1, 64 new tokens.
#   bench16:  the same at batch 16, 32 new tokens.
source benchmarks/gpu_setup.sh
for part in ${PART//,/ }; do
  mkdir -p "$OUT/$part"
  case "$part" in
    pdltests)
      gpu_tests "${TEST_S:-240}" "$OUT/$part/tests.log" tests/test_gpu.py \
        tests/test_lowering_w4a16.py tests/test_hf_models.py \
        -k "${TESTS_K:-pdl or reduce_overhead or compiled or sibling or generate}"
      ;;
    bench)
      timeout "${BENCH_S:-300}" qcompile bench --model benchmarks/configs/llama-3-8b \
        --random-weights --batch 1 --prompt-tokens 8000 --new-tokens 64 --kv4 token \
        ${BENCH_ARGS:-} 2>&1 | tee "$OUT/$part/e2e.txt" | grep -v Warning | tail -8
      ;;
    bench16)
      timeout "${BENCH_S:-300}" qcompile bench --model benchmarks/configs/llama-3-8b \
        --random-weights --batch 16 --prompt-tokens 8000 --new-tokens 32 --kv4 token \
        ${BENCH16_ARGS:-} 2>&1 | tee "$OUT/$part/e2e.txt" | grep -v Warning | tail -8
      ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
