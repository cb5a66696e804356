#!/usr/bin/env bash
# Device calls on the H200 (the lent machine since 2026-12). Results are written under $R
# (/tmp/res) and packed into $OUT/res.tgz at the end (the device returns at most 8 files).
#   PHASE=baseline  what a user gets with the shipped configs (h100.json, read through the
#                   h200 -> h100 sibling fallback): the W4A16 kernel table at the M
#                   values, then Llama-3-8B-shaped decode end to end (qcompile only, lm_head
#                   int4), and again with the compile-time settings KNOBS (Inductor config
#                   JSON) / GC (a:b:c gc thresholds) when set.
#   PHASE=warmup    compile + warm-up of the same decode benchmark, each run with empty
#                   Inductor and Triton caches: the backend's compile settings off
#                   (QCOMPILE_COMPILE_SETTINGS=0), off plus global GC thresholds, and on.
set -o pipefail
: "${OUT:?set OUT}"
R=/tmp/res
mkdir -p $R
trap 'tar czf "$OUT/res.tgz" -C $R . ; cp $R/*.md "$OUT"/ 2>/dev/null' EXIT
export PYTHONUNBUFFERED=1 QCOMPILE_CACHE_DIR=$R/cache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,power.limit --format=csv,noheader | tee $R/env.txt
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a $R/env.txt
case "${PHASE:-baseline}" in
  baseline)
    export QCOMPILE_AUTOTUNE=0
    timeout "${BENCH_S:-170}" python3 benchmarks/bench_w4a16.py --out "$R/w4a16" \
      --shapes "${SHAPES:-8192x28672,28672x4096,4096x4096}" --ms "${MS:-1,16,64,256,1024}" \
      > "$R/w4a16.log" 2>&1
    cp "$R/w4a16/w4a16.md" "$R/kernels.md"
    grep -E "^\|" "$R/kernels.md" | head -40
    timeout "${E2E_S:-230}" python3 benchmarks/bench_e2e.py --layers 32 --batches 1,16 \
      --new-tokens 48 --lm-head --profile --variants qcompile_w4a16 --out "$R/e2e" \
      > "$R/e2e.log" 2>&1
    cp "$R/e2e/e2e.md" "$R/e2e.md"
    grep -E "^\| qcompile" "$R/e2e.md"
    if [ -n "${KNOBS:-}${GC:-}" ]; then
      timeout "${E2E2_S:-200}" python3 benchmarks/bench_e2e.py --layers 32 --batches 1,16 \
        --new-tokens 48 --lm-head --variants qcompile_w4a16 --out "$R/e2e_knobs" \
        --inductor-config "${KNOBS:-"{}"}" ${GC:+--gc-threshold "$GC"} > "$R/e2e_knobs.log" 2>&1
      cp "$R/e2e_knobs/e2e.md" "$R/e2e_knobs.md"
      grep -E "^\| qcompile" "$R/e2e_knobs.md"
    fi
    ;;
  warmup)
    export QCOMPILE_AUTOTUNE=0
    run() {  # name, then extra bench_e2e flags; env assignments go before the call
      export TORCHINDUCTOR_CACHE_DIR=/tmp/ind_$1 TRITON_CACHE_DIR=/tmp/tri_$1
      local name=$1; shift
      timeout "${RUN_S:-180}" python3 benchmarks/bench_e2e.py --layers 32 --batches 1,16 \
        --new-tokens 32 --lm-head --variants qcompile_w4a16 --out "$R/$name" "$@" \
        > "$R/$name.log" 2>&1
      cp "$R/$name/e2e.md" "$R/$name.md"
      echo "== $name"; grep -E "^\| qcompile" "$R/$name.md"
    }
    QCOMPILE_COMPILE_SETTINGS=0 run settings_off
    QCOMPILE_COMPILE_SETTINGS=0 run gc_only --gc-threshold 100000:50:1000
    run settings_on
    ;;
esac
