#!/usr/bin/env bash
# Thirty-ninth session. PART is a comma-separated list of:
#   tune16: W4A16 re-tuned with row pairs (wgmma_rs / wgmma_rs_ws candidates beside each key's
#           shipped pick) at TUNE_MS (default 16,256,1024) on TUNE_SHAPES (default the two
#           acceptance shapes), fp16, into $OUT/tune16/h100.json (merge it here).
#   kbench: bench_w4a16.py at KERNEL_MS (default 1,16,64,256,1024) on KBENCH_SHAPES (default
#           the two acceptance shapes) with the shipped configs.
#   bars:   (ran at commit 51d30bd; removed with `_SPLIT_BARRIERS`, which lost) its gpu test,
#           then probe_gluon_w4a16.py --bars 1,4 --configs 2,4,21,8,9,11,18,19 --fit-only
#           at M = 16, 64, 256.
#   w4a8v:  W4A8's wgmma_rs gpu tests (pairs, the producer warp), then probe_w4a8_wgmma.py
#           --variants rs,rs+pairs,ws,ws+pairs at W4A8V_MS (default 16,64) on the two
#           acceptance shapes and 4096x14336 (as run: also rs+bars, removed since).
#   pipe:   (next session) `w4a16_wgmma._PIPE` (each wgmma left in flight while the next is
#           issued): its gpu tests (bits equal to the plain kernel; W4A8 exact), then
#           probe_gluon_w4a16.py --pipe 0,1 at M = 256, 1024 (both kernels, no cap) and M = 16
#           (producer warp at 96 registers and wgmma_rs), then probe_w4a8_wgmma.py with and
#           without it at M = 16, 64, 256; on the two acceptance shapes.
#   absmax: (next session) the compiled producer -> W4A8 block with each row's absmax over
#           chunks (`quant.w4a8._ABSMAX_CHUNK`): bench_w4a8.py --absmax-chunk ABSMAX_CHUNK
#           (default 2048) at M = 1, 16 on 8192x28672 and 4096x14336 (SiLU * mul producers).
#   sub:    (next session) K tiles of two groups (`w4a16._SUBTILES`): their gpu tests (bits
#           equal to one-group tiles, W4A8 exact), then probe_gluon_w4a16.py at M = 16 (and
#           64) with one-group tiles beside two-group ones, both kernels, on the two
#           acceptance shapes.
#   anything else: session38_gpu.sh's parts (w4a8pairs, w4a8ws, w4a8, tune, kernels, ...).
source benchmarks/gpu_setup.sh
for part in ${PART//,/ }; do
  mkdir -p "$OUT/$part"
  case "$part" in
    tune16)
      timeout "${TUNE_S:-300}" python3 benchmarks/tune_shipped.py --kinds wgmma_rs,wgmma_rs_ws \
        --ms "${TUNE_MS:-16,256,1024}" --dtypes "${TUNE_DTYPES:-float16}" \
        --shapes "${TUNE_SHAPES:-8192x28672,28672x4096}" --out "$OUT/$part/h100.json" \
        > "$OUT/$part/tune.log" 2>&1
      grep -E "TuneKey|rror" "$OUT/$part/tune.log" | sed "s/TuneKey(family=//; s/group_size=128, //" | cut -c1-330
      ;;
    kbench)
      timeout "${KERNELS_S:-240}" python3 benchmarks/bench_w4a16.py --ms "${KERNEL_MS:-1,16,64,256,1024}" \
        --shapes "${KBENCH_SHAPES:-8192x28672,28672x4096}" --out "$OUT/$part" > "$OUT/$part/bench.log" 2>&1
      tail -14 "$OUT/$part/bench.log" | cut -c1-200
      ;;
    w4a8v)
      gpu_tests 200 "$OUT/$part/tests.log" tests/test_w4a8.py -k wgmma_rs
      if grep -qE "FAILED|ERROR" "$OUT/$part/tests.log"; then continue; fi
      timeout "${PROBE_S:-300}" python3 benchmarks/probe_w4a8_wgmma.py --ms "${W4A8V_MS:-16,64}" \
        --shapes 28672x4096,8192x28672,4096x14336 --variants rs,rs+pairs,ws,ws+pairs \
        --out "$OUT/$part/probe.json" > "$OUT/$part/probe.log" 2>&1
      grep "N=" "$OUT/$part/probe.log"
      ;;
    pipe)
      gpu_tests 200 "$OUT/$part/tests.log" tests/test_w4a16_wgmma.py tests/test_w4a8.py \
        -k "pipe or wgmma_rs_int8"
      if grep -qE "FAILED|ERROR" "$OUT/$part/tests.log"; then continue; fi
      timeout "${PIPE_S:-200}" python3 benchmarks/probe_gluon_w4a16.py --ms 256,1024 \
        --configs 16,18,19 --fit-only --ws 0,1 --pipe 0,1 \
        --out "$OUT/$part/large.json" > "$OUT/$part/large.log" 2>&1
      timeout "${PIPE16_S:-100}" python3 benchmarks/probe_gluon_w4a16.py --ms 16 \
        --configs 2,4,21 --fit-only --ws 0,1 --maxnreg 96 --pipe 0,1 \
        --out "$OUT/$part/m16.json" > "$OUT/$part/m16.log" 2>&1
      grep -h "N=" "$OUT/$part/large.log" "$OUT/$part/m16.log" | cut -c1-200
      timeout "${PIPE8_S:-200}" python3 benchmarks/probe_w4a8_wgmma.py --ms 16,64,256 \
        --variants rs+pairs,rs+pairs+pipe,ws+pairs,ws+pairs+pipe \
        --out "$OUT/$part/w4a8.json" > "$OUT/$part/w4a8.log" 2>&1
      grep "N=" "$OUT/$part/w4a8.log"
      ;;
    absmax)
      timeout "${ABSMAX_S:-240}" python3 benchmarks/bench_w4a8.py --ms 1,16 \
        --shapes 8192x28672,4096x14336 --absmax-chunk "${ABSMAX_CHUNK:-2048}" \
        --out "$OUT/$part" > "$OUT/$part/bench.log" 2>&1
      grep -E "chunks|rror" "$OUT/$part/bench.log" | cut -c1-220
      ;;
    sub)
      gpu_tests 200 "$OUT/$part/tests.log" tests/test_w4a16_wgmma.py tests/test_w4a8.py \
        -k "two_group or wgmma_rs_int8"
      if grep -qE "FAILED|ERROR" "$OUT/$part/tests.log"; then continue; fi
      timeout "${SUB_S:-240}" python3 benchmarks/probe_gluon_w4a16.py --ms 16 \
        --configs 2,4,21,26,27,28,29 --fit-only --ws 0,1 --maxnreg 0,96 \
        --out "$OUT/$part/m16.json" > "$OUT/$part/m16.log" 2>&1
      timeout "${SUB64_S:-120}" python3 benchmarks/probe_gluon_w4a16.py --ms 64 \
        --configs 8,9,11,30,31 --fit-only --ws 0,1 --maxnreg 0,96 \
        --out "$OUT/$part/m64.json" > "$OUT/$part/m64.log" 2>&1
      grep -h "N=" "$OUT/$part/m16.log" "$OUT/$part/m64.log" | cut -c1-200
      ;;
    *) PART=$part bash benchmarks/session38_gpu.sh ;;
  esac
done
