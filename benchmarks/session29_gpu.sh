#!/usr/bin/env bash
# Twenty-ninth session's device calls; PART is a comma-separated list of:
#   tkeys:   decode_t over keys per channel (the halved key by one fp16 FMA, its own wave of
#            10 programs per SM): its gpu test, then timed beside the decode kernel and
#            per-token keys (probe_kv4_key_channels.py, 4 and 8 head columns).
#   shipped: the KV4 gpu tests of decode_t, the defaults, the reduce under PDL.
#   cur:     bench_kv4's decode table with the shipped configs (SDPA in the same call).
#   e2e:     probe_e2e_long.py, W4A16 vs W4A16 + KV4 at an 8000-token context, with each
#            kernel's GPU time per decode step from replays of the compiled step.
source benchmarks/gpu_setup.sh
for part in ${PART//,/ }; do
  mkdir -p "$OUT/$part"
  case "$part" in
    tkeys)
      timeout "${TEST_S:-150}" python3 -m pytest -v -p no:cacheprovider -rfE --tb=short -m gpu \
        tests/test_kv4.py -k "keys_per_channel" 2>&1 | grep -E "PASS|FAIL|ERROR|Error" \
        | cut -c1-150
      timeout "${PROBE_S:-240}" python3 benchmarks/probe_kv4_key_channels.py --out "$OUT/$part" \
        --batches "${BATCHES:-16,64,1}" --lengths 32768,8192 --prefill '' 2>&1 | tail -3
      cat "$OUT/$part"/*.md 2>/dev/null | grep "^| decode"
      ;;
    shipped)
      timeout "${TEST_S:-300}" python3 -m pytest -v -p no:cacheprovider -rfE --tb=short -m gpu \
        tests/test_shipped_configs.py tests/test_kv4.py \
        -k "${TESTS_K:-decode_t or op_on_cuda_tunes or generate_on_cuda_with or centered or switches or reduce_pdl or per_channel}" \
        > "$OUT/$part/tests.log" 2>&1
      grep -E "PASS|FAIL|ERROR" "$OUT/$part/tests.log" | cut -c1-150 | tail -30
      ;;
    cur)
      (cd benchmarks && timeout 150 python3 bench_kv4.py --out "$OUT/$part" --batches 16,64,1 \
        --lengths 32768,8192 --prefill '') 2>&1 | grep "^| [0-9]"
      ;;
    e2e)
      TORCH_LOGS=perf_hints timeout "${E2E_S:-300}" python3 benchmarks/probe_e2e_long.py \
        --layers "${LAYERS:-8}" --out "$OUT/$part" > "$OUT/$part/e2e_long.log" 2>&1
      grep -iE "skipping cudagraph|^w4a16|error" "$OUT/$part/e2e_long.log" | head -20
      for f in "$OUT/$part"/decode_kernels_*.txt; do echo "== $f"; head -14 "$f"; tail -1 "$f"; done
      ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
