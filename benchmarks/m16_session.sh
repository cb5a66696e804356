#!/usr/bin/env bash
# One device call for the W4A16 M=16 path (planes kernel reading x in place): the kernel
# benchmark at M=16 on the shapes (fresh tuning), bf16 tuning of the fused decode
# shapes at M=16 folded into this copy's shipped configs, the native GPU tests of the W4A16
# kernels, the KV4 prefill test, then the batch-16 end-to-end row with those configs.
set -o pipefail
: "${OUT:?set OUT}"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
timeout 170 python3 benchmarks/bench_w4a16.py --retune --ms 16 --out "$OUT/w4a16_m16" \
  > "$OUT/w4a16_m16.log" 2>&1
grep "^N=" "$OUT/w4a16_m16.log"
timeout 100 python3 benchmarks/tune_shipped.py --out "$OUT/tuned_m16.json" --ms 16 \
  --dtypes bfloat16 --shapes 6144x4096,4096x4096,28672x4096,4096x14336 2>&1 | cut -c1-220
python3 benchmarks/tune_shipped.py --merge "$OUT/tuned_m16.json"
timeout 100 python3 -m pytest -q -p no:cacheprovider -x --tb=short tests/test_lowering_w4a16.py \
  -k "planes or split_k or large_m or candidate" > "$OUT/tests_w4a16.log" 2>&1
tail -2 "$OUT/tests_w4a16.log"
timeout 60 python3 -m pytest -q -p no:cacheprovider -x --tb=short tests/test_kv4.py \
  -k prefill_kernel > "$OUT/tests_kv4_prefill.log" 2>&1
grep -E "^E |passed|failed" "$OUT/tests_kv4_prefill.log" | head -20
QCOMPILE_AUTOTUNE=0 timeout "${E2E_S:-130}" python3 benchmarks/bench_e2e.py --layers 32 \
  --batches 16 --new-tokens 48 --profile --variants qcompile_w4a16 --out "$OUT/e2e_b16" \
  > "$OUT/e2e_b16.log" 2>&1
grep -E '^\{"variant' "$OUT/e2e_b16.log" | cut -c1-400
