#!/usr/bin/env bash
# Twenty-first session, one device call per PART (at most 8 files come back per call).
#   kernels: W4A16's shipped M = 16 entries re-tuned with the lane kernel's candidates (now
#            with the split-K sum 8 partials in flight at 16 rows, with and without prefetch)
#            beside each shipped pick, merged into this copy's h100.json; then with every
#            shipped config: the W4A16 table at M 1 / 16, W4A8 at M 1 / 16 beside it, and KV4
#            prefill at 1k / 4k (the fresh path also in a CUDA graph);
#   e2e:     the Hugging Face end-to-end table: bf16 eager, Inductor and qcompile W4A16
#            (lm_head int4) at batch 1 and 16 in one process, with the per-kernel profile;
#   e2eq:    the same, qcompile W4A16 alone (E2E_VARIANTS).
source benchmarks/gpu_setup.sh
case "${PART:?PART=kernels|e2e|e2eq}" in
  kernels)
    (cd benchmarks && timeout "${TUNE_S:-200}" python3 tune_shipped.py --kinds mma --ms 16 \
      --dtypes float16,bfloat16 --out "$OUT/w4a16_m16.json") 2>&1 | tail -16 > "$OUT/log.txt"
    (cd benchmarks && python3 tune_shipped.py --merge "$OUT/w4a16_m16.json") >> "$OUT/log.txt"
    (cd benchmarks && QCOMPILE_AUTOTUNE=0 timeout 200 python3 bench_w4a16.py --out "$OUT" \
      --ms 1,16) 2>&1 | tail -16 >> "$OUT/log.txt"
    (cd benchmarks && QCOMPILE_AUTOTUNE=0 timeout 120 python3 bench_w4a8.py --out "$OUT" \
      --shapes 8192x28672,28672x4096 --ms 1,16) 2>&1 | tail -12 >> "$OUT/log.txt"
    (cd benchmarks && timeout 90 python3 bench_kv4.py --out "$OUT" --batches "" \
      --prefill 1024,4096) 2>&1 | tail -14 >> "$OUT/log.txt"
    rm -f "$OUT/w4a16_speedup.png" "$OUT/tuning_trials.json"
    cat "$OUT/log.txt"
    ;;
  e2eq)
    E2E_VARIANTS=qcompile_w4a16 PART=e2e bash benchmarks/session21_gpu.sh
    ;;
  e2e)
    export QCOMPILE_AUTOTUNE=0
    timeout "${E2E_S:-560}" python3 benchmarks/bench_e2e.py --layers 32 --batches 1,16 \
      --new-tokens 48 --lm-head --profile --out "$OUT" \
      --variants "${E2E_VARIANTS:-eager,inductor,qcompile_w4a16}" > "$OUT/e2e.log" 2>&1
    rm -f "$OUT"/*.png
    tail -30 "$OUT/e2e.log"
    ;;
esac
