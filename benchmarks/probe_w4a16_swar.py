"""W4A16 at large M: the SWAR GEMM (`gemm_swar`: fp16 / bf16 pairs by the magic-number trick
in PTX, W as wgmma's register operand, x even/odd per BLOCK_K chunk) beside the current
default (dequantize + cuBLAS), the planes kernel and cuBLAS fp16, GEMM only, CUDA-graph
replays over rotated weights. Every config's output is checked against dequantize + matmul.

    python benchmarks/probe_w4a16_swar.py --out probe.json   # on the H100
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_w4a16 import copies, hbm_bandwidth, time_graph
from weights import random_packed

from qcompile.lowering.autotune import KernelConfig
from qcompile.lowering.w4a16 import default_config, launch, valid_config
from qcompile.quant.int4 import to_even_odd

GROUP = 128


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8192x28672,28672x4096")
    ap.add_argument("--ms", default="256,1024")
    ap.add_argument("--bms", default="128,256")
    ap.add_argument("--bns", default="64,128")
    ap.add_argument("--bks", default="64,128")
    ap.add_argument("--splits", default="1,2")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--even-odd-x", action="store_true", help="time with x already even/odd")
    ap.add_argument("--budget", type=float, default=200.0, help="seconds; then stop probing")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import triton

    dtype = getattr(torch, args.dtype)
    props = torch.cuda.get_device_properties(0)
    meta = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "hbm_tb_s": hbm_bandwidth() / 1e12,
            "group": GROUP, "dtype": args.dtype}  # fmt: skip
    print(meta, flush=True)
    rows = []
    t_start = time.time()
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        packed = [
            random_packed(n, k, GROUP, dtype)
            for _ in range(copies(n * k // 2, props.L2_cache_size))
        ]
        wf = [
            torch.randn(n, k, dtype=dtype, device="cuda") * 0.02
            for _ in range(copies(2 * n * k, props.L2_cache_size))
        ]
        for m in _ints(args.ms):
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            p0 = packed[0]
            ref = launch(
                KernelConfig("dequant_mm", 0, 256, 16, 1, 4, 1), x, *p0.tensors(), None, GROUP
            ).float()
            row = {"n": n, "k": k, "m": m, "pairs": []}
            row["cublas_us"] = time_graph([lambda w=w, x=x: F.linear(x, w) for w in wf], batches=7)
            dflt = default_config(m, n, k, GROUP)
            row["default"] = dflt.__dict__
            row["default_us"] = time_graph(
                [lambda p=p, c=dflt, x=x: launch(c, x, *p.tensors(), None, GROUP) for p in packed],
                batches=7,
            )
            for bm, bn, bk, sk in itertools.product(
                _ints(args.bms), _ints(args.bns), _ints(args.bks), _ints(args.splits)
            ):
                if time.time() - t_start > args.budget:
                    break
                warps = 4 if bn <= 64 else 8
                cfg = KernelConfig("gemm_swar", bm, bn, bk, sk, warps, 3, True)
                if not valid_config(cfg, k, GROUP):
                    continue
                xs = to_even_odd(x, bk) if args.even_odd_x else x
                kw = {"x_even_odd": True} if args.even_odd_x else {}
                try:
                    got = launch(cfg, xs, *p0.tensors(), None, GROUP, **kw).float()
                    err = ((got - ref).norm() / ref.norm()).item()
                    us = time_graph(
                        [
                            lambda p=p, c=cfg, xs=xs, kw=kw: launch(
                                c, xs, *p.tensors(), None, GROUP, **kw
                            )
                            for p in packed
                        ],
                        batches=7,
                    )
                except Exception as e:  # noqa: BLE001 - a config the compiler rejects
                    row["pairs"].append({"config": cfg.__dict__, "error": repr(e)[:300]})
                    print(f"  error {cfg}: {repr(e)[:300]}", flush=True)
                    continue
                row["pairs"].append({"config": cfg.__dict__, "us": us, "rel_err": err})
            ok = sorted((r for r in row["pairs"] if "us" in r), key=lambda r: r["us"])
            row["pairs"] = ok + [r for r in row["pairs"] if "us" not in r]
            rows.append(row)
            line = f"W4A16 {args.dtype} N={n} K={k} M={m}: cublas {row['cublas_us']:.1f} default {row['default_us']:.1f} ({dflt.kernel})"
            print(line, flush=True)
            if args.out:  # after every row: a cut-off call still leaves what it timed
                args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
            for r in ok[:4]:
                c = r["config"]
                print(
                    f"    {r['us']:.1f} swar bm{c['block_m']} bn{c['block_n']} bk{c['block_k']} split{c['split_k']} = {row['cublas_us'] / r['us']:.2f}x cublas, rel err {r['rel_err']:.1e}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
