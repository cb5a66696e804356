"""GPU probe: the W4A8 SWAR GEMM (`gemm_swar`: 4 codes per 32-bit op, int8 wgmma from
registers) over a grid of configs, GEMM only on pre-quantized int8 x, beside cuBLAS fp16 and
torch._int_mm (the int8 ceiling); each config's integer accumulator is checked exactly.

CUDA-graph replays over weight copies rotated past L2 (`bench_w4a16.time_graph`); the SWAR
times include the launcher's even/odd copy of xq (the quantize kernel writes that order
directly on the eager path).

    python benchmarks/probe_w4a8_swar.py --out $OUT/probe_w4a8_swar.json
    python benchmarks/probe_w4a8_swar.py --ms 64,128 --bms 64,128 --splits 1,2,4
    python benchmarks/probe_w4a8_swar.py --kernel mma --ms 1,16 --bks 64,128 --splits 1,4,16
        # the int8 lane-MMA kernel at small M, beside our W4A16 op
    python benchmarks/probe_w4a8_swar.py --act float8_e4m3fn --bms 128,256 --bns 64,128 --bks 128
        # the FP8 SWAR GEMM (e4m3 activations and (q - z), s2 per K tile) beside _scaled_mm
    python benchmarks/probe_w4a8_swar.py --kernel fp8_mm --act float8_e4m3fn --bns 64 --bks 128
        # unpack to e4m3 (q - z) + cuBLASLt's 1x128 block-scaled FP8 GEMM (F.scaled_mm)
    python benchmarks/probe_w4a8_swar.py --kernel int_mm --bns 64,128 --bks 128,256
        # unpack to int8 + torch._int_mm (whole path: unpack, GEMM, rescale) beside the SWAR
        # default config

Session 16 ran this file with a `--family w4a16` mode that probed a W4A16 analogue (Marlin's
two-codes-per-LOP3 unpacking into fp16 wgmma register operands, x in pair-plane order). It
lost to dequantize + cuBLAS at every point (results/session16/probe.log) and was removed; the
kernel and that mode are in commit 54febae.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_w4a16 import GROUP, copies, hbm_bandwidth, time_graph
from weights import random_packed, random_w4a8

from qcompile.lowering.autotune import KernelConfig, m_bucket
from qcompile.lowering.w4a8 import (
    _unpack_fp8_scaled_mm,
    launch,
    quantize_per_token,
    valid_config,
)
from qcompile.lowering.w4a16 import w4a16_linear_cuda
from qcompile.quant.w4a8 import int8_weight


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def swar_configs(m: int, k: int, args: argparse.Namespace) -> list[KernelConfig]:
    if args.kernel == "mma":
        return lane_configs(m, k, args)
    if args.kernel == "int_mm":  # the unpack + cuBLASLt path beside the SWAR default
        out = [KernelConfig("gemm_swar", 256 if m >= 256 else 128, 64, 128, 1, 4, 3)]
        for bn, bk in itertools.product(_ints(args.bns), _ints(args.bks)):
            out.append(KernelConfig("int_mm", 0, bn, bk, 1, 4, 1))
        return [c for c in out if valid_config(c, 8, k, GROUP, "int8")]
    out = []
    for bm, bn, bk, pf, sk in itertools.product(
        _ints(args.bms), _ints(args.bns), _ints(args.bks), _ints(args.prefetch), _ints(args.splits)
    ):  # fmt: skip
        if bm > max(64, m_bucket(m)):
            continue
        warps = 4 if bn < 128 else 8
        for stages in {3 if bk <= 128 else 2, *_ints(args.stages)}:
            cfg = KernelConfig("gemm_swar", bm, bn, bk, sk, warps, stages, pf)
            if valid_config(cfg, 8, k, GROUP, args.act):  # N only gates int_mm
                out.append(cfg)
    return out


def lane_configs(m: int, k: int, args: argparse.Namespace) -> list[KernelConfig]:
    """The lane-MMA kernels: --warps x --bks x --splits at max(8, M bucket) rows; int8's own,
    or for FP8 "mma_f16" (W4A16's lane kernel on e4m3 values as fp16; launched before
    valid_config admits it: untimed until this probe)."""
    rows = max(8, m_bucket(m))
    out = []
    for warps, bk, sk in itertools.product(_ints(args.warps), _ints(args.bks), _ints(args.splits)):
        cfg = KernelConfig("mma", rows, 32 * warps, bk, sk, warps, 1)
        if rows <= 64 and valid_config(cfg, 8, k, GROUP, "int8"):  # N only gates int_mm
            out.append(cfg if args.act == "int8" else dataclasses.replace(cfg, kernel="mma_f16"))
    return out


def _describe(pair: dict) -> str:
    """One timed config on one line."""
    c = pair["config"]
    keys = ("block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages", "prefetch")
    names = ("bm", "bn", "bk", "split", "w", "s", "pf")
    tile = " ".join(f"{nm}{int(c[key])}" for key, nm in zip(keys, names, strict=True) if key in c)
    reduce = pair.get("self_reduce")
    mode = (
        ""
        if reduce is None
        else f" reduce{reduce if isinstance(reduce, str) else int(reduce)}x{pair.get('reduce_unroll', 1)}"
    )
    return f"{pair['us']:.1f} {c['kernel']} {tile}{mode}"


def probe_fp8_mm(args, row, xq, xs, packed, acc_ref) -> None:
    """`_unpack_fp8_scaled_mm` per unpacking tile (--bns x --bks): output checked against the
    float64 FP8 reference (relative error), then timed whole (unpack + GEMM)."""
    p0 = packed[0]
    ref = acc_ref * xs.double()[:, None] * p0.channel_scales.double()[None, :]
    for bn, bk in itertools.product(_ints(args.bns), _ints(args.bks)):
        cfg = {"kernel": "fp8_mm", "block_n": bn, "block_k": bk}

        def run(p, bn=bn, bk=bk):
            return _unpack_fp8_scaled_mm(
                xq, xs, *p.tensors(), None, GROUP, torch.float16, block_n=bn, block_k=bk
            )

        try:
            err = ((run(p0).double() - ref).norm() / ref.norm()).item()
            us = time_graph([lambda p=p: run(p) for p in packed], batches=7)
        except Exception as e:  # noqa: BLE001 - e.g. a torch without the 1x128 recipe
            row["pairs"].append({"config": cfg, "error": repr(e)[:300]})
            continue
        row["pairs"].append({"config": cfg, "us": us, "exact": err < 2e-3, "rel_err": err})


def probe(args: argparse.Namespace, results: list, save, t_start: float) -> None:
    """The SWAR GEMM's configs per (shape, M), GEMM only, beside cuBLAS and torch._int_mm."""
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
            xq, xs = quantize_per_token(x, args.act)
            acc_ref = xq.double() @ w8.t()  # int8: exact integers; fp8: sum x (q - z) s2
            row = {"family": "w4a8", "n": n, "k": k, "m": m}
            row["cublas_us"] = time_graph([lambda x=x, w=w: F.linear(x, w) for w in wf])
            m_int = max(32, -(-m // 8) * 8)
            x8 = torch.randint(-127, 128, (m_int, k), dtype=torch.int8, device="cuda")
            row["int_mm_us"] = time_graph([lambda w=w, x8=x8: torch._int_mm(x8, w) for w in wi])
            if args.act != "int8":  # the fp8 ceiling: torch._scaled_mm, per-tensor scales
                m16 = -(-m // 16) * 16
                xf8 = torch.randn(m16, k, device="cuda").to(torch.float8_e4m3fn)
                one = torch.ones((), device="cuda")
                wf8 = [w.to(torch.float8_e4m3fn) for w in wi]
                row["scaled_mm_us"] = time_graph(
                    [
                        lambda w=w, a=xf8, u=one: torch._scaled_mm(
                            a, w, u, u, out_dtype=torch.float16
                        )
                        for w in wf8
                    ]  # fmt: skip
                )
                del wf8
            if args.kernel == "mma":  # the bar at small M: our W4A16 op (shipped configs)
                w16 = [random_packed(n, k, GROUP, torch.float16) for _ in range(len(packed))]
                row["w4a16_us"] = time_graph(
                    [lambda x=x, p=p: w4a16_linear_cuda(x, *p.tensors(), None, GROUP) for p in w16]
                )
                del w16
            row["pairs"] = []
            if args.kernel == "fp8_mm":  # unpack to e4m3 + cuBLASLt's 1x128 block-scaled GEMM
                probe_fp8_mm(args, row, xq, xs, packed, acc_ref)
            for cfg in swar_configs(m, k, args) if args.kernel != "fp8_mm" else ():
                if time.time() - t_start > args.budget:
                    break

                def run(p, cfg=cfg, xq=xq, xs=xs, **kw):
                    return launch(
                        cfg, xq, xs, *p.tensors(), None, GROUP, torch.float16, **kw
                    )  # fmt: skip

                # mma split K: in one launch (a loop over the partials, or unrolled), or two
                reduce_modes = [(None, 1)]
                if cfg.kernel == "mma" and cfg.split_k > 1:
                    reduce_modes = [(True, 1), (False, 1)]
                    reduce_modes += [(True, u) for u in _ints(args.reduce_unroll) if u > 1]
                    reduce_modes += [("atomic", 1)] if args.atomic else []
                for reduce, unroll in reduce_modes:
                    try:
                        if cfg.kernel == "mma_f16":  # rescales inside: its output is checked
                            ref = acc_ref * xs.double()[:, None]
                            ref = ref * p0.channel_scales.double()[None, :]
                            err = ((run(p0).double() - ref).norm() / ref.norm()).item()
                            exact = err < 2e-3
                            reduce = None
                        elif args.act == "int8":
                            acc = run(p0, accumulator=True).double()
                            exact = bool(torch.equal(acc, acc_ref))
                        else:  # Hopper's fp8 MMA accumulates with fewer bits than fp32
                            acc = run(p0, accumulator=True).double()
                            err = ((acc - acc_ref).norm() / acc_ref.norm()).item()
                            exact = err < 1e-4
                        kw = {"self_reduce": reduce, "reduce_unroll": unroll}
                        out1 = run(p0, **kw)
                        same = bool(torch.equal(out1, run(p0, self_reduce=False)))
                        us = time_graph(
                            [lambda p=p, kw=kw: run(p, **kw) for p in packed], batches=7
                        )
                    except Exception as e:  # noqa: BLE001 - a config the compiler rejects
                        row["pairs"].append({"config": cfg.__dict__, "error": repr(e)[:200]})
                        continue
                    row["pairs"].append({"config": cfg.__dict__, "us": us, "exact": exact,
                                         "self_reduce": reduce, "reduce_unroll": unroll,
                                         "same_out": same})  # fmt: skip
            ok = sorted((r for r in row["pairs"] if "us" in r), key=lambda r: r["us"])
            row["pairs"] = ok + [r for r in row["pairs"] if "us" not in r]
            line = (f"W4A8 {args.act} N={n} K={k} M={m}: cublas {row['cublas_us']:.1f} "
                    f"scaled_mm {row.get('scaled_mm_us', float('nan')):.1f} "
                    f"int_mm {row['int_mm_us']:.1f} w4a16 {row.get('w4a16_us', float('nan')):.1f}")  # fmt: skip
            if ok:
                line += (f" | {_describe(ok[0])} = {row['cublas_us'] / ok[0]['us']:.2f}x cublas; "
                         f"all exact: {all(r['exact'] for r in ok)}")  # fmt: skip
            print(line, flush=True)
            for r in ok[1:4]:
                print(f"    {_describe(r)}", flush=True)
            errors = [r for r in row["pairs"] if "error" in r]
            if errors:
                print(f"    {len(errors)} configs failed, e.g. {errors[0]['error']}", flush=True)
            results.append(row)
            save()
        del packed, wf, wi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8192x28672,28672x4096")
    ap.add_argument("--ms", default="256,1024")
    ap.add_argument("--bms", default="64,128,256")
    ap.add_argument("--bns", default="64,128,256")
    ap.add_argument("--bks", default="128,256")
    ap.add_argument("--prefetch", default="0")
    ap.add_argument("--splits", default="1")
    ap.add_argument("--stages", default="3")
    ap.add_argument(
        "--kernel", default="gemm_swar", choices=("gemm_swar", "mma", "int_mm", "fp8_mm")
    )
    ap.add_argument(
        "--act", default="int8", choices=("int8", "float8_e4m3fn"),
        help="gemm_swar: activation dtype (float8_e4m3fn: the FP8 SWAR GEMM, beside _scaled_mm)",
    )  # fmt: skip
    ap.add_argument("--warps", default="2,4,8", help="mma: warps (32 columns each)")
    ap.add_argument(
        "--reduce-unroll",
        default="",
        help="mma, split K: also the one-launch sum unrolled by these",
    )
    ap.add_argument(
        "--atomic", action="store_true",
        help="mma, split K: also the one-launch reduction by int32 atomics (self_reduce='atomic')",
    )  # fmt: skip
    ap.add_argument("--budget", type=float, default=400.0, help="seconds; then stop probing")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    t_start = time.time()
    bw = hbm_bandwidth()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "hbm_tb_s": bw / 1e12,
            "group": GROUP}  # fmt: skip
    print(meta, flush=True)
    results = []

    def save():
        if args.out:
            args.out.write_text(json.dumps({"meta": meta, "rows": results}, indent=1))

    probe(args, results, save, t_start)
    save()


if __name__ == "__main__":
    main()
