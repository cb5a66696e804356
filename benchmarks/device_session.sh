#!/usr/bin/env bash
# One device call: the W4A16 benchmark (tuning as it goes), Nsight Compute profiles of the
# tuned kernels, then the kernel tests on the GPU. Everything lands in $OUT: bench.log,
# w4a16.{json,md}, the plot, tuning_trials.json, cache/, ncu.txt, tests.log.
#   BENCH_S / NCU_S / TEST_S: time limits (s); BENCH_ARGS: bench_w4a16.py flags (default
#   --retune: tune afresh, ignoring the shipped configs; "" measures what users get);
#   NCU_CASES: "NxK:M ..." shapes to profile with their tuned config ("" to skip).
set -o pipefail
export PYTHONUNBUFFERED=1 QCOMPILE_CACHE_DIR=$OUT/cache
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,power.limit --format=csv | tee $OUT/bench.log
# shellcheck disable=SC2086
timeout "${BENCH_S:-330}" python3 benchmarks/bench_w4a16.py --out "$OUT" ${BENCH_ARGS---retune} 2>&1 | tee -a $OUT/bench.log
end=$((SECONDS + ${NCU_S:-120}))
for case in ${NCU_CASES-8192x28672:1 8192x28672:16 8192x28672:64}; do
  [ $SECONDS -lt $end ] || break
  timeout 60 ncu --clock-control none -k regex:w4a16 --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section SchedulerStats --section Occupancy --section LaunchStats \
    python3 benchmarks/profile_w4a16.py "${case%%:*}" "${case##*:}" >> $OUT/ncu.txt 2>&1
done
grep -E "N=|Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Stall|Issue Slots|Registers" $OUT/ncu.txt | head -60
timeout "${TEST_S:-130}" python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py tests/test_lowering_w4a16.py 2>&1 \
  | tee $OUT/tests.log | tail -5
