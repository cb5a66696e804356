#!/usr/bin/env bash
# Thirty-second session's follow-ups (its own calls ran session31_gpu.sh: pdl, bench, bench16,
# pdle2e, tune; results/session32/). For the next session, in this order. PART is a
# comma-separated list of:
#   pdlaba:  probe_e2e_long.py --pdl --repeat 2 --no-profile at 16 layers: W4A16 and W4A16 +
#            KV4, plain and with the lane kernel's and Inductor's PDL, twice in turn (A/B/A/B).
#            One round (results/session32/pdle2e/) gave 3.23 -> 3.13 ms (W4A16) and 3.33 ->
#            3.18 ms (KV4) per step with PDL: decide `_LANE_PDL` / Inductor PDL on it.
#   tune:    the per-channel KV4 tuning tests left unchecked: bf16 at S = 32768, the 300-token
#            prefill (fp16 at 32768 passed in the thirty-second session).
#   shipped: the shipped-config and KV4 decode gpu tests.
#   threads: probe_tune_threads.py, first-use tuning wall time on 1 / 16 threads.
source benchmarks/gpu_setup.sh
for part in ${PART//,/ }; do
  mkdir -p "$OUT/$part"
  case "$part" in
    pdlaba)
      timeout "${E2E_S:-450}" python3 benchmarks/probe_e2e_long.py --layers "${LAYERS:-16}" \
        --pdl --repeat "${REPEAT:-2}" --no-profile --steps 32 --out "$OUT/$part" \
        > "$OUT/$part/e2e_long.log" 2>&1
      grep -E "^w4a16|rror" "$OUT/$part/e2e_long.log" | cut -c1-200 | head -20
      ;;
    tune)
      gpu_tests "${TEST_S:-450}" "$OUT/$part/tests.log" tests/test_kv4.py --durations=10 \
        -k "op_on_cuda_keys_per_channel_tunes and (1-32768-dtype1 or 300)"
      ;;
    shipped)
      gpu_tests "${TEST_S:-400}" "$OUT/$part/tests.log" tests/test_shipped_configs.py \
        tests/test_kv4.py -k "${TESTS_K:-decode_t or generate_on_cuda_with or reduce_pdl or per_channel}"
      ;;
    threads)
      timeout "${PROBE_S:-400}" python3 benchmarks/probe_tune_threads.py --out "$OUT/$part" \
        --threads "${THREADS:-1,16}" --cases "${CASES:-w4a16:256:28672:4096}" 2>&1 | tail -8
      ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
