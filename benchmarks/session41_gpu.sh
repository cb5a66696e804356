#!/usr/bin/env bash
# Forty-first session. PART is a comma-separated list of:
#   acc8:  W4A8 with its new candidates (the producer warp at 128 x rows, uncapped; K tiles of
#          two groups up to 64 x rows: `w4a8._WGMMA_RS_WS`, `w4a8._SUBTILES`) re-tuned on the
#          two acceptance shapes at TUNE8_MS (default 16,256,1024), each key's shipped pick
#          beside the wgmma candidates, into $OUT/acc8/h100.json, merged into this copy's
#          shipped file, then bench_w4a8.py at M = 16, 256, 1024 (W4A16 and cuBLAS fp16 in the
#          same run). Merge locally only what the benchmark confirms.
#   anything else: session40_gpu.sh's parts (acc, w4a8sub, ...).
source benchmarks/gpu_setup.sh
export QCOMPILE_TUNE_THREADS="${TUNE_THREADS:-8}"
for part in ${PART//,/ }; do
  mkdir -p "$OUT/$part"
  case "$part" in
    acc8)
      timeout "${TUNE8_S:-240}" python3 benchmarks/tune_shipped.py --family w4a8 \
        --kinds wgmma_rs,wgmma_rs_ws --ms "${TUNE8_MS:-16,256,1024}" --dtypes float16 \
        --shapes 8192x28672,28672x4096 --out "$OUT/$part/h100.json" > "$OUT/$part/tune.log" 2>&1
      grep -c "failed:" "$OUT/$part/tune.log" | sed "s/^/failed candidates: /"
      grep -E "TuneKey|rror" "$OUT/$part/tune.log" | sed "s/TuneKey(family=//; s/group_size=128, //" | cut -c1-330
      python3 benchmarks/tune_shipped.py --merge "$OUT/$part/h100.json"
      timeout "${W4A8_S:-200}" python3 benchmarks/bench_w4a8.py --ms 16,256,1024 \
        --shapes 8192x28672,28672x4096 --out "$OUT/$part" > "$OUT/$part/bench.log" 2>&1
      grep "^N=" "$OUT/$part/bench.log" | cut -c1-220
      tail -12 "$OUT/$part/bench.log" | cut -c1-220
      ;;
    *) PART=$part bash benchmarks/session40_gpu.sh ;;
  esac
done
