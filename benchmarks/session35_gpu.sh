#!/usr/bin/env bash
# Thirty-fifth session. PART is a comma-separated list of:
#   pf2:     the lane kernel's register prefetch two blocks ahead (`prefetch` 2) against one
#            (1) and none, at M = 1 and 16 on the two large shapes (probe_w4a16_mma.py).
#   pdltests, pdl32, bench, bench16: as in session33_gpu.sh (it runs them).
#   kv4pdl:  probe_e2e_long.py at 16 layers with --pdl --kv4-pdl: the KV4 cache write and
#            decode_t attention under PDL (`_KV4_PDL`) against the same without.
source benchmarks/gpu_setup.sh
for part in ${PART//,/ }; do
  mkdir -p "$OUT/$part"
  case "$part" in
    pf2)
      timeout "${PF2_S:-200}" python3 benchmarks/probe_w4a16_mma.py --shapes 28672x4096,8192x28672 \
        --ms ${PF2_MS:-16,1} --warps ${PF2_WARPS:-4} --tiles 2 --bks ${PF2_BKS:-64,128} \
        --splits ${PF2_SPLITS:-1,2,4,8,16} --prefetch 0,1,2 --planes 0 --reduce-unroll ${PF2_UNROLL:-1,8} \
        --out "$OUT/$part/probe.json" > "$OUT/$part/probe.log" 2>&1
      grep -v "^ *$" "$OUT/$part/probe.log" | cut -c1-160 | tail -40
      ;;
    pdltests|pdl32|bench|bench16)
      PART=$part bash benchmarks/session33_gpu.sh
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
