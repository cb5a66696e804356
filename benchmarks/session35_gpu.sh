#!/usr/bin/env bash
# Thirty-fifth session. PART is a comma-separated list of:
#   (pf2, run once in this session at commit 702e714: the lane kernel's register prefetch two
#   blocks ahead lost at every point and was removed; results/session35/pf2/.)
#   pdltests, pdl32, bench, bench16: as in session33_gpu.sh (it runs them).
#   gluon:   probe_gluon_w4a16.py: the W4A16 Gluon wgmma kernel's configs against cuBLAS and
#            the op's pick.
#   wgmmatests: the wgmma kernel's gpu tests and the candidate-config test that draws it.
#   kernels: bench_w4a16.py at M = 64 and 256 (fp16), the shipped picks beside cuBLAS.
#   ws:      (next session) the wgmma kernel with a TMA producer warp (`_WS`, untimed): its gpu
#            test, then the probe at M = 64, 256 and 1024 with and without it.
#   tune:    (next session) each key's shipped pick against the wgmma candidates, M buckets
#            32-512, all tune_shipped.py shapes, TUNE_DTYPES (default float16); then
#            `tune_shipped.py --merge $OUT/tune/h100.json` here and PART=kernels again.
#   kv4pdl:  probe_e2e_long.py at 16 layers with --pdl --kv4-pdl: the KV4 cache write and
#            decode_t attention under PDL (`_KV4_PDL`) against the same without.
source benchmarks/gpu_setup.sh
for part in ${PART//,/ }; do
  mkdir -p "$OUT/$part"
  case "$part" in
    pdltests|pdl32|bench|bench16)
      PART=$part bash benchmarks/session33_gpu.sh
      ;;
    gluon)
      timeout "${GLUON_S:-300}" python3 benchmarks/probe_gluon_w4a16.py --ms ${GLUON_MS:-256,1024} \
        ${GLUON_ARGS:-} --out "$OUT/$part/gluon.json" > "$OUT/$part/gluon.log" 2>&1
      cut -c1-300 "$OUT/$part/gluon.log" | tail -50
      ;;
    wgmmatests)
      gpu_tests "${TEST_S:-150}" "$OUT/$part/tests.log" tests/test_w4a16_wgmma.py \
        tests/test_shipped_configs.py -k wgmma
      timeout "${CAND_S:-120}" python3 -m pytest -q -p no:cacheprovider tests/test_lowering_w4a16.py \
        -k every_candidate_config > "$OUT/$part/candidates.log" 2>&1
      tail -3 "$OUT/$part/candidates.log"
      ;;
    kernels)
      timeout "${KERNELS_S:-300}" python3 benchmarks/bench_w4a16.py --ms ${KERNEL_MS:-64,256} \
        --out "$OUT/$part" > "$OUT/$part/bench.log" 2>&1
      tail -20 "$OUT/$part/bench.log" | cut -c1-200
      ;;
    ws)
      gpu_tests "${TEST_S:-150}" "$OUT/$part/tests.log" tests/test_w4a16_wgmma.py -k producer
      timeout "${WS_S:-360}" python3 benchmarks/probe_gluon_w4a16.py --ms ${WS_MS:-256,1024,64} \
        --configs ${WS_CONFIGS:-0,2,4,5,6,10} --ws 0,1 --maxnreg ${WS_REGS:-0,96,128} \
        --out "$OUT/$part/ws.json" > "$OUT/$part/ws.log" 2>&1
      grep "N=" "$OUT/$part/ws.log"
      ;;
    tune)
      timeout "${TUNE_S:-540}" python3 benchmarks/tune_shipped.py --kinds wgmma \
        --ms ${TUNE_MS:-32,64,128,256,512} --dtypes ${TUNE_DTYPES:-float16} \
        --out "$OUT/$part/h100.json" > "$OUT/$part/tune.log" 2>&1
      grep -c wgmma "$OUT/$part/h100.json"; tail -5 "$OUT/$part/tune.log" | cut -c1-200
      ;;
    kv4pdl)
      timeout "${E2E_S:-330}" python3 benchmarks/probe_e2e_long.py --layers 16 --pdl --kv4-pdl \
        --repeat "${REPEAT:-2}" --no-profile --steps 32 --out "$OUT/$part" \
        > "$OUT/$part/e2e_long.log" 2>&1
      grep -E "^w4a16|rror" "$OUT/$part/e2e_long.log" | cut -c1-200 | head -20
      ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
