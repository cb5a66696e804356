#!/usr/bin/env bash
# One device call for KV4: the kernel and gpu tests natively, then the benchmark (tuning as it
# goes). Everything lands in $OUT: tests.log, bench.log, kv4.{json,md}, cache/ (the tuned
# configs, to ship in qcompile/lowering/configs/h100.json).
#   TEST_S / BENCH_S: time limits (s); BENCH_ARGS: bench_kv4.py flags (e.g. --lengths 8192).
set -o pipefail
export PYTHONUNBUFFERED=1 QCOMPILE_CACHE_DIR=$OUT/cache
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,power.limit --format=csv | tee $OUT/bench.log
timeout "${TEST_S:-200}" python3 -m pytest -q -x -p no:cacheprovider tests/test_kv4.py 2>&1 \
  | tee $OUT/tests.log | tail -5
# shellcheck disable=SC2086
timeout "${BENCH_S:-360}" python3 benchmarks/bench_kv4.py --out "$OUT" ${BENCH_ARGS-} 2>&1 | tee -a $OUT/bench.log
