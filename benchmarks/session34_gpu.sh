#!/usr/bin/env bash
# Thirty-fourth session. PART is a comma-separated list of:
#   pdltests, pdl32, bench, bench16: as in session33_gpu.sh (none of them ran there).
#   ncu64:  Nsight Compute on the lane-MMA kernel at M = 64 and M = 16 on 28672x4096, with the
#           shipped H100 configs: is the M = 64 point (1.18x cuBLAS, target 2.0x) L1-, L2- or
#           latency-bound? The x fragments a warp loads are 2 * M_TILES / N_TILES times its
#           weight bytes (8x at 64 rows), and the time grows with the B tiles.
#   rows:   the lane kernel in row blocks (M past BLOCK_M: one program per row block and column
#           block) at M = 64 beside cuBLAS and the current pick, and BLOCK_K 32 (167 registers
#           against 239 at BLOCK_K 64, sm_90 offline). As it ran in this session (results/
#           session34/rows/) it also swept two knobs since removed (commit 6ef6f18 has them):
#           `--stages 1,3` (the words asked of L2 two blocks ahead) and `--hints-top 3` (words
#           .cg, x evict_last); the options below are what the probe still offers.
source benchmarks/gpu_setup.sh
for part in ${PART//,/ }; do
  mkdir -p "$OUT/$part"
  case "$part" in
    pdltests|pdl32|bench|bench16)
      PART=$part bash benchmarks/session33_gpu.sh
      ;;
    ncu64)
      NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
      echo "ncu: ${NCU:-none}" | tee "$OUT/$part/ncu.log"
      for run in "64 mma,64,128,64,1,4,1,1" "16 mma,16,64,128,2,2,1,1"; do
        set -- $run
        (cd benchmarks && timeout "${NCU_S:-120}" "$NCU" --clock-control none -k regex:w4a16 \
          --launch-skip 2 --launch-count 1 --section SpeedOfLight --section WarpStateStats \
          --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
          --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \
          --section InstructionStats python3 profile_w4a16.py 28672x4096 "$1" "$2") \
          2>&1 | grep -v "^==PROF==" | tail -150 >> "$OUT/$part/ncu.log"
      done
      grep -E "N=|Duration|Throughput|Hit Rate|Busy|Issue Slots|No Eligible|Stall|Occupancy|Registers|Pipe" \
        "$OUT/$part/ncu.log" | head -70
      ;;
    rows)
      (cd benchmarks && timeout "${ROWS_S:-240}" python3 probe_w4a16_mma.py \
        --shapes 28672x4096,8192x28672 --ms 64 --rows 32,64 --warps 4 --tiles 2,4 \
        --bks 32,64 --splits 1,2,4 --prefetch 1 --planes 0 \
        --out "$OUT/$part/probe64.json"
       [ "${ROWS256_S:-120}" = 0 ] || timeout "${ROWS256_S:-120}" python3 probe_w4a16_mma.py \
        --shapes 28672x4096 --ms 256 \
        --rows 32,64 --warps 4 --tiles 2,4 --bks 64 --splits 1,2 --prefetch 1 \
        --planes 0 --out "$OUT/$part/probe256.json") > "$OUT/$part/probe.log" 2>&1
      grep -E "N=|best by|rror" "$OUT/$part/probe.log" | cut -c1-220
      ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
