#!/usr/bin/env bash
# Eighteenth session, one device call per PART:
#   first: the lane kernel's natural-order xq natively tested, the W4A8 acceptance table with
#          the seventeenth session's defaults, the int_mm overlap probe, KV4 prefetch at B = 1;
#   e2e / kv4pf / bench / overlap: as in session17_gpu.sh.
source benchmarks/gpu_setup.sh
case "${PART:?PART=first|e2e|kv4pf|bench|overlap}" in
  first)
    timeout 90 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_w4a8.py \
      -k "lane_mma or natural or each_kernel_kind" 2>&1 | tail -8 | tee "$OUT/tests_lane_natural.log"
    (cd benchmarks && QCOMPILE_AUTOTUNE=0 timeout 220 python3 bench_w4a8.py --out "$OUT" \
      --shapes 8192x28672,28672x4096 --ms 1,16,256,1024) 2>&1 | tail -30 | tee "$OUT/bench_w4a8.log"
    (cd benchmarks && timeout 150 python3 probe_w4a8_overlap.py --budget 130 \
      --out "$OUT/probe_w4a8_overlap.json") 2>&1 | tee "$OUT/probe_overlap.log"
    (cd benchmarks && timeout 100 python3 probe_kv4_decode.py --prefetch 0,1 --splits 64,128 \
      --shapes 1x32768,1x8192 --out "$OUT/probe_kv4_pf_b1.json") 2>&1 | tail -20 | tee "$OUT/probe_kv4_pf_b1.log"
    ;;
  *)
    PART=$PART bash benchmarks/session17_gpu.sh
    ;;
esac
