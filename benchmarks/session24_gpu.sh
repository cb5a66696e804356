#!/usr/bin/env bash
# Twenty-fourth session: one device call (the machine idles out 30 s after a call).
#   kv4tune: shipped kv4_decode entries removed, B = 16 / 64 re-tuned with the one-warp
#            BLOCK_N 32 tile (prefetch, stage_v) among the candidates; bench_kv4's decode table.
#   tests:   the KV4 gpu tests the twenty-third script's calls did not reach
#            (`session24_gpu_tests.txt`).
#   switches (for the next session): the decode kernel's untimed module switches `_Q_ROWS`
#            (query operand in registers) and `_LAZY_RESCALE` (rescale skipped on most
#            tiles), with `_KEY_BIAS16` again (with `_Q_ROWS`: 1119 -> 971 loop instructions
#            offline), each config checked against float64 first, at B = 16 / 64 and B = 1,
#            then their gpu tests. If one wins, turn it on and re-run PART=kv4tune (and
#            KV4_BATCHES=1 for the B = 1 keys, which the tuner has not re-tuned).
source benchmarks/gpu_setup.sh
case "${PART:?PART=kv4tune|tests|both|switches}" in
  switches)
    (cd benchmarks && timeout "${KV4_S:-200}" python3 probe_kv4_decode.py --prefetch 1 \
      --stage-v 1 --q-rows 0,1 --lazy-rescale 0,1 --key-bias16 0,1 --splits 2,8 \
      --tiles 32x1,64x1 \
      --dtype float16 --shapes 16x32768,64x8192,16x8192 --out "$OUT/probe_switches.json") \
      2>&1 | tee "$OUT/probe_switches.log" | grep -v "^check decode_grouped"
    (cd benchmarks && timeout "${KV4_B1_S:-120}" python3 probe_kv4_decode.py --prefetch 1 \
      --stage-v 1 --q-rows 0,1 --lazy-rescale 0,1 --splits 64,128 --tiles 32x1,64x1 \
      --dtype float16 --shapes 1x32768,1x8192 --out "$OUT/probe_switches_b1.json") \
      2>&1 | tee "$OUT/probe_switches_b1.log" | grep -v "^check"
    # B = 1 splits 64 / 128 past the self-reducing limit (8): what the separate split-reduce
    # launch costs inside a graph, against the ~25 us whole op (a two-level self-reduce would
    # have to beat it)
    (cd benchmarks && timeout 60 python3 - <<'PY'
import torch
from bench_w4a16 import time_graph
from qcompile.lowering.kv4_attention import reduce_splits
for split in (8, 64, 128):
    part = torch.randn(split, 32, 128, device="cuda")
    lse = torch.randn(split, 32, device="cuda")
    out = torch.empty(1, 32, 1, 128, dtype=torch.float16, device="cuda")
    us = time_graph([lambda: reduce_splits(part, lse, out)])
    print(f"split-reduce kernel alone, B=1 (32 rows), {split} splits: {us:.2f} us", flush=True)
PY
    ) 2>&1 | tee "$OUT/reduce_b1.log"
    timeout "${TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider -rfE --tb=short \
      tests/test_kv4.py -k "switches_on_cuda" 2>&1 | tail -4 | tee "$OUT/tests_switches.log"
    ;;
  kv4tune|both)
    KV4_S=${KV4_S:-200} PART=kv4tune bash benchmarks/session23_gpu.sh
    ;;&
  tests|both)
    unset QCOMPILE_CACHE_DIR
    timeout "${TEST_S:-280}" python3 -m pytest -q -p no:cacheprovider -rfE --tb=short \
      --durations=20 $(cat benchmarks/session24_gpu_tests.txt) > "$OUT/tests_gpu.log" 2>&1
    tail -30 "$OUT/tests_gpu.log"
    ;;
esac
