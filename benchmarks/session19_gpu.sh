#!/usr/bin/env bash
# For the next session's first device call (written in the eighteenth, not yet run):
#   fp8swar: the FP8 SWAR GEMM (e4m3 (q - z) unpacked by PTX, fp8 wgmma, the accumulator
#            kept in units of the tile's s2): its tests natively (the PTX's byte order is
#            only checked by a GPU), then probed beside _scaled_mm and cuBLAS at the
#            acceptance shapes, GEMM only; the block-scaled cuBLASLt FP8 path (unpack to e4m3
#            once + F.scaled_mm 1x128 x 1x128); then the quantize kernel's row slices;
#   e2e:     the Hugging Face end-to-end table (E2E_ARGS) as in session16_gpu.sh.
source benchmarks/gpu_setup.sh
case "${PART:?PART=fp8swar|e2e}" in
  fp8swar)
    timeout 120 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_w4a8.py \
      -k "swar_gemm_fp8 or swar_kernel_takes or fp8_unpacking" 2>&1 | tail -6 | tee "$OUT/tests_fp8_swar.log"
    (cd benchmarks && timeout 240 python3 probe_w4a8_swar.py --act float8_e4m3fn \
      --out "$OUT/probe_w4a8_swar_fp8.json" --shapes 28672x4096,8192x28672 --ms 256,1024 \
      --bms 128,256 --bns 64,128 --bks 128 --splits 1,2 --prefetch 1 --budget 210) \
      2>&1 | tee "$OUT/probe_fp8_swar.log"
    # FP8 through cuBLASLt: unpack to e4m3 (q - z) once, then the 1x128 block-scaled GEMM
    (cd benchmarks && timeout 120 python3 probe_w4a8_swar.py --kernel fp8_mm --act float8_e4m3fn \
      --out "$OUT/probe_w4a8_fp8_mm.json" --shapes 28672x4096,8192x28672 --ms 256,1024 \
      --bns 64,128 --bks 128 --budget 100) 2>&1 | tee "$OUT/probe_fp8_mm.log"
    # the quantize kernel with a lone row's rounding spread over several programs (eager M <= 16)
    (cd benchmarks && timeout 60 python3 probe_w4a8_quantize.py --ms 1,16 --ks 4096,28672 \
      --slices 4,8,16 --out "$OUT/probe_w4a8_quantize_slices.json") 2>&1 | tail -6 \
      | tee "$OUT/probe_quantize_slices.log"
    ;;
  e2e)
    PART=e2e bash benchmarks/session16_gpu.sh
    ;;
esac
