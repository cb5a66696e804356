#!/usr/bin/env bash
# Seventeenth session, one device call per PART:
#   intmm: the W4A8 "int_mm" path (unpack to int8 once + torch._int_mm) natively tested, then
#          probed beside the SWAR default at the acceptance shapes (GEMM only), then the int8
#          lane-MMA kernel's tests and probe beside W4A16 at M 1-64;
#   next:  the next session's first call (bench with the new defaults, overlap, KV4 B=1);
#   overlap: probe_w4a8_overlap.py (int_mm's unpacking in K chunks on a side stream);
#   bench: bench_w4a8 at the acceptance points with the defaults (QCOMPILE_AUTOTUNE=0);
#   kv4pf: session16_gpu.sh's KV4 decode token-scale prefetch part;
#   e2e:   session16_gpu.sh's e2e part (E2E_ARGS).
source benchmarks/gpu_setup.sh
case "${PART:?PART=all|next|intmm|overlap|bench|kv4pf|e2e}" in
  intmm)
    timeout 100 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_w4a8.py \
      -k "int_mm or lane_mma or each_kernel_kind" 2>&1 | tail -8 | tee "$OUT/tests_intmm_lane.log"
    (cd benchmarks && timeout "${PROBE_S:-170}" python3 probe_w4a8_swar.py --kernel int_mm \
      --out "$OUT/probe_w4a8_int_mm.json" --ms 128,256,1024 --bns 64,128 --bks 128,256 \
      --budget 150) 2>&1 | tee "$OUT/probe_int_mm.log"
    (cd benchmarks && timeout "${LANE_S:-200}" python3 probe_w4a8_swar.py --kernel mma \
      --out "$OUT/probe_w4a8_lane.json" --ms 1,16,64 --warps 2,4 --bks 64,128 \
      --splits 1,4,16 --budget 180) 2>&1 | tee "$OUT/probe_lane.log"
    ;;
  all)  # one call when machines are scarce, most valuable first (a cut run still returns
    # what it wrote): the int_mm probe (each config's accumulator checked exactly, beside the
    # SWAR default), bench_w4a8 with the int_mm config forced at large M (the acceptance
    # table), the kernel tests natively, then the lane probe
    (cd benchmarks && timeout 100 python3 probe_w4a8_swar.py --kernel int_mm \
      --out "$OUT/probe_w4a8_int_mm.json" --ms 256,1024 --bns 64,128 --bks 128,256 \
      --budget 80) 2>&1 | tee "$OUT/probe_int_mm.log"
    (cd benchmarks && QCOMPILE_AUTOTUNE=0 timeout 150 python3 bench_w4a8.py --out "$OUT" \
      --shapes 8192x28672,28672x4096 --ms 256,1024 --int8-config "${INT8_CONFIG:-int_mm,0,128,128,1,4,1}") \
      2>&1 | tail -30 | tee "$OUT/bench_w4a8_int_mm.log"
    timeout 60 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_w4a8.py \
      -k "int_mm or lane_mma or each_kernel_kind" 2>&1 | tail -8 | tee "$OUT/tests_intmm_lane.log"
    (cd benchmarks && timeout "${LANE_S:-80}" python3 probe_w4a8_swar.py --kernel mma \
      --out "$OUT/probe_w4a8_lane.json" --ms 1,16 --warps 2,4 --bks 128 \
      --splits 1,4,16 --budget 60) 2>&1 | tee "$OUT/probe_lane.log"
    ;;
  overlap)  # can the int_mm path hide its unpacking? (chunks on a side stream, GEMM beside)
    (cd benchmarks && timeout "${OVERLAP_S:-240}" python3 probe_w4a8_overlap.py --budget 200 \
      --out "$OUT/probe_w4a8_overlap.json") 2>&1 | tee "$OUT/probe_overlap.log"
    ;;
  next)  # the next session's first call, most valuable first: the W4A8 acceptance table with
    # this session's defaults (lane at M <= 16, natural-order xq in the GEMM-only column;
    # int_mm at M = 1024), the overlap experiment, then KV4 prefetch at B = 1
    (cd benchmarks && QCOMPILE_AUTOTUNE=0 timeout 220 python3 bench_w4a8.py --out "$OUT" \
      --shapes 8192x28672,28672x4096 --ms 1,16,256,1024) 2>&1 | tail -30 | tee "$OUT/bench_w4a8.log"
    (cd benchmarks && timeout 200 python3 probe_w4a8_overlap.py --budget 170 \
      --out "$OUT/probe_w4a8_overlap.json") 2>&1 | tee "$OUT/probe_overlap.log"
    (cd benchmarks && timeout 120 python3 probe_kv4_decode.py --prefetch 0,1 --splits 64,128 \
      --shapes 1x32768,1x8192 --out "$OUT/probe_kv4_pf_b1.json") 2>&1 | tail -20 | tee "$OUT/probe_kv4_pf_b1.log"
    ;;
  bench)
    (cd benchmarks && QCOMPILE_AUTOTUNE=0 timeout "${BENCH8_S:-400}" python3 bench_w4a8.py --out "$OUT" \
      --shapes 8192x28672,28672x4096 --ms "${BENCH8_MS:-1,16,256,1024}") 2>&1 | tail -30 | tee "$OUT/bench_w4a8.log"
    ;;
  kv4pf|e2e)
    PART=$PART bash benchmarks/session16_gpu.sh
    ;;
esac
