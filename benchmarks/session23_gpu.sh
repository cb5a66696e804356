#!/usr/bin/env bash
# Twenty-third session: one device call per PART; at most 8 files come back per call.
#   first: (cut to fit the device time left after ~15 failed starts) `probe_kv4_decode.py`
#          with and without STAGE_V (V through shared memory; and the token-scale prefetch)
#          and with and without keys unpacked as 16 + code (`_KEY_BIAS16`, a module switch)
#          at B = 16 / 64, S = 8k / 32k, each config checked against float64 first; the PDL
#          probe (eager W4A8 at M = 1 / 16, quantize kernel -> lane GEMM by programmatic
#          dependent launch, bit-exact against the plain launch); then the PDL and STAGE_V
#          gpu tests.
#   kv4tests: every KV4 gpu-marked test natively (the cache write's 8-token default has not
#          run natively yet; the autotuned ops now also try STAGE_V).
#   kv4tune: the shipped decode keys re-tuned with STAGE_V among the candidates (cache under
#          $OUT/cache, merge with `tune_shipped.py --merge`), then bench_kv4's decode table;
#          KV4_BATCHES=1 in a second call (the candidates doubled: B = 1 has up to 128 splits).
#   small: as session22_gpu.sh (W4A8 M = 16 tune, bench_w4a8 M = 1 / 16, KV4 prefill).
source benchmarks/gpu_setup.sh
case "${PART:?PART=first|kv4tests|kv4tune|small}" in
  first)
    (cd benchmarks && timeout "${KV4_S:-240}" python3 probe_kv4_decode.py --prefetch 0,1 \
      --stage-v 0,1 --key-bias16 0,1 --splits 2,4,8 --tiles "${KV4_TILES:-64x1,32x1}" \
      --dtype float16 \
      --shapes "${KV4_SHAPES:-16x32768,64x8192,16x8192}" \
      --out "$OUT/probe_kv4_stage_v.json") 2>&1 | tee "$OUT/probe_kv4_stage_v.log"
    (cd benchmarks && timeout 100 python3 probe_w4a8_pdl.py --out "$OUT/probe_w4a8_pdl.json") \
      2>&1 | tee "$OUT/probe_w4a8_pdl.log"
    timeout "${TEST_S:-120}" python3 -m pytest -q -p no:cacheprovider -rfE --tb=short \
      tests/test_w4a8.py tests/test_kv4.py -k "pdl or staged_v or 16_plus" 2>&1 | tail -4 | tee "$OUT/tests.log"
    ;;
  kv4tests)
    timeout "${TEST_S:-500}" python3 -m pytest -q -p no:cacheprovider -rfE --tb=short \
      --durations=8 -m gpu tests/test_kv4.py tests/test_decode_attention.py \
      > "$OUT/tests_kv4_gpu.log" 2>&1
    tail -20 "$OUT/tests_kv4_gpu.log"
    ;;
  kv4tune)
    # (the shipped file comes back afterwards, for whatever the same call runs next)
    export QCOMPILE_CACHE_DIR=$OUT/cache
    cp qcompile/lowering/configs/h100.json /tmp/h100.json
    python3 - <<'PY'
import json, pathlib
p = pathlib.Path("qcompile/lowering/configs/h100.json")
d = json.loads(p.read_text())
d["entries"] = [e for e in d["entries"] if e["key"]["family"] != "kv4_decode"]
p.write_text(json.dumps(d))
PY
    (cd benchmarks && timeout "${KV4_S:-480}" python3 bench_kv4.py --out "$OUT" \
      --batches "${KV4_BATCHES:-16,64}" --lengths 32768,8192 --prefill '') 2>&1 | tail -40 \
      | tee "$OUT/bench_kv4.log"
    cp /tmp/h100.json qcompile/lowering/configs/h100.json
    ;;
  small)
    PART=small bash benchmarks/session22_gpu.sh
    ;;
esac
