#!/usr/bin/env bash
# One device call: the kernel tests on the GPU, then the W4A16 benchmark (tuning as it goes).
# Everything lands in $OUT: tests.log, bench.log, w4a16.{json,md}, the plot, tuning trials, cache.
#   TEST_S / BENCH_S: time limits (s); BENCH_ARGS: extra bench_w4a16.py flags (--shapes, --ms).
set -o pipefail
export PYTHONUNBUFFERED=1 QCOMPILE_CACHE_DIR=$OUT/cache
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,power.limit --format=csv | tee $OUT/bench.log
timeout "${TEST_S:-150}" python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py tests/test_lowering_w4a16.py 2>&1 \
  | tee $OUT/tests.log | tail -15
# shellcheck disable=SC2086
timeout "${BENCH_S:-420}" python3 benchmarks/bench_w4a16.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee -a $OUT/bench.log
