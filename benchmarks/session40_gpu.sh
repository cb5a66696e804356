#!/usr/bin/env bash
# Fortieth session. PART is a comma-separated list of:
#   acc:   W4A16 with two-group K tiles (`w4a16._SUBTILES`, on) and the producer warp's
#          wgmma left in flight at 256 x rows (`w4a16_wgmma._pipe`): the acceptance shapes
#          re-tuned (wgmma candidates beside each key's shipped pick; 28672x4096 at TUNE_MS,
#          default 16,64,256,1024, 8192x28672 at TUNE_MS_B, default 256,1024, empty: none) into
#          $OUT/acc/h100_<shape>.json, merged into this copy's shipped file, then
#          bench_w4a16.py at TUNE_MS on BENCH_SHAPES (default both) with the merged configs
#          (merge locally only what the benchmark confirms); first the tuner's read-flush gpu
#          test (FLUSH=0: not).
#   acc8:  W4A8 re-tuned on the two acceptance shapes at TUNE8_MS (default 16,256,1024) with its
#          wgmma candidates beside each key's shipped pick (since the forty-first session also
#          the producer warp at 128 x rows and two-group K tiles: `w4a8._WGMMA_RS_WS`,
#          `w4a8._SUBTILES`), merged, then bench_w4a8.py at M = 16, 256, 1024.
#   w4a8sub: W4A8 with K tiles of two groups (candidates since session 41): probe_w4a8_wgmma.py
#          --two-groups --variants rs+pairs,ws+pairs at M = 16, 64 on the two acceptance shapes
#          and 4096x14336 (W4A8 at M = 16 on 4096x14336 is 0.89x W4A16).
#   anything else: session39_gpu.sh's parts (pipe, sub, absmax, tune16, kbench, ...).
source benchmarks/gpu_setup.sh
# Tuning compiles each key's 12-24 Gluon candidates on 8 threads (a gpu test showed 8 threads
# time the same candidates as one; `docs/autotuning.md`); TUNE_THREADS=1 for one at a time.
export QCOMPILE_TUNE_THREADS="${TUNE_THREADS:-8}"
# tuned LOG JSON: the tuning log's failed-candidate count and picks, then JSON merged into this
# copy's shipped file
tuned() {
  grep -c "failed:" "$1" | sed "s/^/failed candidates: /"
  grep -E "TuneKey|rror" "$1" | sed "s/TuneKey(family=//; s/group_size=128, //" | cut -c1-330
  python3 benchmarks/tune_shipped.py --merge "$2"
}
for part in ${PART//,/ }; do
  mkdir -p "$OUT/$part"
  case "$part" in
    acc)
      [ "${FLUSH:-1}" = 1 ] && gpu_tests 60 "$OUT/$part/flush.log" tests/test_autotune.py -k read_flush
      # 28672x4096 at every M (two-group tiles at 16, the pipelined producer warp at 256 up);
      # 8192x28672 (level with two-group tiles at M = 16) from 256 up
      for spec in "28672x4096:${TUNE_MS:-16,64,256,1024}" "8192x28672:${TUNE_MS_B-256,1024}"; do
        [ -n "${spec#*:}" ] || continue
        timeout "${TUNE_S:-140}" python3 benchmarks/tune_shipped.py --kinds wgmma_rs,wgmma_rs_ws \
          --ms "${spec#*:}" --dtypes float16 --shapes "${spec%%:*}" \
          --out "$OUT/$part/h100_${spec%%:*}.json" > "$OUT/$part/tune_${spec%%:*}.log" 2>&1
        tuned "$OUT/$part/tune_${spec%%:*}.log" "$OUT/$part/h100_${spec%%:*}.json"
      done
      timeout "${KERNELS_S:-150}" python3 benchmarks/bench_w4a16.py --ms "${TUNE_MS:-16,64,256,1024}" \
        --shapes "${BENCH_SHAPES:-8192x28672,28672x4096}" --out "$OUT/$part" > "$OUT/$part/bench.log" 2>&1
      tail -8 "$OUT/$part/bench.log" | cut -c1-200
      ;;
    acc8)
      timeout "${TUNE8_S:-200}" python3 benchmarks/tune_shipped.py --family w4a8 \
        --kinds wgmma_rs,wgmma_rs_ws --ms "${TUNE8_MS:-16,256,1024}" --dtypes float16 \
        --shapes 8192x28672,28672x4096 --out "$OUT/$part/h100.json" > "$OUT/$part/tune.log" 2>&1
      tuned "$OUT/$part/tune.log" "$OUT/$part/h100.json"
      timeout "${W4A8_S:-200}" python3 benchmarks/bench_w4a8.py --ms 16,256,1024 \
        --shapes 8192x28672,28672x4096 --out "$OUT/$part" > "$OUT/$part/bench.log" 2>&1
      grep "^N=" "$OUT/$part/bench.log" | cut -c1-220
      ;;
    w4a8sub)
      timeout "${W4A8SUB_S:-240}" python3 benchmarks/probe_w4a8_wgmma.py --two-groups \
        --ms 16,64 --shapes 28672x4096,8192x28672,4096x14336 --variants rs+pairs,ws+pairs \
        --out "$OUT/$part/probe.json" > "$OUT/$part/probe.log" 2>&1
      grep "N=" "$OUT/$part/probe.log"
      ;;
    *) PART=$part bash benchmarks/session39_gpu.sh ;;
  esac
done
