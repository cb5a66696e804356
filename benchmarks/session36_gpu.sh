#!/usr/bin/env bash
# Thirty-sixth session. PART is a comma-separated list of:
#   pdltests, pdl32, bench, bench16, gluon, wgmmatests, kernels, ws, tune, kv4pdl: as in
#   session35_gpu.sh (it runs them).
#   tune: tune_shipped.py --kinds TUNE_KINDS (default wgmma_rs,wgmma_rs_ws), M buckets TUNE_MS,
#        all its shapes, TUNE_DTYPES; then `tune_shipped.py --merge $OUT/tune/h100.json` here.
#   variants: (next session) the untimed wgmma_rs options: their gpu tests (`_UNROLL`, the
#        producer-warp kernel under maxnreg, `_RS_PDL` in a CUDA-graph chain,
#        `_RS_SELF_REDUCE`), then the probe with and without each at M = 16, 64, 256, 1024 on
#        the two large shapes.
#   rsab: (next session) probe_e2e_long.py at 16 layers, W4A16 + KV4 under PDL as shipped,
#        with `_RS_PDL`, and with the M = 16 linears back on the lane kernel (--rs-ab).
#   ncu: Nsight Compute on the wgmma kernel (NCU_CFGS, at NCU_CASE), what bounds it: tensor
#        pipe, issue slots, stall reasons, shared-memory bank conflicts.
source benchmarks/gpu_setup.sh
for part in ${PART//,/ }; do
  mkdir -p "$OUT/$part"
  case "$part" in
    ncu)
      NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
      for cfg in ${NCU_CFGS:-wgmma,128,128,64,1,8,4,0}; do
        timeout "${NCU_S:-90}" "$NCU" --clock-control none -k regex:wgmma --launch-skip 2 \
          --launch-count 1 --section SpeedOfLight --section ComputeWorkloadAnalysis \
          --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis_Tables \
          --section LaunchStats --section InstructionStats \
          python3 benchmarks/profile_w4a16.py ${NCU_CASE:-28672x4096 256} "$cfg" \
          >> "$OUT/$part/ncu.txt" 2>&1
      done
      grep -E "N=|Duration|Throughput|Pipe|Stall|Issue|Issued|Registers|Bank|Warp Cycles|Eligible" \
        "$OUT/$part/ncu.txt" | cut -c1-160 | head -80
      ;;
    tune)
      timeout "${TUNE_S:-540}" python3 benchmarks/tune_shipped.py \
        --kinds "${TUNE_KINDS:-wgmma_rs,wgmma_rs_ws}" --ms "${TUNE_MS:-16,32,64,128,256,512,1024}" \
        --dtypes "${TUNE_DTYPES:-float16}" --out "$OUT/$part/h100.json" > "$OUT/$part/tune.log" 2>&1
      grep -c wgmma_rs "$OUT/$part/h100.json"; tail -3 "$OUT/$part/tune.log" | cut -c1-200
      ;;
    variants)
      gpu_tests "${TEST_S:-150}" "$OUT/$part/tests.log" tests/test_w4a16_wgmma.py \
        -k "untimed or pdl or self_reducing"
      timeout "${VARIANTS_S:-300}" python3 benchmarks/probe_gluon_w4a16.py --ms 16,64,256,1024 \
        --ws 0,1 --maxnreg 0,96,192 --unroll 0,1 --self-reduce 0,1 --fit-only \
        --configs 2,4,21,8,9,11,17,18,19,20 \
        --out "$OUT/$part/gluon.json" > "$OUT/$part/gluon.log" 2>&1
      grep "N=" "$OUT/$part/gluon.log"
      ;;
    rsab)
      timeout "${E2E_S:-400}" python3 benchmarks/probe_e2e_long.py --layers 16 --rs-ab \
        --repeat "${REPEAT:-2}" --no-profile --steps 32 --out "$OUT/$part" \
        > "$OUT/$part/e2e_long.log" 2>&1
      grep -E "^w4a16|rror" "$OUT/$part/e2e_long.log" | cut -c1-200 | head -20
      ;;
    *) PART=$part bash benchmarks/session35_gpu.sh ;;
  esac
done
