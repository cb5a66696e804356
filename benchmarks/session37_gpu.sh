#!/usr/bin/env bash
# Thirty-seventh session. PART is a comma-separated list of:
#   variants (commit a47c7ab only): the then-untimed wgmma_rs options' gpu tests (`_UNROLL`, the producer-warp kernel under
#        maxnreg, `_RS_PDL` in a CUDA-graph chain, `_RS_SELF_REDUCE`), then the probe with and
#        without `_UNROLL` at M = 16, 64, 256, 1024 and with and without the self-reducing split
#        at M = 16, 64 (split configs), on the two large shapes.
#   wsreg: the probe's producer-warp kernel with and without a register cap: 0 / 96 at
#        M = 16, 64; 0 / 192 at M = 256, 1024.
#   rsab: probe_e2e_long.py --rs-ab at 16 layers: shipped (PDL on) against `_RS_PDL`, that plus
#        `_RS_SELF_REDUCE`, and the M = 16 linears on the lane kernel, A/B/B/A (commit a47c7ab;
#        now: shipped against ALT_CONFIGS, default the thirty-sixth session's picks).
#   rscap: the probe's wgmma_rs with and without an 80 / 88-register cap at M = 16, 32
#        (uncapped, ptxas gives the 16-row kernel 118 registers: 4 programs per SM; at 96 it
#        serializes the wgmmas, so 96 is left out).
#   pairs: `w4a16_wgmma._PAIR_ROWS` (words loaded two rows at a time): its gpu test, then the
#        probe with and without it at M = 16, 64, 256 (and the capped producer-warp kernel at
#        16 / 64, whose fitting configs are the ones the 96-register cap allows).
#   w4a8rs: W4A8 int8 on the wgmma_rs kernel (`w4a8._WGMMA_RS`, untimed): its gpu tests, then
#        probe_w4a8_wgmma.py at M = 16, 64, 256 beside W4A8's and W4A16's current picks.
#   w4a8: bench_w4a8.py at M = 1, 16 on the three large shapes (W4A8 beside the new W4A16).
#   anything else: session36_gpu.sh's parts (wgmmatests, tune, kernels, bench16, ncu, ...).
source benchmarks/gpu_setup.sh
probe() {  # probe LOG ARGS...: probe_gluon_w4a16.py, its "N=" summary lines
  local log=$1
  shift
  timeout "${PROBE_S:-200}" python3 benchmarks/probe_gluon_w4a16.py --fit-only "$@" > "$log" 2>&1
  grep "N=" "$log"
}
for part in ${PART//,/ }; do
  mkdir -p "$OUT/$part"
  case "$part" in
    variants)  # (ran at commit a47c7ab; the options it timed are settled and their flags gone)
      echo "check out a47c7ab to rerun PART=variants"
      ;;
    wsreg)
      probe "$OUT/$part/small.log" --ms 16,64 --ws 1 --maxnreg 0,96 --configs 2,4,21,8,9,11 \
        --out "$OUT/$part/small.json"
      probe "$OUT/$part/large.log" --ms 256,1024 --ws 1 --maxnreg 0,192 --configs 17,18,19,20 \
        --out "$OUT/$part/large.json"
      ;;
    rscap)
      gpu_tests "${TEST_S:-150}" "$OUT/$part/tests.log" tests/test_w4a16_wgmma.py -k register_cap
      probe "$OUT/$part/rscap.log" --ms 16,32 --maxnreg 0,80,88 --configs 0,1,2,3,4,21,22,5,6,23 \
        --out "$OUT/$part/rscap.json"
      ;;
    pairs)
      gpu_tests "${TEST_S:-150}" "$OUT/$part/tests.log" tests/test_w4a16_wgmma.py -k pair_rows
      probe "$OUT/$part/pairs.log" --ms 16,64,256 --pairs 0,1 --configs 2,4,21,8,9,11,17,18 \
        --out "$OUT/$part/pairs.json"
      probe "$OUT/$part/pairs_ws.log" --ms 16,64 --ws 1 --maxnreg 96 --pairs 0,1 \
        --configs 2,4,21,8,9,11 --out "$OUT/$part/pairs_ws.json"
      ;;
    w4a8rs)
      gpu_tests "${TEST_S:-150}" "$OUT/$part/tests.log" tests/test_w4a8.py -k wgmma_rs
      timeout "${PROBE_S:-200}" python3 benchmarks/probe_w4a8_wgmma.py --ms 16,64,256 \
        --out "$OUT/$part/w4a8rs.json" > "$OUT/$part/w4a8rs.log" 2>&1
      grep "N=" "$OUT/$part/w4a8rs.log"
      ;;
    rsab)
      timeout "${E2E_S:-400}" python3 benchmarks/probe_e2e_long.py --layers 16 --rs-ab \
        --alt-configs "${ALT_CONFIGS:-benchmarks/configs/h100_session36.json}" \
        --repeat "${REPEAT:-2}" --no-profile --steps 32 --out "$OUT/$part" \
        > "$OUT/$part/e2e_long.log" 2>&1
      grep -E "^w4a16|rror" "$OUT/$part/e2e_long.log" | cut -c1-200 | head -20
      ;;
    w4a8)
      timeout "${W4A8_S:-240}" python3 benchmarks/bench_w4a8.py --ms 1,16 \
        --shapes 8192x28672,28672x4096,4096x14336 --out "$OUT/$part" > "$OUT/$part/bench.log" 2>&1
      tail -12 "$OUT/$part/bench.log" | cut -c1-220
      ;;
    *) PART=$part bash benchmarks/session36_gpu.sh ;;
  esac
done
