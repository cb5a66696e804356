"""W4A16 linear on the GPU: qcompile vs cuBLAS fp16 (F.linear) vs tinygemm (_weight_int4pack_mm).

Every timing is the median over batches of CUDA-graph replays; each graph runs the op over R
weight copies (R * weight bytes >= 4 x L2) so small shapes are not served from L2.
Roofline floor = bytes moved once (int4 codes + fp16 scales/offsets + x + out) / HBM bandwidth,
measured here with a device-to-device copy.

    python benchmarks/bench_w4a16.py --out benchmarks/results   # on the H100
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from weights import random_packed

from qcompile.lowering.autotune import autotuner

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (8192, 28672)]  # N x K
MS = [1, 16, 64, 256, 1024]
GROUP = 128


def hbm_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy, counting read + write."""
    a = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    del a, b
    return 2 * 2 * 1024**3 * 10 / (start.elapsed_time(end) / 1e3)


def time_graph(calls: list, batches: int = 15, min_ms: float = 20.0) -> float:
    """Median microseconds per call of `calls` (one per weight copy) replayed in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:  # warm-up outside capture (compiles, tunes, allocates)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    once_ms = (time.perf_counter() - t0) * 1e3
    iters = max(1, math.ceil(min_ms / max(once_ms, 1e-3)))
    samples = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / (iters * len(calls)))
    del graph
    return statistics.median(samples)


def copies(nbytes: int, l2_bytes: int, cap: int = 32) -> int:
    """Weight (or cache) copies to rotate through so R * nbytes >= 4 x L2, at most `cap`."""
    return max(1, min(cap, math.ceil(4 * l2_bytes / max(nbytes, 1))))


def bench_shape(
    n: int, k: int, ms: list[int], l2: int, bw: float, lane_pdl: bool = False
) -> list[dict]:
    from qcompile.lowering import w4a16 as lowering
    from qcompile.lowering.autotune import TuneKey, autotuner, m_bucket
    from qcompile.lowering.w4a16 import w4a16_linear_cuda

    rows = []
    dev = "cuda"
    # qcompile: random codes and scales of the real shapes (speed does not depend on values).
    int4_bytes = n * k // 2 + 2 * 2 * (k // GROUP) * n
    r_q = copies(int4_bytes, l2)
    packed = [random_packed(n, k, GROUP, torch.float16) for _ in range(r_q)]
    qws = [p.qweight for p in packed]
    scales = [p.scales for p in packed]
    offsets = [p.offsets for p in packed]
    r_f = copies(2 * n * k, l2)
    wf = [torch.randn(n, k, dtype=torch.float16, device=dev) * 0.02 for _ in range(r_f)]
    tiny = []
    try:
        for _ in range(r_q):
            u8 = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev)
            sz = torch.rand(k // GROUP, n, 2, dtype=torch.bfloat16, device=dev)
            tiny.append((torch._convert_weight_to_int4pack(u8, 8), sz))
    except Exception as err:  # noqa: BLE001
        print(f"tinygemm unavailable: {err}")
        tiny = []
    for m in ms:
        x = torch.randn(m, k, dtype=torch.float16, device=dev)
        xb = x.to(torch.bfloat16)
        row = {"n": n, "k": k, "m": m, "group": GROUP}
        row["cublas_fp16_us"] = time_graph([lambda x=x, w=w: F.linear(x, w) for w in wf])
        ours = [
            lambda x=x, q=q, s=s, o=o: w4a16_linear_cuda(x, q, s, o, None, GROUP)
            for q, s, o in zip(qws, scales, offsets, strict=True)
        ]
        shipped_pdl = lowering._LANE_PDL
        if lane_pdl:  # the same configs with the lane kernel launched plainly and with PDL
            lowering._LANE_PDL = False
        try:
            row["qcompile_us"] = time_graph(ours)
            if lane_pdl:
                want = w4a16_linear_cuda(x, qws[0], scales[0], offsets[0], None, GROUP)
                lowering._LANE_PDL = True
                row["qcompile_pdl_us"] = time_graph(ours)
                # one call checked against the plain launch: PDL must not change a bit
                got = w4a16_linear_cuda(x, qws[0], scales[0], offsets[0], None, GROUP)
                row["pdl_bit_exact"] = bool(torch.equal(want, got))
        finally:
            lowering._LANE_PDL = shipped_pdl
        if tiny:
            row["tinygemm_bf16_us"] = time_graph(
                [
                    lambda xb=xb, p=p, sz=sz: torch._weight_int4pack_mm(xb, p, GROUP, sz)
                    for p, sz in tiny
                ]
            )
        bytes_q = int4_bytes + 2 * (m * k + m * n)
        bytes_f = 2 * n * k + 2 * (m * k + m * n)
        row["roofline_int4_us"] = bytes_q / bw * 1e6
        row["roofline_fp16_us"] = bytes_f / bw * 1e6
        row["speedup_vs_cublas"] = row["cublas_fp16_us"] / row["qcompile_us"]
        if tiny:
            row["speedup_vs_tinygemm"] = row["tinygemm_bf16_us"] / row["qcompile_us"]
        key = TuneKey("w4a16", m_bucket(m), n, k, GROUP, "float16")
        cfg = autotuner(0).lookup(key)
        row["config"] = None if cfg is None else cfg.__dict__
        rows.append(row)
        print(
            f"N={n:6d} K={k:6d} M={m:5d}  cublas {row['cublas_fp16_us']:8.1f}  qcompile {row['qcompile_us']:8.1f}"
            f"  tinygemm {row.get('tinygemm_bf16_us', float('nan')):8.1f}  floor {row['roofline_int4_us']:7.1f}"
            f"  x{row['speedup_vs_cublas']:.2f}"
            + (f"  pdl {row['qcompile_pdl_us']:.1f}" if "qcompile_pdl_us" in row else "")
            + f"  {cfg}",
            flush=True,
        )
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# W4A16 linear: qcompile vs cuBLAS fp16 vs tinygemm",
        "",
        f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; "
        f"HBM bandwidth measured {meta['hbm_tb_s']:.2f} TB/s; group size {GROUP}; CUDA-graph replays, "
        "weights rotated over >= 4x L2. Times in microseconds (median). Speedup = cuBLAS / qcompile.",
        "",
        "| N x K | M | cuBLAS fp16 | tinygemm bf16 | qcompile fp16 | int4 floor | % of floor | vs cuBLAS | vs tinygemm |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tg = r.get("tinygemm_bf16_us")
        lines.append(
            f"| {r['n']}x{r['k']} | {r['m']} | {r['cublas_fp16_us']:.1f} | "
            f"{'n/a' if tg is None else f'{tg:.1f}'} | {r['qcompile_us']:.1f} | {r['roofline_int4_us']:.1f} | "
            f"{100 * r['roofline_int4_us'] / r['qcompile_us']:.0f}% | {r['speedup_vs_cublas']:.2f}x | "
            f"{'n/a' if tg is None else format(r['speedup_vs_tinygemm'], '.2f') + 'x'} |"
        )
    pdl = [r for r in rows if "qcompile_pdl_us" in r]
    if pdl:
        lines += [
            "",
            "The table above launches the lane kernel plainly (`--lane-pdl`); with programmatic "
            "dependent launch, as shipped (same configs and run; rows whose kernel is not the "
            "lane kernel are the plain launch):",
            "",
            "| N x K | M | qcompile | with PDL | vs cuBLAS with PDL | bit-exact |",
            "|---|---:|---:|---:|---:|---|",
        ]
        lines += [
            f"| {r['n']}x{r['k']} | {r['m']} | {r['qcompile_us']:.1f} | "
            f"{r['qcompile_pdl_us']:.1f} | {r['cublas_fp16_us'] / r['qcompile_pdl_us']:.2f}x | "
            f"{'yes' if r['pdl_bit_exact'] else 'NO'} |"
            for r in pdl
        ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for n, k in sorted({(r["n"], r["k"]) for r in rows}):
        sel = [r for r in rows if (r["n"], r["k"]) == (n, k)]
        ax.plot(
            [r["m"] for r in sel],
            [r["speedup_vs_cublas"] for r in sel],
            marker="o",
            label=f"{n}x{k}",
        )
        if "speedup_vs_tinygemm" in sel[0]:
            ax.plot(
                [r["m"] for r in sel],
                [r["cublas_fp16_us"] / r["tinygemm_bf16_us"] for r in sel],
                ls=":", color=ax.lines[-1].get_color(), alpha=0.6,
            )  # fmt: skip
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (tokens)")
    ax.set_ylabel("speedup over cuBLAS fp16")
    ax.set_title("qcompile W4A16 (solid) and tinygemm (dotted) vs cuBLAS fp16")
    ax.legend(title="N x K")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument(
        "--retune", action="store_true",
        help="tune every shape afresh (ignore the shipped configs and the user cache)",
    )  # fmt: skip
    ap.add_argument(
        "--lane-pdl", action="store_true",
        help="time each shape with the lane kernel launched plainly (the table's qcompile "
        "column) and under programmatic dependent launch (shipped: `_LANE_PDL`)",
    )  # fmt: skip
    args = ap.parse_args()
    import triton

    if args.retune:
        autotuner(0).shipped = {}
        autotuner(0).user = {}

    args.out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    bw = hbm_bandwidth()
    meta = {
        "device": props.name, "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "hbm_tb_s": bw / 1e12, "l2_bytes": props.L2_cache_size,
    }  # fmt: skip
    print(meta, flush=True)
    rows: list[dict] = []
    ms = [int(m) for m in args.ms.split(",")]
    for spec in args.shapes.split(","):
        n, k = map(int, spec.split("x"))
        rows += bench_shape(n, k, ms, props.L2_cache_size, bw, args.lane_pdl)
        torch.cuda.empty_cache()
        (args.out / "w4a16.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        trials = {
            str(asdict(key)): [{"us": us, **asdict(cfg)} for us, cfg in results[:12]]
            for key, results in autotuner(0).trials.items()
        }  # the best dozen configs per tuned key: which kernel kind wins where
        (args.out / "tuning_trials.json").write_text(json.dumps(trials, indent=1))
    (args.out / "w4a16.md").write_text(markdown(meta, rows))
    plot(rows, args.out / "w4a16_speedup.png")
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
