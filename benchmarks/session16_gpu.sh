#!/usr/bin/env bash
# Sixteenth session, one device call per PART:
#   (pairs: the first call, at commit c2130e8, probed the W4A16 pairs and W4A8 SWAR GEMMs;
#    the W4A16 kernel lost everywhere and is gone, see probe_w4a8_swar.py)
#   w4a8:  SWAR/quantize kernel tests natively, bench_w4a8 at the acceptance points with the
#          default (SWAR) configs, then the SWAR probe at M = 64, 128 (PROBE8_ARGS);
#   lane:  the W4A8 lane-MMA kernel's tests natively and its probe beside W4A16 (M 1-64),
#          then SWAR with and without its group-scale prefetch;
#   kv4pf: the KV4 decode kernel's token-scale prefetch, its tests and probe;
#   e2e:   the split-K warm-up test, then `qcompile bench --model` (E2E_ARGS);
#   tests: gpu test groups (ONLY, TEST_S) via gpu_tests.sh.
source benchmarks/gpu_setup.sh
case "${PART:?PART=w4a8|lane|kv4pf|e2e|tests}" in
  w4a8)
    timeout 120 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_w4a8.py \
      -k "swar or quantize_kernel or each_kernel_kind or gpu" 2>&1 | tail -8 | tee "$OUT/tests_w4a8.log"
    (cd benchmarks && QCOMPILE_AUTOTUNE=0 timeout "${BENCH8_S:-180}" python3 bench_w4a8.py --out "$OUT" \
      --shapes 8192x28672,28672x4096 --ms 256,1024) 2>&1 | tail -30 | tee "$OUT/bench_w4a8.log"
    [ "${PROBE8_S:-110}" = 0 ] && exit 0
    # shellcheck disable=SC2086
    (cd benchmarks && timeout "${PROBE8_S:-110}" python3 probe_w4a8_swar.py --out "$OUT/probe_w4a8_swar_small_m.json" \
      ${PROBE8_ARGS:---shapes 8192x28672,28672x4096 --ms 128,64 --bms 64,128 --bns 64 --bks 128 --prefetch 0 --splits 1,2,4 --budget 80}) 2>&1 | tee "$OUT/probe_w4a8.log"
    ;;
  lane)  # next session: the int8 lane-MMA kernel's and the SWAR scale prefetch's tests
    # natively, then the lane probe beside W4A16 (M 1-64) and SWAR with/without the prefetch
    timeout 120 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_w4a8.py \
      -k "lane_mma or each_kernel_kind or swar" 2>&1 | tail -8 | tee "$OUT/tests_lane.log"
    (cd benchmarks && timeout "${PROBE8_S:-220}" python3 probe_w4a8_swar.py --kernel mma \
      --out "$OUT/probe_w4a8_lane.json" --ms 1,16,32,64 --warps 2,4,8 --bks 64,128 \
      --splits 1,4,16 --budget 200) 2>&1 | tee "$OUT/probe_lane.log"
    (cd benchmarks && timeout 150 python3 probe_w4a8_swar.py --out "$OUT/probe_w4a8_swar_pf.json" \
      --ms 256,1024 --bms 128,256 --bns 64 --bks 128 --prefetch 0,1 --budget 130) 2>&1 \
      | tee "$OUT/probe_swar_pf.log"
    ;;
  kv4pf)  # next session: the KV4 decode kernel's token-scale prefetch, tests then probe
    timeout 200 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_kv4.py \
      -k "decode_kernel_matches or scale_prefetch" 2>&1 | tail -8 | tee "$OUT/tests_kv4pf.log"
    (cd benchmarks && timeout 330 python3 probe_kv4_decode.py --prefetch 0,1 --splits 1,4,16,64 \
      --shapes 1x8192,1x32768,16x8192,16x32768 --out "$OUT/probe_kv4_pf.json") 2>&1 \
      | tee "$OUT/probe_kv4_pf.log"
    ;;
  e2e)
    timeout 150 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_gpu.py -k split_k_first \
      2>&1 | tail -8 | tee "$OUT/tests_selected.log"
    # shellcheck disable=SC2086
    timeout "${E2E_S:-420}" python3 -m qcompile.cli bench --model benchmarks/configs/llama-3-8b \
      --random-weights ${E2E_ARGS:---batch 1 --prompt-tokens 8000 --new-tokens 64 --kv4 token} \
      2>&1 | grep -v "Warning\|warn(" | tee "$OUT/e2e.txt"
    ;;
  tests)
    ONLY="${ONLY:-backend_hf}" TEST_S="${TEST_S:-420}" bash benchmarks/gpu_tests.sh
    ;;
esac
