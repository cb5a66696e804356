#!/usr/bin/env bash
# For the next session (written in the nineteenth, not yet run), one device call per PART.
# Afterwards `python benchmarks/summarize_probe.py <probe json>` makes the markdown tables.
#   fp8lane: "mma_f16" (FP8 at M <= 64 on W4A16's lane kernel) tested natively, then probed
#          at M 1 / 16 beside W4A16 and the FP8 GEMV/GEMM defaults (eager and GEMM only); if it
#          wins, set `_LANE_FP8_TIMED = True` in lowering/w4a8.py with the numbers;
#   w4a8tune / e2e: as in session19_gpu.sh (shipped W4A8 configs for the acceptance shapes, to
#          merge with `tune_shipped.py --merge`; the Hugging Face end-to-end table).
source benchmarks/gpu_setup.sh
case "${PART:?PART=fp8lane|w4a8tune|e2e}" in
  fp8lane)
    timeout 150 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_w4a8.py \
      -k "lane_f16 or lane_fp8_joins or gpu_op" 2>&1 | tail -6 | tee "$OUT/tests_fp8lane.log"
    (cd benchmarks && timeout 240 python3 probe_w4a8_swar.py --kernel mma --act float8_e4m3fn \
      --out "$OUT/probe_lane_f16.json" --ms 1,16 --warps 2,4 --bks 128 --splits 4,8,16 \
      --budget 220) 2>&1 | tee "$OUT/probe_lane_f16.log"
    ;;
  *)  # w4a8tune, e2e: as in session19_gpu.sh
    PART=$PART bash benchmarks/session19_gpu.sh
    ;;
esac
