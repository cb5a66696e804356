#!/usr/bin/env bash
# For the next session (written in the eighteenth, not yet run), one device call per PART.
# Afterwards `python benchmarks/summarize_probe.py <probe json>` makes the markdown tables.
#   fp8:   the FP8 W4A8 kernels' tests natively (the PTX's byte order is only checked by a
#          GPU), then the FP8 SWAR GEMM (e4m3 (q - z) by PTX, fp8 wgmma, accumulator in units
#          of the tile's s2) beside _scaled_mm and cuBLAS at the acceptance shapes (GEMM
#          only), then the block-scaled cuBLASLt path (unpack to e4m3 once + F.scaled_mm
#          1x128 x 1x128);
#   small: the lane kernel's one-launch split K with the partials' loads unrolled (M 1, 16)
#          and the quantize kernel's row slices (eager M <= 16);
#   w4a8tune: shipped W4A8 configs for the acceptance shapes (int8, fp16 out; every
#          candidate timed, the tuner's pick per key), to merge with `tune_shipped.py --merge`;
#   e2e:   the Hugging Face end-to-end table (E2E_ARGS) as in session16_gpu.sh;
#   final: (written after fp8/small ran) the changed W4A8 paths' tests natively (fp8_mm, the
#          quantize slices and the lane reduction's unroll as defaults), then the acceptance
#          table with every current default, int8 and FP8;
#   atomic: the lane kernel's split K reduced by int32 atomics into one zeroed workspace
#          (tests natively, then beside the partials' sum and the two-launch epilogue);
#   verify: the changed W4A8 paths' tests natively (atomic lane default under CUDA graphs,
#          fp8_mm), then the M <= 16 rows of the acceptance table with every default.
source benchmarks/gpu_setup.sh
case "${PART:?PART=fp8|small|w4a8tune|e2e|final|atomic|verify}" in
  fp8)
    timeout 100 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_w4a8.py \
      -k "swar_gemm_fp8 or swar_kernel_takes or fp8_unpacking" 2>&1 | tail -6 | tee "$OUT/tests_fp8.log"
    (cd benchmarks && timeout 260 python3 probe_w4a8_swar.py --act float8_e4m3fn \
      --out "$OUT/probe_w4a8_swar_fp8.json" --shapes 28672x4096,8192x28672 --ms 256,1024 \
      --bms 128,256 --bns 64,128 --bks 128 --splits 1,2 --prefetch 1 --budget 230) \
      2>&1 | tee "$OUT/probe_fp8_swar.log"
    (cd benchmarks && timeout 150 python3 probe_w4a8_swar.py --kernel fp8_mm --act float8_e4m3fn \
      --out "$OUT/probe_w4a8_fp8_mm.json" --shapes 28672x4096,8192x28672 --ms 256,1024 \
      --bns 64,128 --bks 128 --budget 120) 2>&1 | tee "$OUT/probe_fp8_mm.log"
    ;;
  small)
    timeout 100 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_w4a8.py \
      -k "rearms or quantize_kernel" 2>&1 | tail -6 | tee "$OUT/tests_small.log"
    (cd benchmarks && timeout 200 python3 probe_w4a8_swar.py --kernel mma \
      --out "$OUT/probe_lane_unroll.json" --ms 1,16 --warps 4 --bks 128 --splits 4,16 \
      --reduce-unroll 2,4,8 --budget 180) 2>&1 | tee "$OUT/probe_lane_unroll.log"
    (cd benchmarks && timeout 60 python3 probe_w4a8_quantize.py --ms 1,16 --ks 4096,28672 \
      --slices 4,8,16 --out "$OUT/probe_w4a8_quantize_slices.json") 2>&1 | tail -6 \
      | tee "$OUT/probe_quantize_slices.log"
    ;;
  w4a8tune)
    (cd benchmarks && timeout "${TUNE_S:-540}" python3 tune_shipped.py --family w4a8 \
      --out "$OUT/w4a8_h100.json" --shapes 8192x28672,28672x4096 --ms 256,1024,16,1 \
      --dtypes float16) 2>&1 | tail -12 | tee "$OUT/tune_w4a8.log"
    ;;
  e2e)
    PART=e2e bash benchmarks/session16_gpu.sh
    ;;
  final)
    timeout 200 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_w4a8.py \
      -k "fp8_mm or rearms or quantize_kernel or default_config_is_exact or gpu_op or take_int8" \
      2>&1 | tail -6 | tee "$OUT/tests_final.log"
    (cd benchmarks && QCOMPILE_AUTOTUNE=0 timeout 300 python3 bench_w4a8.py --out "$OUT" \
      --shapes 8192x28672,28672x4096 --ms 1,16,256,1024) 2>&1 | tail -30 | tee "$OUT/bench_w4a8.log"
    ;;
  atomic)
    timeout 120 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_w4a8.py \
      -k "rearms or gpu_op" 2>&1 | tail -4 | tee "$OUT/tests_atomic.log"
    (cd benchmarks && timeout 200 python3 probe_w4a8_swar.py --kernel mma --atomic \
      --out "$OUT/probe_lane_atomic.json" --ms 16,1 --warps 4 --bks 128 --splits 4,8,16 \
      --reduce-unroll 8 --budget 180) 2>&1 | tee "$OUT/probe_lane_atomic.log"
    ;;
  verify)
    timeout 300 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_w4a8.py \
      -k "rearms or gpu or lane_default or small_m_default or quantize_kernel" 2>&1 | tail -6 \
      | tee "$OUT/tests_verify.log"
    (cd benchmarks && QCOMPILE_AUTOTUNE=0 timeout 200 python3 bench_w4a8.py --out "$OUT" \
      --shapes 8192x28672,28672x4096 --ms 1,16) 2>&1 | tail -20 | tee "$OUT/bench_w4a8.log"
    ;;
esac
