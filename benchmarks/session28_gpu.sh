#!/usr/bin/env bash
# Twenty-eighth session's device calls; PART is a comma-separated list of:
#   shipped: every shipped KV4 config (decode_t's six fp16 keys) against float64, and the KV4
#            gpu tests of the transposed kernel and the defaults.
#   splits:  decode_t at splits that fill the SMs' resident slots (one wave of 11-12 one-warp
#            programs per SM) against the shipped powers of two, fp16, 3 stages.
#   cur:     bench_kv4's decode table with the shipped configs (SDPA in the same call).
#   srs:     decode_t with the last program combining up to 8 / 16 / 128 splits itself.
#   pdl:     decode_t's split reduce under programmatic dependent launch (`_REDUCE_PDL`).
#   w4a16wave: the W4A16 lane kernel at M = 1 over grids past the tuner's split cap.
#   tkeys:   decode_t over keys per channel: gpu test and timing beside the current kernels.
#   e2e:     probe_e2e_long.py (W4A16 vs W4A16 + KV4 at an 8000-token context).
source benchmarks/gpu_setup.sh
for part in ${PART//,/ }; do
  mkdir -p "$OUT/$part"
  case "$part" in
    shipped)
      timeout "${TEST_S:-300}" python3 -m pytest -v -p no:cacheprovider -rfE --tb=short -m gpu \
        tests/test_shipped_configs.py tests/test_kv4.py \
        -k "${TESTS_K:-decode_t or op_on_cuda_tunes or generate_on_cuda_with or centered or switches}" \
        > "$OUT/$part/tests.log" 2>&1
      grep -E "PASS|FAIL|ERROR" "$OUT/$part/tests.log" | cut -c1-150 | tail -20
      ;;
    splits)
      (cd benchmarks && timeout "${PROBE_S:-300}" python3 probe_kv4_decode.py --dtype float16 \
        --kinds decode_t --t-rows 4,8 --prefetch 1 --stage-v 1 --tiles 32x1 --stages 3 \
        --grouped 0 --top 12 --splits "${SPLITS:-2,3,4,8,10,11,12,16,24,32,48,64,96,128}" \
        --shapes "${SHAPES:-16x8192,16x32768,64x8192,64x32768,1x8192,1x32768}" \
        --out "$OUT/$part/probe.json") 2>&1 | tee "$OUT/$part/probe.log" | grep -v "^check" | tail -90
      ;;
    srs)
      # the last program combining up to 16 / 128 splits itself vs a second launch past 8
      (cd benchmarks && timeout "${PROBE_S:-120}" python3 probe_kv4_decode.py --dtype float16 \
        --kinds decode_t --t-rows 4 --prefetch 1 --stage-v 1 --tiles 32x1 --stages "${STAGES:-3}" \
        --grouped 0 --top 12 --splits "${SPLITS:-12,32,64,128}" --self-reduce-splits 8,16,128 \
        --shapes "${SHAPES:-16x8192,1x8192,1x32768}" --out "$OUT/$part/probe.json") 2>&1 \
        | tee "$OUT/$part/probe.log" | grep -v "^check decode \|^check decode_grouped" | tail -45
      ;;
    pdl)
      # the split reduce launched with programmatic dependent launch (`_REDUCE_PDL`)
      (cd benchmarks && timeout "${PROBE_S:-150}" python3 probe_kv4_decode.py --dtype float16 \
        --kinds decode_t --t-rows 4 --prefetch 1 --stage-v 1 --tiles 32x1 --stages 3 \
        --grouped 0 --top 8 --splits "${SPLITS:-12,96,128}" --reduce-pdl 0,1 \
        --shapes "${SHAPES:-16x8192,16x32768,1x8192,1x32768}" --out "$OUT/$part/probe.json") \
        2>&1 | tee "$OUT/$part/probe.log" | grep -v "^check decode \|^check decode_grouped" | tail -45
      timeout "${TEST_S:-120}" python3 -m pytest -v -p no:cacheprovider -rfE --tb=short -m gpu \
        tests/test_kv4.py -k reduce_pdl 2>&1 | grep -E "PASS|FAIL|ERROR" | cut -c1-150
      ;;
    w4a16wave)
      # W4A16 lane kernel at M = 1: grids of one wave at small tiles (past the tuner's cap)
      timeout "${PROBE_S:-240}" python3 benchmarks/probe_w4a16_mma.py --shapes 28672x4096 \
        --ms 1 --warps 2,4 --tiles 2,4 --splits 1,2,4,8 --reduce-unroll 1,8 --planes 0 \
        --any-split 1 --out "$OUT/$part/probe.json" 2>&1 | tee "$OUT/$part/probe.log" | tail -20
      ;;
    tkeys)
      # decode_t over keys per channel (`_DECODE_T_KEY_TOKENS`): its gpu test, then the timing
      timeout "${TEST_S:-150}" python3 -m pytest -v -p no:cacheprovider -rfE --tb=short -m gpu \
        tests/test_kv4.py -k transposed_decode_keys_per_channel 2>&1 | grep -E "PASS|FAIL|ERROR" \
        | cut -c1-150
      timeout "${PROBE_S:-240}" python3 benchmarks/probe_kv4_key_channels.py --out "$OUT/$part" \
        --batches "${BATCHES:-16,64,1}" --lengths 32768,8192 --prefill '' 2>&1 | tail -3
      cat "$OUT/$part"/*.md 2>/dev/null | grep "^| decode"
      ;;
    cur)
      (cd benchmarks && timeout 150 python3 bench_kv4.py --out "$OUT/$part" --batches 16,64,1 \
        --lengths 32768,8192 --prefill '') 2>&1 | grep "^| [0-9]"
      ;;
    e2e)
      TORCH_LOGS=perf_hints timeout "${E2E_S:-300}" python3 benchmarks/probe_e2e_long.py \
        --layers "${LAYERS:-8}" --out "$OUT/$part" > "$OUT/$part/e2e_long.log" 2>&1
      grep -iE "skipping cudagraph|^w4a16|error" "$OUT/$part/e2e_long.log" | head -20
      ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
