#!/usr/bin/env bash
# Twenty-fourth session: one device call (the machine idles out 30 s after a call).
#   kv4tune: shipped kv4_decode entries removed, B = 16 / 64 re-tuned with the one-warp
#            BLOCK_N 32 tile (prefetch, stage_v) among the candidates; bench_kv4's decode table.
#   tests:   the KV4 gpu tests the twenty-third script's calls did not reach
#            (`session24_gpu_tests.txt`).
source benchmarks/gpu_setup.sh
case "${PART:?PART=kv4tune|tests|both}" in
  kv4tune|both)
    export QCOMPILE_CACHE_DIR=$OUT/cache
    cp qcompile/lowering/configs/h100.json /tmp/h100.json
    python3 - <<'PY'
import json, pathlib
p = pathlib.Path("qcompile/lowering/configs/h100.json")
d = json.loads(p.read_text())
d["entries"] = [e for e in d["entries"] if e["key"]["family"] != "kv4_decode"]
p.write_text(json.dumps(d))
PY
    (cd benchmarks && timeout "${KV4_S:-200}" python3 bench_kv4.py --out "$OUT" \
      --batches "${KV4_BATCHES:-16,64}" --lengths 32768,8192 --prefill '') 2>&1 | tail -12 \
      | tee "$OUT/bench_kv4.log"
    cp /tmp/h100.json qcompile/lowering/configs/h100.json
    ;;&
  tests|both)
    unset QCOMPILE_CACHE_DIR
    timeout "${TEST_S:-280}" python3 -m pytest -q -p no:cacheprovider -rfE --tb=short \
      --durations=20 $(cat benchmarks/session24_gpu_tests.txt) > "$OUT/tests_gpu.log" 2>&1
    tail -30 "$OUT/tests_gpu.log"
    ;;
esac
