#!/usr/bin/env bash
# Twenty-fifth session's plan for the next device calls (the machine idles out 30 s after a
# call: have the next command ready).
#   capped: the register-capped decode tiles (KernelConfig.max_registers, untimed) against the
#           shipped tile, splits sized for 8 vs 10-12 resident programs per SM; each cap's
#           error against float64 first; then the capped tiles' interpreter-independent tests.
#   kv4tune: if a cap wins, re-tune the shipped decode keys with it among the candidates
#           (KV4_BATCHES=16,64, then KV4_BATCHES=1) and merge `$OUT/cache` into h100.json.
source benchmarks/gpu_setup.sh
case "${PART:?PART=capped|kv4tune}" in
  capped)
    (cd benchmarks && timeout "${KV4_S:-240}" python3 probe_kv4_decode.py --prefetch 1 \
      --stage-v 1 --tiles 32x1 --max-registers 0,184,168 --splits 2,4,8,16 \
      --dtype float16 --shapes 16x32768,64x8192,16x8192 --out "$OUT/probe_capped.json") \
      2>&1 | tee "$OUT/probe_capped.log" | grep -v "^check decode_grouped"
    (cd benchmarks && timeout "${KV4_B1_S:-120}" python3 probe_kv4_decode.py --prefetch 1 \
      --stage-v 1 --tiles 32x1 --max-registers 0,184 --splits 64,128 \
      --dtype float16 --shapes 1x32768,1x8192 --out "$OUT/probe_capped_b1.json") \
      2>&1 | tee "$OUT/probe_capped_b1.log" | grep -v "^check"
    ;;
  kv4tune)
    KV4_S=${KV4_S:-300} PART=kv4tune bash benchmarks/session23_gpu.sh
    ;;
esac
