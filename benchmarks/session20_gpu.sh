#!/usr/bin/env bash
# Twentieth session, one device call per PART.
# Afterwards `python benchmarks/summarize_probe.py <probe json>` makes the W4A8 tables.
#   lane:  the changed lane paths' tests natively (W4A16's split-K sum with partials in
#          flight; "mma_f16", FP8 at M <= 64 on W4A16's lane kernel), then W4A16's lane kernel
#          at M 1 / 16 with its one-launch sum reading 1, 4 or 8 partials at a time (beside
#          cuBLAS and the op's current pick), then "mma_f16" at M 1 / 16 beside W4A16 and the
#          FP8 GEMV/GEMM defaults; if it wins, set `_LANE_FP8_TIMED = True` in lowering/w4a8.py;
#   fp8lane: the "mma_f16" half of lane alone;
#   m1:    (needs no lane run first) shipped W4A16 M = 1 entries re-tuned with the lane
#          kernel's candidates, those with `reduce="unroll8"` included, beside the shipped pick
#          (`tune_shipped.py --kinds mma`), merged into this copy's h100.json, then the
#          W4A16 benchmark at M = 1 and 16 with the merged configs; then KV4 prefill at 1k / 4k
#          (the fresh path also in a CUDA graph; the cache write's tokens per program);
#   w4a8tune / e2e: as in session19_gpu.sh (shipped W4A8 configs for the acceptance shapes, to
#          merge with `tune_shipped.py --merge`; the Hugging Face end-to-end table).
source benchmarks/gpu_setup.sh
fp8lane() {
  (cd benchmarks && timeout "${FP8_S:-240}" python3 probe_w4a8_swar.py --kernel mma \
    --act float8_e4m3fn --out "$OUT/probe_lane_f16.json" --ms 1,16 --warps 2,4 --bks 128 \
    --splits 4,8,16 --budget $(( ${FP8_S:-240} - 20 ))) 2>&1 | tee "$OUT/probe_lane_f16.log"
}
case "${PART:?PART=lane|fp8lane|m1|w4a8tune|e2e}" in
  lane)
    timeout 150 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short \
      tests/test_lowering_w4a16.py tests/test_w4a8.py \
      -k "partials_in_flight or reduces_in_one_launch or lane_f16 or lane_fp8_joins or gpu_op" \
      2>&1 | tail -6 | tee "$OUT/tests_lane.log"
    (cd benchmarks && timeout 230 python3 probe_w4a16_mma.py --out "$OUT/probe_w4a16_unroll.json" \
      --ms 1,16 --warps 4 --tiles 2,4 --bks 128 --splits 4,8,16,32 --planes 0 \
      --reduce-unroll 1,4,8) 2>&1 | tee "$OUT/probe_w4a16_unroll.log"
    FP8_S=180 fp8lane
    ;;
  fp8lane)
    fp8lane
    ;;
  m1)
    (cd benchmarks && timeout "${TUNE_S:-330}" python3 tune_shipped.py --kinds mma --ms 1 \
      --dtypes float16,bfloat16 --out "$OUT/w4a16_m1.json") 2>&1 | tail -16 | tee "$OUT/tune_m1.log"
    (cd benchmarks && python3 tune_shipped.py --merge "$OUT/w4a16_m1.json") | tee -a "$OUT/tune_m1.log"
    (cd benchmarks && QCOMPILE_AUTOTUNE=0 timeout 200 python3 bench_w4a16.py --out "$OUT" \
      --ms 1,16) 2>&1 | tail -16 | tee "$OUT/bench_w4a16.log"
    (cd benchmarks && timeout 90 python3 bench_kv4.py --out "$OUT/kv4_prefill" --batches "" \
      --prefill 1024,4096) 2>&1 | tail -12 | tee "$OUT/kv4_prefill.log"
    ;;
  *)  # w4a8tune, e2e: as in session19_gpu.sh
    PART=$PART bash benchmarks/session19_gpu.sh
    ;;
esac
