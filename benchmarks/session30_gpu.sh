#!/usr/bin/env bash
# Thirtieth session's device calls (written in the twenty-ninth); PART is a comma-separated
# list of:
#   e2e:     probe_e2e_long.py, W4A16 vs W4A16 + KV4 at an 8000-token context: each kernel's
#            GPU time and the host's CPU ops per decode step, from replays of the compiled step.
#   pdlrows: decode_t's split reduce under PDL at B = 2 / 4 / 8 (64-256 rows), where the
#            `_REDUCE_PDL` cutoff (32 rows) is untimed.
#   tkeys:   keys per channel on decode_t (4 and 8 head columns) beside per-token keys and SDPA,
#            and a sweep of 2 / 3 stages at the waves of 10-12 programs per SM (offline: 8
#            columns at 2 stages take 168 registers and 17.0 KB, 12 per SM).
#   tune:    the autotuned KV4 op tests at 32k (per token and per channel), long time limit.
#   shipped: the KV4 gpu tests of decode_t, the defaults, the reduce under PDL.
#   w4a16:   the full W4A16 benchmark (bench_w4a16.py, shipped configs) for the README's table.
#   threads: first-use tuning with the candidates compiled on 1 / 8 / 16 threads
#            (`QCOMPILE_TUNE_THREADS`, off by default): its gpu test, then the wall time
#            (probe_tune_threads.py, fresh caches per run).
source benchmarks/gpu_setup.sh
for part in ${PART//,/ }; do
  mkdir -p "$OUT/$part"
  case "$part" in
    e2e)
      TORCH_LOGS=perf_hints timeout "${E2E_S:-300}" python3 benchmarks/probe_e2e_long.py \
        --layers "${LAYERS:-8}" --out "$OUT/$part" ${E2E_ARGS:-} > "$OUT/$part/e2e_long.log" 2>&1
      grep -iE "skipping cudagraph|^w4a16|error" "$OUT/$part/e2e_long.log" | head -20
      for f in "$OUT/$part"/decode_kernels_*.txt; do echo "== $f"; head -14 "$f"; tail -1 "$f"; done
      grep -E "Cache Lookup|Compiled Region|CPU time total" "$OUT/$part"/decode_host_*.txt | cut -c1-160
      ;;
    pdlrows)
      (cd benchmarks && timeout "${PROBE_S:-200}" python3 probe_kv4_decode.py --dtype float16 \
        --kinds decode_t --t-rows 4 --prefetch 1 --stage-v 1 --tiles 32x1 --stages 3 \
        --grouped 0 --top 8 --splits "${SPLITS:-24,48,96}" --reduce-pdl 0,1 \
        --shapes "${SHAPES:-2x8192,4x8192,8x8192,2x32768,8x32768}" --out "$OUT/$part/probe.json") \
        2>&1 | tee "$OUT/$part/probe.log" | grep -v "^check decode \|^check decode_grouped" | tail -45
      ;;
    tkeys)
      timeout "${PROBE_S:-420}" python3 benchmarks/probe_kv4_key_channels.py --out "$OUT/$part" \
        --batches "${BATCHES:-16,64,1}" --lengths 32768,8192 --prefill '' --sweep 2>&1 \
        | tee "$OUT/$part/probe.log" | grep -v sweep | tail -3
      cat "$OUT/$part"/*.md 2>/dev/null | grep "^| decode"
      ;;
    tune)
      gpu_tests "${TEST_S:-500}" "$OUT/$part/tests.log" tests/test_kv4.py --durations=10 \
        -k "op_on_cuda_tunes or op_on_cuda_keys_per_channel_tunes"
      ;;
    shipped)
      gpu_tests "${TEST_S:-400}" "$OUT/$part/tests.log" tests/test_shipped_configs.py \
        tests/test_kv4.py -k "${TESTS_K:-decode_t or generate_on_cuda_with or centered or switches or reduce_pdl or per_channel}"
      ;;
    w4a16)
      timeout "${BENCH_S:-420}" python3 benchmarks/bench_w4a16.py --out "$OUT/$part" \
        > "$OUT/$part/log.txt" 2>&1
      grep "^|" "$OUT/$part/log.txt" | tail -27
      ;;
    threads)
      gpu_tests "${TEST_S:-300}" "$OUT/$part/tests.log" tests/test_gpu.py -k autotune_on_threads
      timeout "${PROBE_S:-400}" python3 benchmarks/probe_tune_threads.py --out "$OUT/$part" \
        --threads "${THREADS:-1,16}" 2>&1 | tail -8
      ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
