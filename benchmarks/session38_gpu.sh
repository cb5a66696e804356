#!/usr/bin/env bash
# Thirty-eighth session. PART is a comma-separated list of:
#   check:  the wgmma_rs gpu tests (W4A16 with `PAIRS` up to 128 x rows, W4A8's int8 mode with
#           its 128-byte row slots), the shipped wgmma configs; then probe_w4a8_wgmma.py at
#           M = 16, 64, 256 (W4A8 on wgmma_rs beside W4A8's and W4A16's current picks).
#   tune8:  only if W4A8's wgmma_rs gpu tests pass: tune_shipped.py --family w4a8 --kinds
#           wgmma_rs at TUNE8_MS (default 16,256,1024: the keys shipped) on the two large
#           shapes; each key's shipped pick against the wgmma_rs candidates.
#   w4a8:   bench_w4a8.py at W4A8_MS (default 1,16,256) on the three large shapes.
#   w4a8ws: (next session) `w4a8._WGMMA_RS_WS` switched on in the device's copy: W4A8's
#           wgmma_rs gpu tests (both kinds), then tune_shipped.py --family w4a8 with every
#           candidate at M = 16, 64 on W4A8_WS_SHAPES (default 4096x14336,14336x4096,4096x4096)
#           into $OUT/w4a8ws/h100.json (merge here if the tests passed), then bench_w4a8.py at
#           M = 16, 64 on 4096x14336 with those picks merged on the device.
#   w4a8pairs: (next session) W4A8's wgmma_rs gpu tests (pairs and the producer warp
#           included), then probe_w4a8_wgmma.py --variants rs,rs+pairs,ws,ws+pairs at M = 16,
#           64, 256 on the two large shapes and 4096x14336.
#   anything else: session37_gpu.sh's and older parts (tune, wgmmatests, kernels, bench16, ncu).
source benchmarks/gpu_setup.sh
for part in ${PART//,/ }; do
  mkdir -p "$OUT/$part"
  case "$part" in
    check)
      gpu_tests "${TEST_S:-200}" "$OUT/$part/tests.log" tests/test_w4a16_wgmma.py \
        tests/test_shipped_configs.py tests/test_w4a8.py -k "wgmma"
      timeout "${PROBE_S:-150}" python3 benchmarks/probe_w4a8_wgmma.py --ms 16,64,256 \
        --out "$OUT/$part/w4a8rs.json" > "$OUT/$part/w4a8rs.log" 2>&1
      grep "N=" "$OUT/$part/w4a8rs.log"
      ;;
    tune8)
      if ! timeout 150 python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/test_w4a8.py \
          -k wgmma_rs > "$OUT/$part/tests.log" 2>&1; then
        tail -5 "$OUT/$part/tests.log"; continue
      fi
      timeout "${TUNE_S:-300}" python3 benchmarks/tune_shipped.py --family w4a8 --kinds wgmma_rs \
        --ms "${TUNE8_MS:-16,256,1024}" --dtypes float16 --shapes 8192x28672,28672x4096 \
        --out "$OUT/$part/h100.json" > "$OUT/$part/tune.log" 2>&1
      grep -E "s w4a8|rror" "$OUT/$part/tune.log" | cut -c1-220
      ;;
    w4a8pairs)
      gpu_tests 200 "$OUT/$part/tests.log" tests/test_w4a8.py -k wgmma_rs
      if grep -qE "FAILED|ERROR" "$OUT/$part/tests.log"; then continue; fi
      timeout "${PROBE_S:-300}" python3 benchmarks/probe_w4a8_wgmma.py --ms 16,64,256 \
        --shapes 28672x4096,8192x28672,4096x14336 --variants rs,rs+pairs,ws,ws+pairs \
        --out "$OUT/$part/probe.json" > "$OUT/$part/probe.log" 2>&1
      grep "N=" "$OUT/$part/probe.log"
      ;;
    w4a8ws)
      sed -i 's/^_WGMMA_RS_WS = False/_WGMMA_RS_WS = True/' qcompile/lowering/w4a8.py
      if ! gpu_tests 200 "$OUT/$part/tests.log" tests/test_w4a8.py -k wgmma_rs; then :; fi
      if grep -qE "FAILED|ERROR" "$OUT/$part/tests.log"; then continue; fi
      timeout "${TUNE_S:-240}" python3 benchmarks/tune_shipped.py --family w4a8 --ms 16,64 \
        --dtypes float16 --shapes "${W4A8_WS_SHAPES:-4096x14336,14336x4096,4096x4096}" \
        --out "$OUT/$part/h100.json" > "$OUT/$part/tune.log" 2>&1
      grep -E "s w4a8|rror" "$OUT/$part/tune.log" | cut -c1-220
      python3 benchmarks/tune_shipped.py --merge "$OUT/$part/h100.json" | tail -1
      timeout 150 python3 benchmarks/bench_w4a8.py --ms 16,64 --shapes 4096x14336 \
        --out "$OUT/$part" > "$OUT/$part/bench.log" 2>&1
      tail -8 "$OUT/$part/bench.log" | cut -c1-220
      ;;
    w4a8)
      timeout "${W4A8_S:-240}" python3 benchmarks/bench_w4a8.py --ms "${W4A8_MS:-1,16,256}" \
        --shapes 8192x28672,28672x4096,4096x14336 --out "$OUT/$part" > "$OUT/$part/bench.log" 2>&1
      tail -14 "$OUT/$part/bench.log" | cut -c1-220
      ;;
    *) PART=$part bash benchmarks/session37_gpu.sh ;;
  esac
done
