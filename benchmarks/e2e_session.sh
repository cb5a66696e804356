#!/usr/bin/env bash
# Device calls for the Hugging Face issue's end-to-end numbers (each phase fits one call):
#   PHASE=tune  tune the fused Llama-3-8B shapes (q/k/v, o, gate/up, down, and lm_head) for
#               bf16 and fp16 at the decode/prefill M buckets -> $OUT/tuned.json (fold it into
#               the shipped file with `tune_shipped.py --merge` and commit before PHASE=e2e);
#               SHAPES, MS, DTYPES narrow it
#   PHASE=e2e   bf16 eager vs Inductor vs qcompile at batch 1 and 16, with the per-kernel
#               profile, then qcompile with lm_head int4 at batch 1 -> $OUT/e2e*/ and logs
# Limits (s): TUNE_S, E2E_S. QCOMPILE_AUTOTUNE=0 in the e2e phase: it measures the shipped
# configs, so compile + warm-up is what a user sees.
set -o pipefail
: "${OUT:?set OUT}"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
case "${PHASE:-e2e}" in
  tune)
    timeout "${TUNE_S:-540}" python3 benchmarks/tune_shipped.py --out "$OUT/tuned.json" \
      --shapes "${SHAPES:-6144x4096,4096x4096,28672x4096,4096x14336,128256x4096}" \
      --ms "${MS:-1,16,128}" --dtypes "${DTYPES:-bfloat16,float16}" 2>&1 | tail -40
    ;;
  e2e)
    export QCOMPILE_AUTOTUNE=0
    timeout "${E2E_S:-420}" python3 benchmarks/bench_e2e.py --layers 32 --batches 1,16 \
      --new-tokens 48 --profile --out "$OUT/e2e" > "$OUT/e2e.log" 2>&1
    grep -E '^\{"variant' "$OUT/e2e.log" | cut -c1-300
    timeout 150 python3 benchmarks/bench_e2e.py --layers 32 --batches 1 --new-tokens 48 \
      --lm-head --variants qcompile_w4a16 --out "$OUT/e2e_lm_head" > "$OUT/e2e_lm_head.log" 2>&1
    grep -E '^\{"variant' "$OUT/e2e_lm_head.log" | cut -c1-300
    ;;
esac
