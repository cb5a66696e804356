#!/usr/bin/env bash
# Twenty-seventh session's device calls.
#   (the slab A/B of `results/session27/slab_ab/` ran `benchmarks/ab/` of commit 09e2041,
#   removed since: decea0c's kv4_attention.py / decode_attention.py swapped in and out)
#   e2e:    probe_e2e_long.py (W4A16 vs W4A16 + KV4 at an 8000-token context: wall, host and
#           GPU time per decode step, profiles), Inductor's cudagraph perf hints kept.
#   cur:    the KV4 decode table as is.
#   decode_t: the transposed decode kernel against the decode kernel, fp16, shipped-like
#           tiles and splits, each kernel checked against float64 first.
#   shipped: every shipped config (decode_t's six fp16 keys new) against float64 and the KV4
#           gpu tests of the transposed kernel and the defaults.
#   fp16keys: decode_t with a bf16 query, K's planes bf16 (as shipped) or fp16 (_FP16_KEYS).
#   Then `PART=cur` (bench_kv4's table with decode_t shipped) and `PART=e2e`.
#   stalls: Nsight Compute warp-stall reasons of the shipped KV4 decode tile (B=16, S=32k).
source benchmarks/gpu_setup.sh
case "${PART:?PART=e2e|cur|decode_t|shipped|fp16keys|stalls}" in
  e2e)
    TORCH_LOGS=perf_hints timeout "${E2E_S:-300}" python3 benchmarks/probe_e2e_long.py \
      --layers "${LAYERS:-8}" --out "$OUT" > "$OUT/e2e_long.log" 2>&1
    grep -iE "skipping cudagraph|^w4a16|error" "$OUT/e2e_long.log" | head -20
    ;;
  cur)
    (cd benchmarks && timeout 150 python3 bench_kv4.py --out "$OUT" --batches 16,64,1 \
      --lengths 32768,8192 --prefill '') 2>&1 | grep "^| [0-9]"
    ;;
  decode_t)
    (cd benchmarks && timeout "${PROBE_S:-330}" python3 probe_kv4_decode.py --dtype float16 \
      --kinds decode,decode_t --t-rows "${T_ROWS:-4,8}" --prefetch 1 --stage-v 1 \
      --tiles "${TILES:-32x1,64x1,64x2}" --splits "${SPLITS:-2,8,64,128}" \
      --shapes "${SHAPES:-16x32768,64x8192,1x32768,16x8192}" --out "$OUT/probe_t.json") \
      2>&1 | grep -v "^  best" | tee "$OUT/probe_t.log" | tail -40
    ;;
  shipped)
    # decode_t's shipped entries (and every other) against float64, then the KV4 gpu tests
    timeout "${TEST_S:-300}" python3 -m pytest -q -p no:cacheprovider -rfE --tb=short -m gpu \
      tests/test_shipped_configs.py tests/test_kv4.py -k "shipped or transposed or default" \
      > "$OUT/tests_shipped.log" 2>&1
    tail -5 "$OUT/tests_shipped.log"
    ;;
  fp16keys)
    # bf16 query: K planes in bf16 (shipped) or fp16 (`_FP16_KEYS`), decode_t's shipped tile
    (cd benchmarks && timeout 200 python3 probe_kv4_decode.py --dtype bfloat16 --kinds decode_t \
      --t-rows 8 --prefetch 1 --stage-v 1 --fp16-keys 0,1 --tiles 32x1,64x1 --splits 2,8,64,128 \
      --shapes 16x32768,64x8192,1x32768 --out "$OUT/probe_fp16_keys.json") 2>&1 \
      | tee "$OUT/probe_fp16_keys.log" | tail -30
    ;;
  stalls)
    NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
    (cd benchmarks && timeout 200 "$NCU" --kernel-name regex:"kv4_decode" --launch-skip 2 \
      --launch-count 1 --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
      python3 ncu_kv4_decode.py --b 16 --s 32768) 2>&1 | grep -v "^==PROF==" > "$OUT/stalls.log"
    sort -k3 -n -r "$OUT/stalls.log" | grep stalled | head -14
    ;;
esac
