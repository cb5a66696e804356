#!/usr/bin/env bash
# Twenty-sixth session's plan for the next device calls (the machine idles out 30 s after a
# call: have the next command ready). Written after the device time ran out.
#   big:    the 64-bit cache slabs (KV4 at 2**31 bytes: B = 128, S = 32k; fp16 decode
#           attention at 2**31 elements: B = 72, S = 32k) and the linear ops' row chunks
#           (W4A16 / W4A8 outputs of 2.15e9 elements), natively; then every shipped config
#           against float64 (`test_shipped_configs.py`).
#   kv4tests: every KV4 / decode-attention gpu test (V centered past 4096 keys per program
#           is new since their last full run; they take ~530 s, so in two halves).
#   kv4bench: the shipped decode table at B = 1 / 16 / 64 after the slab change (the loops
#           are unchanged offline; this checks the time).
#   e2e:    the KV4 issue's end-to-end row on the H100 (so far measured on the H200 only):
#           Llama-3-8B shapes, random bf16 weights, 8000-token prompt, batch 1, bf16 +
#           Inductor vs W4A16 vs W4A16 + KV4 (`qcompile bench --kv4 token`).
#   ncu:    Nsight Compute on the shipped KV4 decode kernel at B = 16, S = 32k and B = 1,
#           S = 32k (never profiled since its tile changed): issue slots, stall reasons,
#           DRAM / L2 / shared throughput; what bounds it decides the next kernel change.
source benchmarks/gpu_setup.sh
case "${PART:?PART=big|kv4tests|kv4bench|e2e|ncu}" in
  big)
    timeout "${TEST_S:-400}" python3 -m pytest -q -p no:cacheprovider -rfE --tb=short \
      -m gpu tests/test_kv4.py tests/test_decode_attention.py tests/test_shipped_configs.py \
      tests/test_gpu.py tests/test_w4a8.py -k "2_to_the_31 or shipped_config" \
      > "$OUT/tests_big.log" 2>&1
    tail -12 "$OUT/tests_big.log"
    ;;
  kv4tests)
    timeout "${TEST_S:-560}" python3 -m pytest -q -p no:cacheprovider -rfE --tb=short \
      --durations=8 -m gpu tests/test_kv4.py tests/test_decode_attention.py \
      -k "not 2_to_the_31 and ${KV4_K:-not shipped}" > "$OUT/tests_kv4_gpu.log" 2>&1
    tail -20 "$OUT/tests_kv4_gpu.log"
    ;;
  kv4bench)
    (cd benchmarks && timeout 300 python3 bench_kv4.py --out "$OUT" --batches 1,16,64 \
      --lengths 32768,8192 --prefill '') 2>&1 | tail -14
    ;;
  e2e)
    QCOMPILE_AUTOTUNE=0 timeout "${E2E_S:-560}" qcompile bench \
      --model benchmarks/configs/llama-3-8b --random-weights --batch 1 --prompt-tokens 8000 \
      --new-tokens 64 --kv4 token > "$OUT/e2e_kv4.log" 2>&1
    tail -25 "$OUT/e2e_kv4.log"
    ;;
  ncu)
    NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
    echo "ncu: ${NCU:-none}" | tee "$OUT/ncu.log"
    for shape in "16 32768" "1 32768"; do
      set -- $shape
      (cd benchmarks && timeout 150 "$NCU" --kernel-name regex:"kv4_decode" --launch-skip 2 \
        --launch-count 1 --section SpeedOfLight --section WarpStateStats \
        --section SchedulerStats --section MemoryWorkloadAnalysis --section Occupancy \
        --section InstructionStats python3 ncu_kv4_decode.py --b "$1" --s "$2") \
        2>&1 | grep -v "^==PROF==" | tail -120 >> "$OUT/ncu.log"
    done
    grep -E "B=|Duration|Throughput|Issue Slots|Issued Warp|No Eligible|Stall|Occupancy|Registers" \
      "$OUT/ncu.log" | head -60
    ;;
esac
