#!/usr/bin/env bash
# A/B/A: the KV4 decode table with the 64-bit cache slabs (current), without (decea0c's
# kv4_attention / decode_attention), and current again, on one warm machine.
source benchmarks/gpu_setup.sh
L=qcompile/lowering
cp $L/kv4_attention.py /tmp/kv4_cur.py; cp $L/decode_attention.py /tmp/dec_cur.py
run() {
  mkdir -p "$OUT/$1"
  (cd benchmarks && timeout 200 python3 bench_kv4.py --out "$OUT/$1" --batches 16,64,1 \
    --lengths 32768,8192 --prefill '') 2>&1 | grep "^| [0-9]" | sed "s/^/$1 /"
}
run cur1
cp benchmarks/ab/kv4_attention_pre_slab.py $L/kv4_attention.py
cp benchmarks/ab/decode_attention_pre_slab.py $L/decode_attention.py
run pre
cp /tmp/kv4_cur.py $L/kv4_attention.py; cp /tmp/dec_cur.py $L/decode_attention.py
run cur2
