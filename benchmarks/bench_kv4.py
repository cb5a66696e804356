"""KV4 attention on the GPU: qcompile's int4-cache kernels vs fp16 SDPA, decode and prefill.

Decode: one query token per sequence, B in {1, 16, 64}, cache length S in {1k, 4k, 8k, 32k},
32 query / 8 KV heads, head_dim 128, KV4 group 128. Baseline: the faster of two fp16 SDPA
calls over the same (unquantized) cache, `enable_gqa=True`, and the 4 query heads of a KV
head packed as 4 query rows (what transformers does for decode; lets SDPA use its flash
kernel). Prefill: B=1, Sq = S in {1k, 4k, 8k}, causal, vs fp16 SDPA (flash, causal), with
and without the cache write that quantizes the prompt's K/V. Decode rows also time
qcompile's `decode_attention` (flash-decoding over the 16-bit cache, what the attention pass
runs for a GQA decode step without a KV4 cache) against the same SDPA baseline.

Every timing is the median over batches of CUDA-graph replays; each graph runs the call over
R cache copies (R * cache bytes >= 4 x L2) so short caches are not served from L2. Roofline
floor = bytes read once (KV codes + scales/offsets, or fp16 K/V, plus q and out) / HBM
bandwidth measured with a device-to-device copy.

    python benchmarks/bench_kv4.py --out benchmarks/results   # on the H100
    OUT=... benchmarks/kv4_session.sh                          # tests + benchmark, one call
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from qcompile.quant.kv4 import PackedKV4

HQ, HKV, D, GROUP = 32, 8, 128, 128
DECODE_BATCHES = (1, 16, 64)
DECODE_LENGTHS = (1024, 4096, 8192, 32768)
PREFILL_LENGTHS = (1024, 4096, 8192)
ACCEPT_DECODE_SPEEDUP = 3.0  # at S >= 8k
ACCEPT_PREFILL_RATIO = 1.2  # qcompile / SDPA time
ACCEPT_MEMORY = 0.3


def kv_bytes(b: int, hkv: int, s: int, d: int, group: int | None) -> int:
    """Bytes of K and V for B x Hkv x S tokens: packed int4 + fp16 scales/offsets, or fp16."""
    if group is None:
        return 2 * b * hkv * s * d * 2
    return 2 * b * hkv * s * (d // 2 + 2 * 2 * (d // group))


def random_kv4(
    b: int, hkv: int, s: int, d: int, group: int, device: str = "cuda"
) -> tuple[PackedKV4, PackedKV4]:
    """Uniform random codes and small scales in the cache layout (speed does not depend on values)."""

    def one() -> PackedKV4:
        codes = torch.randint(0, 256, (b, hkv, s, d // 2), dtype=torch.uint8, device=device)
        scales = torch.rand(b, hkv, s, d // group, device=device).half() * 0.05 + 1e-3
        return PackedKV4(codes, scales, -8 * scales, group)

    return one(), one()


def decode_row(b: int, s: int, l2: int, bw: float, free_bytes: int) -> dict:
    from bench_w4a16 import copies, time_graph

    from qcompile.lowering.autotune import autotuner
    from qcompile.lowering.kv4_attention import kv4_attention_cuda, tune_key

    row = {"phase": "decode", "b": b, "s": s, "hq": HQ, "hkv": HKV, "d": D, "group": GROUP}
    int4, fp16 = kv_bytes(b, HKV, s, D, GROUP), kv_bytes(b, HKV, s, D, None)
    q = torch.randn(b, HQ, 1, D, dtype=torch.float16, device="cuda")
    scale = D**-0.5
    caches = [random_kv4(b, HKV, s, D, GROUP) for _ in range(copies(int4, l2, cap=16))]
    row["qcompile_us"] = time_graph(
        [
            lambda k=k, v=v: kv4_attention_cuda(
                q,
                k.codes,
                k.scales,
                k.offsets,
                v.codes,
                v.scales,
                v.offsets,
                None,
                None,
                False,
                scale,
            )  # fmt: skip
            for k, v in caches
        ]
    )
    cfg = autotuner(0).lookup(tune_key(q, caches[0][0].codes, caches[0][0].scales))
    row["config"] = None if cfg is None else cfg.__dict__
    del caches
    if fp16 * 1.1 < free_bytes:
        kv = [
            tuple(torch.randn(b, HKV, s, D, dtype=torch.float16, device="cuda") for _ in "kv")
            for _ in range(copies(fp16, l2, cap=16))
        ]
        row["sdpa_gqa_us"] = time_graph(
            [
                lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                for k, v in kv
            ]
        )
        q_packed = q.view(b, HKV, HQ // HKV, D)  # the query heads of a KV head as query rows
        row["sdpa_packed_us"] = time_graph(
            [lambda k=k, v=v: F.scaled_dot_product_attention(q_packed, k, v) for k, v in kv]
        )
        # qcompile's flash-decoding over the same 16-bit cache (decode_attention)
        from qcompile.lowering import decode_attention as d16

        row["decode16_us"] = time_graph(
            [lambda k=k, v=v: d16.decode_attention_cuda(q, k, v, None, scale) for k, v in kv]
        )
        cfg16 = autotuner(0).lookup(d16.tune_key(q, kv[0][0]))
        row["decode16_config"] = None if cfg16 is None else cfg16.__dict__
        del kv
        row["sdpa_us"] = min(row["sdpa_gqa_us"], row["sdpa_packed_us"])
        row["speedup_vs_sdpa"] = row["sdpa_us"] / row["qcompile_us"]
        row["decode16_vs_sdpa"] = row["sdpa_us"] / row["decode16_us"]
    row["roofline_int4_us"] = (int4 + 4 * b * HQ * D) / bw * 1e6
    row["roofline_fp16_us"] = (fp16 + 4 * b * HQ * D) / bw * 1e6
    row["memory_ratio"] = int4 / fp16
    torch.cuda.empty_cache()
    return row


def prefill_row(s: int, l2: int, bw: float) -> dict:
    from bench_w4a16 import time_graph

    from qcompile.lowering.kv4_attention import kv4_attention_cuda, kv4_cache_write_cuda

    row = {"phase": "prefill", "b": 1, "s": s, "hq": HQ, "hkv": HKV, "d": D, "group": GROUP}
    q = torch.randn(1, HQ, s, D, dtype=torch.float16, device="cuda")
    k = torch.randn(1, HKV, s, D, dtype=torch.float16, device="cuda")
    v = torch.randn_like(k)
    keys, values = random_kv4(1, HKV, s, D, GROUP)
    scale = D**-0.5
    positions = torch.arange(s, device="cuda")
    packed = (keys.codes, keys.scales, keys.offsets, values.codes, values.scales, values.offsets)

    def attend():
        return kv4_attention_cuda(q, *packed, None, None, True, scale)

    def write():
        kv4_cache_write_cuda(k, v, *packed, positions)

    row["sdpa_us"] = time_graph(
        [lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)]
    )
    row["qcompile_us"] = time_graph([attend])
    row["cache_write_us"] = time_graph([write])
    row["qcompile_with_write_us"] = row["qcompile_us"] + row["cache_write_us"]
    row["ratio_vs_sdpa"] = row["qcompile_us"] / row["sdpa_us"]
    row["ratio_with_write_vs_sdpa"] = row["qcompile_with_write_us"] / row["sdpa_us"]
    flops = 4 * s * s * D * HQ / 2  # two matmuls, causal half
    row["sdpa_tflops"] = flops / row["sdpa_us"] / 1e6
    row["qcompile_tflops"] = flops / row["qcompile_us"] / 1e6
    # KVScheme.fresh_prefill (the default): the prompt into an empty cache attends to itself
    # in 16 bits. It branches on the host, so it is not graph-captured: both it and SDPA are
    # timed eagerly here (triton's do_bench, median), side by side.
    from triton.testing import do_bench

    from qcompile.ops.kv4 import kv4_prefill_attention_fast

    def fresh():
        # start_hint=0: what an eagerly used KV4Cache passes (it knows its length on the host)
        return kv4_prefill_attention_fast(q, k, v, *packed, positions, None, scale, None, None, 0)

    row["sdpa_eager_us"] = 1e3 * do_bench(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        return_mode="median",
    )  # fmt: skip
    row["fresh_eager_us"] = 1e3 * do_bench(fresh, return_mode="median")
    # With start_hint the fresh path has no host branch on device data, so it also runs in a
    # CUDA graph: GPU time without the eager launch overhead (a compiled model's case).
    row["fresh_graph_us"] = time_graph([fresh])
    row["fresh_graph_with_write_vs_sdpa"] = (row["fresh_graph_us"] + row["cache_write_us"]) / row[
        "sdpa_us"
    ]
    # What an fp16 model's prefill also does: transformers' StaticCache.update copies the
    # prompt's K and V into its fp16 cache (two index_copy_), as our write quantizes them
    kc, vc = (torch.empty(1, HKV, s, D, dtype=torch.float16, device="cuda") for _ in "kv")
    row["fp16_cache_write_us"] = time_graph(
        [lambda: (kc.index_copy_(2, positions, k), vc.index_copy_(2, positions, v))]
    )
    row["fresh_graph_with_write_vs_fp16_prefill"] = (
        row["fresh_graph_us"] + row["cache_write_us"]
    ) / (row["sdpa_us"] + row["fp16_cache_write_us"])
    # The cache write's tokens per program and warps (default 16 / 4), side by side
    row["cache_write_variants"] = [
        {"block_t": bt, "num_warps": w, "us": time_graph(
            [lambda bt=bt, w=w: kv4_cache_write_cuda(k, v, *packed, positions, bt, None, w)]
        )}
        for bt, w in ((8, 2), (8, 4), (16, 2), (16, 4), (32, 4), (64, 4), (128, 8))
    ]  # fmt: skip
    row["fresh_with_write_vs_sdpa"] = (row["fresh_eager_us"] + row["cache_write_us"]) / row[
        "sdpa_eager_us"
    ]
    torch.cuda.empty_cache()
    return row


def markdown(meta: dict, rows: list[dict]) -> str:
    """The results as tables: decode (speedup, % of the int4 floor) and prefill (ratio)."""
    lines = [
        "# KV4 attention: qcompile int4 cache vs fp16 SDPA",
        "",
        f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; HBM "
        f"bandwidth measured {meta['hbm_tb_s']:.2f} TB/s. {HQ} query / {HKV} KV heads, "
        f"head_dim {D}, KV4 group {GROUP}. CUDA-graph replays, caches rotated over >= 4x L2; "
        "microseconds (median).",
        "",
        f"## Decode (acceptance: >= {ACCEPT_DECODE_SPEEDUP}x SDPA at S >= 8k; KV memory "
        f"<= {ACCEPT_MEMORY}x fp16)",
        "",
        "| B | S | SDPA fp16 | qcompile KV4 | int4 floor | % of floor | speedup | memory | config "
        "| qcompile fp16 cache | fp16 floor | vs SDPA |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in (r for r in rows if r["phase"] == "decode"):
        sdpa = r.get("sdpa_us")
        cfg = r.get("config") or {}
        lines.append(
            f"| {r['b']} | {r['s']} | {'n/a' if sdpa is None else f'{sdpa:.1f}'} | "
            f"{r['qcompile_us']:.1f} | {r['roofline_int4_us']:.1f} | "
            f"{100 * r['roofline_int4_us'] / r['qcompile_us']:.0f}% | "
            f"{'n/a' if sdpa is None else format(r['speedup_vs_sdpa'], '.2f') + 'x'} | "
            f"{r['memory_ratio']:.3f}x | "
            f"{cfg.get('kernel', '')} n{cfg.get('block_n', '')} split{cfg.get('split_k', '')} | "
            + (
                f"{r['decode16_us']:.1f} | {r['roofline_fp16_us']:.1f} | "
                f"{r['decode16_vs_sdpa']:.2f}x |"
                if "decode16_us" in r
                else "n/a | | |"
            )
        )
    lines += [
        "",
        f"## Prefill, causal, B=1 (acceptance: <= {ACCEPT_PREFILL_RATIO}x SDPA)",
        "",
        "4-bit prefill kernel (`fresh_prefill=False`, CUDA graphs) and the default "
        "`fresh_prefill` path (the prompt reads itself in 16 bits), eager (do_bench) and in a "
        "CUDA graph; SDPA and the cache write are CUDA-graph times.",
        "",
        "| S | SDPA fp16 | qcompile KV4 | cache write | ratio | ratio with write | TFLOP/s SDPA / KV4 "
        "| SDPA eager | fresh_prefill eager | fresh + write vs SDPA (eager) "
        "| fresh_prefill graph | fresh + write vs SDPA (graphs) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in (r for r in rows if r["phase"] == "prefill"):
        lines.append(
            f"| {r['s']} | {r['sdpa_us']:.1f} | {r['qcompile_us']:.1f} | "
            f"{r['cache_write_us']:.1f} | {r['ratio_vs_sdpa']:.2f}x | "
            f"{r['ratio_with_write_vs_sdpa']:.2f}x | "
            f"{r['sdpa_tflops']:.0f} / {r['qcompile_tflops']:.0f} | "
            + (
                f"{r['sdpa_eager_us']:.1f} | {r['fresh_eager_us']:.1f} | "
                f"{r['fresh_with_write_vs_sdpa']:.2f}x | "
                if "fresh_eager_us" in r
                else "n/a | n/a | n/a | "
            )
            + (
                f"{r['fresh_graph_us']:.1f} | {r['fresh_graph_with_write_vs_sdpa']:.2f}x |"
                if "fresh_graph_us" in r
                else "n/a | n/a |"
            )
        )
    fp16 = [r for r in rows if r["phase"] == "prefill" and "fp16_cache_write_us" in r]
    if fp16:
        lines += [
            "",
            "Against an fp16 model's whole prefill step, which also writes its cache "
            "(transformers' `StaticCache.update`: K and V by `index_copy_`), CUDA graphs:",
            "",
            "| S | SDPA + fp16 cache write | fresh_prefill + KV4 cache write | ratio |",
            "|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['s']} | {r['sdpa_us']:.1f} + {r['fp16_cache_write_us']:.1f} | "
            f"{r['fresh_graph_us']:.1f} + {r['cache_write_us']:.1f} | "
            f"{r['fresh_graph_with_write_vs_fp16_prefill']:.2f}x |"
            for r in fp16
        ]
    variants = [r for r in rows if r["phase"] == "prefill" and "cache_write_variants" in r]
    if variants:
        lines += ["", "Cache write, tokens per program / warps (CUDA graphs, us): " + "; ".join(
            f"S={r['s']}: " + ", ".join(
                f"{v['block_t']}/{v['num_warps']} {v['us']:.1f}" for v in r["cache_write_variants"]
            )
            for r in variants
        )]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--batches", default=",".join(map(str, DECODE_BATCHES)))
    ap.add_argument("--lengths", default=",".join(map(str, DECODE_LENGTHS)))
    ap.add_argument("--prefill", default=",".join(map(str, PREFILL_LENGTHS)))
    args = ap.parse_args()
    import triton
    from bench_w4a16 import hbm_bandwidth

    args.out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    bw = hbm_bandwidth()
    meta = {
        "device": props.name, "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "hbm_tb_s": bw / 1e12, "l2_bytes": props.L2_cache_size,
    }  # fmt: skip
    print(meta, flush=True)
    rows: list[dict] = []

    def save() -> None:
        (args.out / "kv4.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    for b in (int(x) for x in args.batches.split(",") if x):  # --batches "": prefill only
        for s in (int(x) for x in args.lengths.split(",") if x):
            free, _ = torch.cuda.mem_get_info()
            rows.append(decode_row(b, s, props.L2_cache_size, bw, free))
            print({k: v for k, v in rows[-1].items() if k != "config"}, flush=True)
            save()
    for s in (int(x) for x in args.prefill.split(",") if x):
        rows.append(prefill_row(s, props.L2_cache_size, bw))
        print(rows[-1], flush=True)
        save()
    (args.out / "kv4.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
