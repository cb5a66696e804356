"""GPU probe: the pairs GEMM (W4A16 at M >= 64: two codes per PTX LOP3, wgmma from registers)
over a grid of configs, beside cuBLAS fp16, dequantize + cuBLAS and the op's current pick.
Every config is checked against dequantize + matmul. `--family w4a8`: the W4A8 SWAR GEMM
(GEMM only, on pre-quantized int8 x) beside cuBLAS fp16 and torch._int_mm, its integer
accumulator checked exactly.

CUDA-graph replays over weight copies rotated past L2 (`bench_w4a16.time_graph`); the pairs
times include the launcher's pair-plane copy of x.

    python benchmarks/probe_w4a16_pairs.py --out $OUT/probe_w4a16_pairs.json
    python benchmarks/probe_w4a16_pairs.py --shapes 8192x28672 --ms 256 --budget 120
    python benchmarks/probe_w4a16_pairs.py --family w4a8 --bks 128,256
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_w4a16 import GROUP, SHAPES, copies, hbm_bandwidth, time_graph
from weights import random_packed

from qcompile.lowering.autotune import KernelConfig, m_bucket
from qcompile.lowering.w4a16 import _dequant_rows, launch, valid_config, w4a16_linear_cuda
from qcompile.quant.int4 import dequantize_int4


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def pair_configs(m: int, k: int, args: argparse.Namespace) -> list[KernelConfig]:
    if args.family == "w4a8":
        return swar_configs(m, k, args)
    """--bms x --bns x --bks x --prefetch x --splits; warps 4 below BLOCK_N 128, else 8;
    stages 3 at BLOCK_K 64, 2 at 128 (and --stages to add more)."""
    out = []
    for bm, bn, bk, pf, sk in itertools.product(
        _ints(args.bms), _ints(args.bns), _ints(args.bks), _ints(args.prefetch), _ints(args.splits)
    ):  # fmt: skip
        if bm > max(64, m_bucket(m)):
            continue
        warps = 4 if bn < 128 else 8
        for stages in {3 if bk == 64 else 2, *_ints(args.stages)}:
            cfg = KernelConfig("gemm_pairs", bm, bn, bk, sk, warps, stages, pf)
            if valid_config(cfg, k, GROUP):
                out.append(cfg)
    return out


def swar_configs(m: int, k: int, args: argparse.Namespace) -> list[KernelConfig]:
    from qcompile.lowering.w4a8 import valid_config as valid_w4a8

    out = []
    for bm, bn, bk, pf, sk in itertools.product(
        _ints(args.bms), _ints(args.bns), _ints(args.bks), _ints(args.prefetch), _ints(args.splits)
    ):  # fmt: skip
        if bm > max(64, m_bucket(m)):
            continue
        warps = 4 if bn < 128 else 8
        for stages in {3 if bk <= 128 else 2, *_ints(args.stages)}:
            cfg = KernelConfig("gemm_swar", bm, bn, bk, sk, warps, stages, pf)
            if valid_w4a8(cfg, k, GROUP, "int8"):
                out.append(cfg)
    return out


def probe_w4a8(args: argparse.Namespace, meta: dict, results: list, save, t_start: float) -> None:
    """The SWAR GEMM's configs per (shape, M), GEMM only, beside cuBLAS and torch._int_mm."""
    from weights import random_w4a8

    from qcompile.lowering.w4a8 import launch as launch_w4a8
    from qcompile.lowering.w4a8 import quantize_per_token
    from qcompile.quant.w4a8 import int8_weight

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    for spec in args.shapes.split(","):
        n, k = map(int, spec.split("x"))
        nbytes = n * k // 2 + 2 * (k // GROUP) * n + 4 * n
        packed = [random_w4a8(n, k, GROUP) for _ in range(copies(nbytes, l2))]
        wf = [
            torch.randn(n, k, dtype=torch.float16, device="cuda")
            for _ in range(copies(2 * n * k, l2))
        ]
        wi = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda").t()
              for _ in range(copies(n * k, l2))]  # fmt: skip
        p0 = packed[0]
        w8 = int8_weight(p0.qweight, p0.group_scales, p0.group_zeros, GROUP).double()
        for m in _ints(args.ms):
            if time.time() - t_start > args.budget:
                break
            x = torch.randn(m, k, dtype=torch.float16, device="cuda")
            xq, xs = quantize_per_token(x, "int8")
            acc_ref = (xq.double() @ w8.t()).long()
            row = {"family": "w4a8", "n": n, "k": k, "m": m}
            row["cublas_us"] = time_graph([lambda x=x, w=w: F.linear(x, w) for w in wf])
            m_int = max(32, -(-m // 8) * 8)
            x8 = torch.randint(-127, 128, (m_int, k), dtype=torch.int8, device="cuda")
            row["int_mm_us"] = time_graph([lambda w=w, x8=x8: torch._int_mm(x8, w) for w in wi])
            row["pairs"] = []
            for cfg in swar_configs(m, k, args):
                if time.time() - t_start > args.budget:
                    break

                def run(p, cfg=cfg, xq=xq, xs=xs, **kw):
                    return launch_w4a8(
                        cfg, xq, xs, *p.tensors(), None, GROUP, torch.float16, **kw
                    )  # fmt: skip

                try:
                    exact = bool(torch.equal(run(p0, accumulator=True).long(), acc_ref))
                    us = time_graph([lambda p=p: run(p) for p in packed], batches=7)
                except Exception as e:  # noqa: BLE001 - a config the compiler rejects
                    row["pairs"].append({"config": cfg.__dict__, "error": repr(e)[:200]})
                    continue
                row["pairs"].append({"config": cfg.__dict__, "us": us, "exact": exact})
            ok = sorted((r for r in row["pairs"] if "us" in r), key=lambda r: r["us"])
            row["pairs"] = ok + [r for r in row["pairs"] if "us" not in r]
            line = (f"W4A8 N={n} K={k} M={m}: cublas {row['cublas_us']:.1f} "
                    f"int_mm {row['int_mm_us']:.1f}")  # fmt: skip
            if ok:
                c = ok[0]["config"]
                line += (f" | swar {ok[0]['us']:.1f} (bm{c['block_m']} bn{c['block_n']} "
                         f"bk{c['block_k']} w{c['num_warps']} s{c['num_stages']} "
                         f"pf{int(c['prefetch'])}) = {row['cublas_us'] / ok[0]['us']:.2f}x cublas; "
                         f"all exact: {all(r['exact'] for r in ok)}")  # fmt: skip
            print(line, flush=True)
            for r in ok[1:4]:
                c = r["config"]
                print(f"    {r['us']:.1f} bm{c['block_m']} bn{c['block_n']} bk{c['block_k']} "
                      f"s{c['num_stages']} pf{int(c['prefetch'])}", flush=True)  # fmt: skip
            errors = [r for r in row["pairs"] if "error" in r]
            if errors:
                print(f"    {len(errors)} configs failed, e.g. {errors[0]['error']}", flush=True)
            results.append(row)
            save()
        del packed, wf, wi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--ms", default="64,256,1024")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--bms", default="64,128,256")
    ap.add_argument("--bns", default="64,128,256")
    ap.add_argument("--bks", default="64,128")
    ap.add_argument("--prefetch", default="0,1")
    ap.add_argument("--splits", default="1")
    ap.add_argument("--stages", default="3")
    ap.add_argument("--budget", type=float, default=400.0, help="seconds; then stop probing")
    ap.add_argument("--family", default="w4a16", choices=("w4a16", "w4a8"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    t_start = time.time()
    dtype = getattr(torch, args.dtype)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    bw = hbm_bandwidth()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "hbm_tb_s": bw / 1e12,
            "dtype": args.dtype, "group": GROUP}  # fmt: skip
    print(meta, flush=True)
    results = []

    def save():
        if args.out:
            args.out.write_text(json.dumps({"meta": meta, "rows": results}, indent=1))

    if args.family == "w4a8":
        probe_w4a8(args, meta, results, save, t_start)
        save()
        return
    for spec in args.shapes.split(","):
        n, k = map(int, spec.split("x"))
        nbytes = n * k // 2 + 4 * (k // GROUP) * n
        packed = [random_packed(n, k, GROUP, dtype) for _ in range(copies(nbytes, l2))]
        wf = [torch.randn(n, k, dtype=dtype, device="cuda") for _ in range(copies(2 * n * k, l2))]
        w_ref = dequantize_int4(packed[0], torch.float32)
        for m in _ints(args.ms):
            if time.time() - t_start > args.budget:
                break
            x = torch.randn(m, k, dtype=dtype, device="cuda")
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
            dq = KernelConfig("dequant_mm", 0, 256, _dequant_rows(k), 1, 4, 1)
            row["dequant_mm_us"] = time_graph(
                [
                    lambda x=x, p=p, dq=dq: launch(
                        dq, x, p.qweight, p.scales, p.offsets, None, GROUP
                    )
                    for p in packed
                ]  # fmt: skip
            )
            row["pairs"] = []
            for cfg in pair_configs(m, k, args):
                if time.time() - t_start > args.budget:
                    break

                def run(p, cfg=cfg, x=x):
                    return launch(cfg, x, p.qweight, p.scales, p.offsets, None, GROUP)

                try:
                    out = run(packed[0]).float()
                    err = ((out - ref).norm() / ref.norm()).item()
                    us = time_graph([lambda p=p: run(p) for p in packed], batches=7)
                except Exception as e:  # noqa: BLE001 - a config the compiler rejects
                    row["pairs"].append({"config": cfg.__dict__, "error": repr(e)[:200]})
                    continue
                row["pairs"].append({"config": cfg.__dict__, "us": us, "rel_err": err})
            ok = sorted((r for r in row["pairs"] if "us" in r), key=lambda r: r["us"])
            row["pairs"] = ok + [r for r in row["pairs"] if "us" not in r]
            best = ok[0] if ok else None
            line = (f"N={n} K={k} M={m}: floor {floor:.1f} cublas {row['cublas_us']:.1f} "
                    f"current {row['current_us']:.1f} dequant_mm {row['dequant_mm_us']:.1f}")  # fmt: skip
            if best:
                c = best["config"]
                worst = max(r["rel_err"] for r in ok)
                line += (f" | pairs {best['us']:.1f} (bm{c['block_m']} bn{c['block_n']} "
                         f"bk{c['block_k']} w{c['num_warps']} s{c['num_stages']} "
                         f"pf{int(c['prefetch'])} sk{c['split_k']}) = "
                         f"{row['cublas_us'] / best['us']:.2f}x cublas; max err {worst:.1e}")  # fmt: skip
            print(line, flush=True)
            for r in ok[1:4]:
                c = r["config"]
                print(f"    {r['us']:.1f} bm{c['block_m']} bn{c['block_n']} bk{c['block_k']} "
                      f"s{c['num_stages']} pf{int(c['prefetch'])}", flush=True)  # fmt: skip
            errors = [r for r in row["pairs"] if "error" in r]
            if errors:
                print(f"    {len(errors)} configs failed, e.g. {errors[0]['error']}", flush=True)
            results.append(row)
            save()
        del packed, wf
    save()


if __name__ == "__main__":
    main()
