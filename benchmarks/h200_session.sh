#!/usr/bin/env bash
# Device calls on the H200 (the lent machine since 2026-12): PHASE=baseline measures what a user
# gets with the shipped configs (h100.json read through the h200 -> h100 sibling fallback):
# the W4A16 kernel table at the M values, then Llama-3-8B-shaped decode end to end
# (qcompile only, lm_head int4) twice: default settings, and with the compile-time knobs in
# KNOBS / GC (warm-up experiment). Everything lands in $OUT.
set -o pipefail
: "${OUT:?set OUT}"
export PYTHONUNBUFFERED=1 QCOMPILE_CACHE_DIR=$OUT/cache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,power.limit --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
case "${PHASE:-baseline}" in
  baseline)
    export QCOMPILE_AUTOTUNE=0
    timeout "${BENCH_S:-170}" python3 benchmarks/bench_w4a16.py --out "$OUT/w4a16" \
      --shapes "${SHAPES:-8192x28672,28672x4096,4096x4096}" --ms "${MS:-1,16,64,256,1024}" \
      > "$OUT/w4a16.log" 2>&1
    grep -E "^\|" "$OUT/w4a16/w4a16.md" | head -40
    timeout "${E2E_S:-230}" python3 benchmarks/bench_e2e.py --layers 32 --batches 1,16 \
      --new-tokens 48 --lm-head --profile --variants qcompile_w4a16 --out "$OUT/e2e" \
      > "$OUT/e2e.log" 2>&1
    grep -E "^\| qcompile" "$OUT/e2e/e2e.md"
    if [ -n "${KNOBS:-}${GC:-}" ]; then
      timeout "${E2E2_S:-200}" python3 benchmarks/bench_e2e.py --layers 32 --batches 1,16 \
        --new-tokens 48 --lm-head --variants qcompile_w4a16 --out "$OUT/e2e_knobs" \
        --inductor-config "${KNOBS:-{\}}" ${GC:+--gc-threshold $GC} > "$OUT/e2e_knobs.log" 2>&1
      grep -E "^\| qcompile" "$OUT/e2e_knobs/e2e.md"
    fi
    ;;
esac
