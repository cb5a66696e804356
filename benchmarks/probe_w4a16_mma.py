"""GPU probe: the lane-MMA W4A16 kernel over a grid of configs, beside cuBLAS fp16 and the
op's current pick, at M up to 64; every config is checked against dequantize + matmul.

CUDA-graph replays over weight copies rotated past L2 (`bench_w4a16.time_graph`).

    python benchmarks/probe_w4a16_mma.py --out $OUT/probe_w4a16_mma.json
    python benchmarks/probe_w4a16_mma.py --ms 32,64 --warps 2,4 --tiles 2 --bks 128 --planes 0
        # 4 and 8 B tiles (32 / 64 rows per program), a small grid
    python benchmarks/probe_w4a16_mma.py --prefetch 0,1 ...  # without and with the prefetch
    python benchmarks/probe_w4a16_mma.py --ms 64 --rows 32,64 ...  # 64 rows as two row blocks
    python benchmarks/probe_w4a16_mma.py --ms 1 --reduce-unroll 1,8 ...  # the split-K sum's
        # partials loaded one or 8 at a time
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_w4a16 import GROUP, SHAPES, hbm_bandwidth, time_graph
from weights import rotated_w4a16

from qcompile.lowering.autotune import KernelConfig, m_bucket
from qcompile.lowering.w4a16 import _useful_split, launch, valid_config, w4a16_linear_cuda
from qcompile.quant.int4 import dequantize_int4, to_planes


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def mma_configs(m: int, n: int, k: int, args: argparse.Namespace) -> list[KernelConfig]:
    """The grid of --rows x --warps x --tiles x --bks x --splits x --prefetch; rows: M's
    bucket (8 to 64) unless --rows says (fewer rows than M: row blocks). (--reduce-unroll
    multiplies the split configs in `main`.)"""
    out = []
    all_rows = _ints(args.rows) if args.rows else (min(64, max(8, m_bucket(m))),)
    grid = itertools.product(
        all_rows, _ints(args.warps), _ints(args.tiles), _ints(args.bks), _ints(args.splits),
        _ints(args.prefetch),
    )  # fmt: skip
    for rows, warps, tiles, bk, split, prefetch in grid:
        cfg = KernelConfig("mma", rows, 16 * tiles * warps, bk, split, warps, 1, prefetch)
        useful = args.any_split or _useful_split(-(-n // cfg.block_n) * -(-m // rows), split)
        if valid_config(cfg, k, GROUP) and useful:
            out.append(cfg)
    return out


def probe(
    cfg: KernelConfig,
    packed: list,
    x: torch.Tensor,
    ref: torch.Tensor,
    planes: bool,
    unroll: int = 1,
) -> dict:
    """Time one config (split-K sum `unroll` partials at a time) over the weight copies and
    check it against `ref`."""

    def run(p):
        return launch(
            cfg, x, p.qweight, p.scales, p.offsets, None, GROUP, x_planes=planes,
            reduce_unroll=unroll,
        )  # fmt: skip

    out = run(packed[0]).float()
    err = ((out - ref).norm() / ref.norm()).item()
    us = time_graph([lambda p=p: run(p) for p in packed], batches=7)
    return {
        "config": cfg.__dict__, "x_planes": planes, "reduce_unroll": unroll, "us": us,
        "rel_err": err,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--rows", default="", help="BLOCK_M values (default: M's bucket)")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--tiles", default="2,4", help="16-column A tiles per warp")
    ap.add_argument("--bks", default="128,256")
    ap.add_argument("--splits", default="1,2,4,8,16")
    ap.add_argument("--prefetch", default="0", help="prefetch: 0 off, 1 the next BLOCK_K")
    ap.add_argument("--planes", type=int, default=3, help="re-time the best N on plane-major x")
    ap.add_argument("--reduce-unroll", default="1", help="split-K sum: partials in flight")
    ap.add_argument(
        "--any-split", type=int, default=0,
        help="1: also splits whose grid passes the tuner's program cap (a grid of one full "
        "wave at a small tile, e.g. BN64 on 2 warps at split 4 on 28672x4096)",
    )  # fmt: skip
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    bw = hbm_bandwidth()
    print(f"HBM {bw / 1e12:.2f} TB/s", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "hbm_tb_s": bw / 1e12}  # fmt: skip
    results = []
    for spec in args.shapes.split(","):
        n, k = map(int, spec.split("x"))
        nbytes = n * k // 2 + 4 * (k // GROUP) * n
        packed, wf = rotated_w4a16(n, k, GROUP, dtype, l2)
        w_ref = dequantize_int4(packed[0], torch.float32)  # [N, K]
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            xp = to_planes(x)
            ref = x.float() @ w_ref.t()
            floor = (nbytes + 2 * (m * k + m * n)) / bw * 1e6
            row = {"n": n, "k": k, "m": m, "floor_us": floor}
            row["cublas_us"] = time_graph([lambda x=x, w=w: F.linear(x, w) for w in wf])
            row["current_us"] = time_graph(
                [
                    lambda x=x, p=p: w4a16_linear_cuda(
                        x, p.qweight, p.scales, p.offsets, None, GROUP
                    )
                    for p in packed
                ]  # fmt: skip
            )
            row["mma"] = []

            for cfg in mma_configs(m, n, k, args):  # natural x first, then the best plane-major
                for unroll in _ints(args.reduce_unroll) if cfg.split_k > 1 else (1,):
                    row["mma"].append(probe(cfg, packed, x, ref, False, unroll))
            row["mma"].sort(key=lambda r: r["us"])
            for r in row["mma"][: args.planes]:
                cfg = KernelConfig(**r["config"])
                row["mma"].append(probe(cfg, packed, xp, ref, True, r["reduce_unroll"]))
            row["mma"].sort(key=lambda r: r["us"])
            best = row["mma"][0]
            worst_err = max(r["rel_err"] for r in row["mma"])
            c = best["config"]
            print(
                f"N={n} K={k} M={m}: floor {floor:.1f} cublas {row['cublas_us']:.1f} current "
                f"{row['current_us']:.1f} | mma best {best['us']:.1f} "
                f"(bm{c['block_m']} w{c['num_warps']} bn{c['block_n']} bk{c['block_k']} "
                f"sk{c['split_k']} pf{int(c['prefetch'])} planes={best['x_planes']} "
                f"u{best['reduce_unroll']})"
                f" = {row['cublas_us'] / best['us']:.2f}x cublas, "
                f"{floor / best['us']:.0%} floor; max rel err {worst_err:.1e}",
                flush=True,
            )
            for r in row["mma"][1:5]:
                c = r["config"]
                print(f"    {r['us']:.1f} bm{c['block_m']} w{c['num_warps']} bn{c['block_n']} "
                      f"bk{c['block_k']} sk{c['split_k']} pf{int(c['prefetch'])} "
                      f"planes={r['x_planes']} u{r['reduce_unroll']}",
                      flush=True)  # fmt: skip
            # per prefetch / reduce-unroll setting, the best config: that option's effect alone
            for name, value, options in (
                ("prefetch", lambda r: int(r["config"]["prefetch"]), args.prefetch),
                ("unroll", lambda r: r["reduce_unroll"], args.reduce_unroll),
                ("rows", lambda r: r["config"]["block_m"], args.rows or str(c["block_m"])),
            ):
                best_by = {
                    str(v): min((r for r in row["mma"] if value(r) == v),
                                key=lambda r: r["us"], default=None)
                    for v in _ints(options)
                }  # fmt: skip
                row[f"best_by_{name}"] = best_by
                print(f"    best by {name}: " + ", ".join(
                    f"{v}: {r['us']:.1f}" for v, r in best_by.items() if r
                ), flush=True)  # fmt: skip
            results.append(row)
            if args.out:  # after every row: a run cut short by its time limit keeps its rows
                args.out.write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
        del packed, wf


if __name__ == "__main__":
    main()
