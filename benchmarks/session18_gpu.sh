#!/usr/bin/env bash
# Eighteenth session, one device call per PART:
#   first: the lane kernel's natural-order xq natively tested, the W4A8 acceptance table with
#          the seventeenth session's defaults, the int_mm overlap probe, KV4 prefetch at B = 1;
#   second: the one-pass quantize kernel (tests, probe, bench_w4a8 at M 1 and 16), the SWAR
#          kernel's split-K at 8192x28672 (128 programs at split 1), Nsight Compute on SWAR;
#   third: W4A8 default tests, the SWAR group-scale prefetch probed (both shapes, M 256 /
#          1024), the acceptance table with the new defaults, Nsight Compute on two configs;
#   fourth: the lane kernel's split K reduced in one launch (tile counters): tests natively,
#          probe beside the two-launch epilogue and W4A16 at M 1 / 16, bench_w4a8 at M 1 / 16;
#   final: W4A8 kernel tests natively, then the acceptance table with every current default;
#   kv4tune: bench_kv4 decode with tuning on (prefetch candidates), cache under $OUT/cache;
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
  second)
    timeout 60 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_w4a8.py \
      -k "quantize_kernel" 2>&1 | tail -4 | tee "$OUT/tests_quantize.log"
    (cd benchmarks && timeout 60 python3 probe_w4a8_quantize.py --out "$OUT/probe_w4a8_quantize.json") \
      2>&1 | tail -14 | tee "$OUT/probe_quantize.log"
    (cd benchmarks && QCOMPILE_AUTOTUNE=0 timeout 100 python3 bench_w4a8.py --out "$OUT" \
      --shapes 8192x28672,28672x4096 --ms 1,16) 2>&1 | tail -22 | tee "$OUT/bench_w4a8_small.log"
    (cd benchmarks && timeout 150 python3 probe_w4a8_swar.py --out "$OUT/probe_swar_split.json" \
      --shapes 8192x28672 --ms 256,1024 --bms 128,256 --bns 64,128 --bks 128 --splits 1,2,4 \
      --budget 130) 2>&1 | tee "$OUT/probe_swar_split.log"
    NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
    echo "ncu: ${NCU:-none}" | tee "$OUT/ncu.log"
    if [ -n "$NCU" ]; then
      (cd benchmarks && timeout 120 "$NCU" --kernel-name regex:"w4a8_gemm_swar" --launch-count 2 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        --section ComputeWorkloadAnalysis --section Occupancy python3 ncu_w4a8_swar.py) \
        2>&1 | grep -v "^==PROF==" | tail -150 >> "$OUT/ncu.log"
    fi
    ;;
  third)
    timeout 60 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_w4a8.py \
      -k "default or swar" 2>&1 | tail -4 | tee "$OUT/tests_default.log"
    (cd benchmarks && timeout 150 python3 probe_w4a8_swar.py --out "$OUT/probe_swar_prefetch.json" \
      --shapes 28672x4096,8192x28672 --ms 256,1024 --bms 256 --bns 64 --bks 128 --splits 1,2 \
      --prefetch 0,1 --budget 130) 2>&1 | tee "$OUT/probe_swar_prefetch.log"
    (cd benchmarks && QCOMPILE_AUTOTUNE=0 timeout 220 python3 bench_w4a8.py --out "$OUT" \
      --shapes 8192x28672,28672x4096 --ms 1,16,256,1024) 2>&1 | tail -30 | tee "$OUT/bench_w4a8.log"
    (cd benchmarks && timeout 90 /usr/local/cuda/bin/ncu --kernel-name regex:"w4a8_gemm_swar" \
      --launch-count 4 --section SpeedOfLight --section WarpStateStats --section Occupancy \
      python3 ncu_w4a8_swar.py --configs "gemm_swar,256,64,128,1,4,3,1;gemm_swar,256,128,128,1,8,3") \
      2>&1 | grep -v "^==PROF==" | grep -E "swar_kernel|Duration|Throughput|Occupancy|Stall|cycles being|IPC|Busy" \
      | tee "$OUT/ncu.log"
    ;;
  fourth)
    timeout 120 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_w4a8.py \
      -k "lane_mma or rearms or quantize_kernel or gpu" 2>&1 | tail -5 | tee "$OUT/tests_lane_reduce.log"
    (cd benchmarks && timeout 150 python3 probe_w4a8_swar.py --kernel mma \
      --out "$OUT/probe_lane_reduce.json" --ms 1,16 --warps 4 --bks 128 --splits 4,16 \
      --budget 130) 2>&1 | tee "$OUT/probe_lane_reduce.log"
    (cd benchmarks && QCOMPILE_AUTOTUNE=0 timeout 100 python3 bench_w4a8.py --out "$OUT" \
      --shapes 8192x28672,28672x4096 --ms 1,16) 2>&1 | tail -22 | tee "$OUT/bench_w4a8_small.log"
    ;;
  final)
    timeout 100 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_w4a8.py \
      -k "lane_mma or rearms or default or swar or gpu" 2>&1 | tail -5 | tee "$OUT/tests_final.log"
    (cd benchmarks && QCOMPILE_AUTOTUNE=0 timeout 220 python3 bench_w4a8.py --out "$OUT" \
      --shapes 8192x28672,28672x4096 --ms 1,16,256,1024) 2>&1 | tail -30 | tee "$OUT/bench_w4a8.log"
    ;;
  kv4tune)
    export QCOMPILE_CACHE_DIR=$OUT/cache
    (cd benchmarks && timeout "${KV4_S:-480}" python3 bench_kv4.py --out "$OUT" \
      --batches 16,1,64 --lengths 32768,8192 --prefill '') 2>&1 | tail -40 | tee "$OUT/bench_kv4.log"
    ;;
  *)
    PART=$PART bash benchmarks/session17_gpu.sh
    ;;
esac
