#!/usr/bin/env bash
# Sixteenth session, one device call per PART:
#   pairs: the W4A16 pairs / W4A8 SWAR GEMMs' kernel tests natively, then their probes
#          (PROBE_ARGS, PROBE8_ARGS) beside cuBLAS;
#   e2e:   the split-K warm-up test, then `qcompile bench --model` (E2E_ARGS);
#   tests: gpu test groups (ONLY, TEST_S) via gpu_tests.sh.
set -o pipefail
: "${OUT:?set OUT}"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv > "$OUT/env.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" >> "$OUT/env.txt"
case "${PART:?PART=pairs|e2e|tests}" in
  pairs)
    timeout "${TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider -rfE --tb=short \
      tests/test_lowering_w4a16.py tests/test_w4a8.py -k "pairs or pair_planes or swar" 2>&1 \
      | tail -15 | tee "$OUT/tests_pairs.log"
    # shellcheck disable=SC2086
    (cd benchmarks && timeout "${PROBE_S:-230}" python3 probe_w4a16_pairs.py --out "$OUT/probe_w4a16_pairs.json" \
      ${PROBE_ARGS:---shapes 8192x28672,28672x4096 --ms 256,1024,64 --budget 200}) 2>&1 | tee "$OUT/probe.log"
    # shellcheck disable=SC2086
    (cd benchmarks && timeout "${PROBE8_S:-170}" python3 probe_w4a16_pairs.py --family w4a8 --out "$OUT/probe_w4a8_swar.json" \
      ${PROBE8_ARGS:---shapes 8192x28672,28672x4096 --ms 256,1024 --bks 128,256 --prefetch 0 --budget 150}) 2>&1 | tee "$OUT/probe_w4a8.log"
    ;;
  w4a8)
    timeout 120 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_w4a8.py \
      -k "swar or quantize_kernel or each_kernel_kind or gpu" 2>&1 | tail -8 | tee "$OUT/tests_w4a8.log"
    (cd benchmarks && QCOMPILE_AUTOTUNE=0 timeout 200 python3 bench_w4a8.py --out "$OUT" \
      --shapes 8192x28672,28672x4096 --ms 256,1024) 2>&1 | tail -30 | tee "$OUT/bench_w4a8.log"
    # shellcheck disable=SC2086
    (cd benchmarks && timeout "${PROBE8_S:-150}" python3 probe_w4a16_pairs.py --family w4a8 --out "$OUT/probe_w4a8_swar_small_m.json" \
      ${PROBE8_ARGS:---shapes 8192x28672,28672x4096 --ms 128,64 --bms 64,128 --bns 64 --bks 128 --prefetch 0 --splits 1,2,4 --budget 130}) 2>&1 | tee "$OUT/probe_w4a8.log"
    ;;
  e2e)
    timeout 150 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_gpu.py -k split_k_first \
      2>&1 | tail -8 | tee "$OUT/tests_selected.log"
    # shellcheck disable=SC2086
    timeout "${E2E_S:-420}" python3 -m qcompile.cli bench --model benchmarks/configs/llama-3-8b \
      --random-weights ${E2E_ARGS:---batch 1 --prompt-tokens 8000 --new-tokens 64 --kv4 token} \
      2>&1 | grep -v "Warning\|warn(" | tee "$OUT/e2e.txt"
    ;;
  tests)
    ONLY="${ONLY:-backend_hf}" TEST_S="${TEST_S:-420}" bash benchmarks/gpu_tests.sh
    ;;
esac
