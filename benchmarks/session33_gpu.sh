#!/usr/bin/env bash
# For the next session (the thirty-third session's two calls ran session32_gpu.sh: pdlaba,
# tune + shipped, results/session33/). PDL is on by default (`_LANE_PDL`,
# `backend._INDUCTOR_PDL`); its gpu test of a compiled model passed in the thirty-fourth
# session (results/session34/pdltests/). pdltests now also holds `_KV4_PDL`'s untested gpu
# chain test; pdl32, bench and bench16 have not run with PDL yet. PART is a comma-separated
# list of:
#   pdltests: the gpu tests that run compiled models and the lane kernel, now under PDL: the
#             new PDL-on-vs-off bits test, CUDA graphs, sibling fusion, the lane-kernel PDL
#             tests, the HF models' gpu tests.
#   pdl32:    probe_e2e_long.py --pdl at 32 layers, plain against PDL (now the default),
#             rounds in A/B/B/A order: the 16-layer A/B/A/B of this session gave 8-10%.
#   bench:    end to end, Llama-3-8B shapes, 8000-token prompt, batch 1, 64 new tokens.
#   bench16:  the same at batch 16, 32 new tokens.
source benchmarks/gpu_setup.sh
for part in ${PART//,/ }; do
  mkdir -p "$OUT/$part"
  case "$part" in
    pdltests)
      gpu_tests "${TEST_S:-240}" "$OUT/$part/tests.log" tests/test_gpu.py \
        tests/test_lowering_w4a16.py tests/test_hf_models.py tests/test_kv4.py \
        -k "${TESTS_K:-pdl or reduce_overhead or compiled or sibling or generate or row_blocks}"
      ;;
    pdl32)
      timeout "${E2E_S:-450}" python3 benchmarks/probe_e2e_long.py --layers 32 --pdl \
        --repeat "${REPEAT:-2}" --no-profile --steps 32 --out "$OUT/$part" \
        > "$OUT/$part/e2e_long.log" 2>&1
      grep -E "^w4a16|rror" "$OUT/$part/e2e_long.log" | cut -c1-200 | head -20
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
