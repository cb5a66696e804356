#!/usr/bin/env bash
# Device calls on the H200 (the lent machine since 2026-12). Results are written under $R
# (/tmp/res) and packed into $OUT/res.tgz at the end (the device returns at most 8 files).
#   PHASE=baseline  what a user gets with the shipped configs (h100.json, read through the
#                   h200 -> h100 sibling fallback): the W4A16 kernel table at the issue's M
#                   values, then Llama-3-8B-shaped decode end to end (qcompile only, lm_head
#                   int4), and again with the compile-time settings KNOBS (Inductor config
#                   JSON) / GC (a:b:c gc thresholds) when set.
#   PHASE=warmup    compile + warm-up of the same decode benchmark with empty Inductor and
#                   Triton caches: as shipped, then with QCOMPILE_PRECOMPILE=1 (the W4A16
#                   kernels compiled during Inductor's compile); then a warm restart on the
#                   first run's caches. (results/h200/warmup measured GC thresholds and
#                   Inductor options at commit 25c69c1: no effect.)
#   PHASE=tune      H200 configs for M buckets 1 and 16 (TUNE_MS): each key's H100 config against the
#                   GEMV and lane-MMA candidates (fp16 acceptance shapes, then the bf16 fused
#                   Llama-3-8B shapes), merged into $R/h200.json and installed as the shipped
#                   file; then the kernel table and the decode benchmark with it.
#   PHASE=probe     the W4A16 kernel tests on the GPU (hypothesis included: the gate for
#                   32/64-row lane-MMA and its prefetch), then the lane-MMA probe with and
#                   without the next-BLOCK_K prefetch (LEVELS, default 0,1) at M = 1 to 64.
set -o pipefail
: "${OUT:?set OUT}"
R=/tmp/res
mkdir -p $R
trap 'tar czf "$OUT/res.tgz" -C $R . ; cp $R/*.md "$OUT"/ 2>/dev/null' EXIT
export PYTHONUNBUFFERED=1 QCOMPILE_CACHE_DIR=$R/cache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,power.limit --format=csv,noheader | tee $R/env.txt
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a $R/env.txt
case "${PHASE:-baseline}" in
  baseline)
    export QCOMPILE_AUTOTUNE=0
    timeout "${BENCH_S:-170}" python3 benchmarks/bench_w4a16.py --out "$R/w4a16" \
      --shapes "${SHAPES:-8192x28672,28672x4096,4096x4096}" --ms "${MS:-1,16,64,256,1024}" \
      > "$R/w4a16.log" 2>&1
    cp "$R/w4a16/w4a16.md" "$R/kernels.md"
    grep -E "^\|" "$R/kernels.md" | head -40
    timeout "${E2E_S:-230}" python3 benchmarks/bench_e2e.py --layers 32 --batches 1,16 \
      --new-tokens 48 --lm-head --profile --variants qcompile_w4a16 --out "$R/e2e" \
      > "$R/e2e.log" 2>&1
    cp "$R/e2e/e2e.md" "$R/e2e.md"
    grep -E "^\| qcompile" "$R/e2e.md"
    if [ -n "${KNOBS:-}${GC:-}" ]; then
      timeout "${E2E2_S:-200}" python3 benchmarks/bench_e2e.py --layers 32 --batches 1,16 \
        --new-tokens 48 --lm-head --variants qcompile_w4a16 --out "$R/e2e_knobs" \
        --inductor-config "${KNOBS:-"{}"}" ${GC:+--gc-threshold "$GC"} > "$R/e2e_knobs.log" 2>&1
      cp "$R/e2e_knobs/e2e.md" "$R/e2e_knobs.md"
      grep -E "^\| qcompile" "$R/e2e_knobs.md"
    fi
    ;;
  tune)
    # TUNE_JOBS: dtype:shapes:M values, space-separated; each job gets TUNE_S seconds
    jobs=${TUNE_JOBS:-"float16:8192x28672,28672x4096:1,16 bfloat16:6144x4096,28672x4096,4096x14336,4096x4096,128256x4096:1,16"}
    cp qcompile/lowering/configs/h200.json "$R/h200.json"  # keys not re-tuned here stay
    i=0
    for job in $jobs; do
      IFS=: read -r dtype shapes ms <<< "$job"
      i=$((i + 1))
      timeout "${TUNE_S:-170}" python3 benchmarks/tune_shipped.py --out "$R/tuned_$i.json" \
        --dtypes "$dtype" --shapes "$shapes" --ms "$ms" --kinds "${KINDS:-gemv,mma}" \
        > "$R/tuned_$i.log" 2>&1
      tail -n 12 "$R/tuned_$i.log" | cut -c1-220
      python3 benchmarks/tune_shipped.py --merge "$R/tuned_$i.json" --out "$R/h200.json"
    done
    cp "$R/h200.json" qcompile/lowering/configs/h200.json
    export QCOMPILE_AUTOTUNE=0
    timeout "${BENCH_S:-70}" python3 benchmarks/bench_w4a16.py --out "$R/w4a16" \
      --shapes 8192x28672,28672x4096 --ms "${MS:-1,16}" > "$R/w4a16.log" 2>&1
    cp "$R/w4a16/w4a16.md" "$R/kernels.md"; grep -E "^\|" "$R/kernels.md"
    timeout "${E2E_S:-170}" python3 benchmarks/bench_e2e.py --layers 32 --batches 1,16 \
      --new-tokens 32 --lm-head --variants qcompile_w4a16 --out "$R/e2e" > "$R/e2e.log" 2>&1
    cp "$R/e2e/e2e.md" "$R/e2e.md"; grep -E "^\| qcompile" "$R/e2e.md"
    ;;
  warmup)
    export QCOMPILE_AUTOTUNE=0
    run() {  # name, then extra bench_e2e flags; env assignments (CACHE: reuse the caches
      # of that earlier run) go before the call
      export TORCHINDUCTOR_CACHE_DIR=/tmp/ind_${CACHE:-$1} TRITON_CACHE_DIR=/tmp/tri_${CACHE:-$1}
      local name=$1; shift
      timeout "${RUN_S:-180}" python3 benchmarks/bench_e2e.py --layers 32 --batches 1,16 \
        --new-tokens 32 --lm-head --variants qcompile_w4a16 --out "$R/$name" "$@" \
        > "$R/$name.log" 2>&1
      cp "$R/$name/e2e.md" "$R/$name.md"
      echo "== $name"; grep -E "^\| qcompile" "$R/$name.md"
    }
    run defaults
    QCOMPILE_PRECOMPILE=1 run precompile
    # a warm restart: the caches of "defaults" (AOT autograd's cache now takes our graph)
    CACHE=defaults run restart
    ;;
  probe)
    OUT=$R ONLY=w4a16_kernels TEST_S="${TEST_S:-240}" bash benchmarks/gpu_tests.sh
    export QCOMPILE_AUTOTUNE=0
    probe() {  # name, M values, BLOCK_Ks, seconds
      timeout "$4" python3 benchmarks/probe_w4a16_mma.py --out "$R/$1.json" \
         --shapes "${SHAPES:-8192x28672,28672x4096}" --ms "$2" --warps 2,4 --tiles 2 \
         --bks "$3" --splits 1,2,4,8 --prefetch "${LEVELS:-0,1}" --planes 0 > "$R/$1.log" 2>&1
      grep -E "^N=|best by" "$R/$1.log"
    }
    probe prefetch_m1_16 1,16 128 "${PROBE1_S:-130}"
    probe prefetch_m32_64 32,64 64,128 "${PROBE2_S:-170}"
    ;;
esac
