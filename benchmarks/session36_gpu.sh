#!/usr/bin/env bash
# Thirty-sixth session. PART is a comma-separated list of:
#   pdltests, pdl32, bench, bench16, gluon, wgmmatests, kernels, ws, tune, kv4pdl: as in
#   session35_gpu.sh (it runs them).
#   tune: tune_shipped.py --kinds TUNE_KINDS (default wgmma_rs,wgmma_rs_ws), M buckets TUNE_MS,
#        all its shapes, TUNE_DTYPES; then `tune_shipped.py --merge $OUT/tune/h100.json` here.
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
    *) PART=$part bash benchmarks/session35_gpu.sh ;;
  esac
done
