"""GPU probe: the W4A16 Gluon "wgmma" kernel (`qcompile/lowering/w4a16_wgmma.py`) over a grid
of configs, beside cuBLAS fp16 and the op's current pick; every config is checked against
dequantize + matmul. CUDA-graph replays over weight copies rotated past L2.

The thirty-fifth session built the kernel here first (commit 593a7d2 holds that
standalone copy, with its `--diagnose` of one tile on structured inputs).

    python benchmarks/probe_gluon_w4a16.py --ms 64,256 --out $OUT/gluon.json
    python benchmarks/probe_gluon_w4a16.py --ws 0,1 --maxnreg 0,96,128  # + a TMA producer warp
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, split, warps, stages)
    (128, 128, 64, 1, 8, 4), (128, 128, 64, 1, 8, 3), (128, 128, 128, 1, 8, 3),
    (128, 128, 64, 1, 8, 2), (64, 128, 64, 1, 4, 4), (64, 128, 128, 1, 4, 3),
    (128, 128, 64, 2, 8, 4), (128, 128, 128, 2, 8, 3), (128, 128, 64, 4, 8, 4),
    (64, 128, 128, 2, 4, 3), (64, 128, 128, 4, 4, 3), (64, 128, 64, 2, 4, 4),
    (64, 128, 64, 4, 4, 4), (64, 128, 128, 8, 4, 3),
]  # fmt: skip


# "wgmma_rs" (W from registers, out^T = W x^T): BLOCK_M is x's rows, wgmma's N side
RS_CONFIGS = [
    (16, 128, 64, 1, 8, 4), (16, 128, 128, 1, 8, 4), (16, 64, 128, 1, 4, 4),
    (16, 128, 128, 2, 8, 4), (16, 64, 128, 2, 4, 4), (32, 128, 128, 1, 8, 4),
    (32, 64, 128, 2, 4, 4), (64, 128, 64, 1, 8, 4), (64, 128, 128, 1, 8, 4),
    (64, 64, 128, 1, 4, 4), (64, 128, 128, 2, 8, 3), (64, 64, 128, 2, 4, 4),
    (128, 128, 64, 1, 8, 4), (128, 64, 64, 1, 4, 4), (128, 128, 128, 1, 8, 3),
    (128, 128, 64, 2, 8, 4), (256, 128, 64, 1, 8, 3), (256, 64, 64, 1, 4, 3),
    (256, 128, 64, 1, 8, 4), (256, 128, 64, 2, 8, 4), (256, 64, 64, 2, 4, 4),
    (16, 64, 128, 4, 4, 4), (16, 64, 64, 2, 4, 6), (32, 64, 128, 1, 4, 4),
    (64, 64, 64, 2, 4, 6), (128, 64, 64, 2, 4, 4),
]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="28672x4096,8192x28672")
    ap.add_argument("--ms", default="64,256")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--configs", default="", help="indices into CONFIGS (default: all)")
    ap.add_argument("--ws", default="0", help="`_WS` settings: 1 = one TMA producer warp")
    ap.add_argument("--maxnreg", default="0", help="`_WS_MAXNREG` values for WS runs (0: none)")
    ap.add_argument("--kind", default="wgmma", choices=("wgmma", "wgmma_rs"))
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F
    import triton
    from bench_w4a16 import hbm_bandwidth, time_graph
    from weights import rotated_w4a16

    from qcompile.lowering import w4a16_wgmma
    from qcompile.lowering.autotune import KernelConfig
    from qcompile.lowering.w4a16 import launch, valid_config, w4a16_linear_cuda
    from qcompile.quant.int4 import dequantize_int4

    dtype = getattr(torch, args.dtype)
    table = RS_CONFIGS if args.kind == "wgmma_rs" else CONFIGS
    picked = [table[int(i)] for i in args.configs.split(",")] if args.configs else table
    print(f"HBM {hbm_bandwidth() / 1e12:.2f} TB/s", flush=True)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        packed, wf = rotated_w4a16(n, k, 128, dtype, l2)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.float() @ dequantize_int4(packed[0], torch.float32).t()
            row = {"n": n, "k": k, "m": m, "dtype": args.dtype, "wgmma": []}
            row["cublas_us"] = time_graph([lambda w=w, x=x: F.linear(x, w) for w in wf])
            row["current_us"] = time_graph(
                [
                    lambda p=p, x=x: w4a16_linear_cuda(x, p.qweight, p.scales, p.offsets, None, 128)
                    for p in packed
                ]  # fmt: skip
            )
            modes = [(0, 0)] if "0" in args.ws.split(",") else []
            if "1" in args.ws.split(","):  # (wgmma_rs takes no maxnreg)
                regs = map(int, args.maxnreg.split(",")) if args.kind == "wgmma" else [0]
                modes += [(1, r) for r in regs]
            for (bm, bn, bk, split, warps, stages), (ws, maxnreg) in itertools.product(
                picked, modes
            ):
                kind = "wgmma_rs_ws" if args.kind == "wgmma_rs" and ws else args.kind
                cfg = KernelConfig(kind, bm, bn, bk, split, warps, stages)
                if not valid_config(cfg, k, 128):
                    continue
                if args.kind == "wgmma" and bm > max(m, 64):
                    continue
                fit = min(max(triton.next_power_of_2(m), 16), 256)  # (rs: this tile or half)
                if args.kind == "wgmma_rs" and bm not in (fit, fit // 2):
                    continue
                w4a16_wgmma._WS, w4a16_wgmma._WS_MAXNREG = bool(ws), maxnreg

                def run(p, cfg=cfg, x=x):
                    return launch(cfg, x, p.qweight, p.scales, p.offsets, None, 128)

                out = run(packed[0]).float()
                err = ((out - ref).norm() / ref.norm()).item()
                us = time_graph([lambda p=p: run(p) for p in packed])
                name = f"bm{bm} bn{bn} bk{bk} sk{split} w{warps} st{stages} ws{ws} r{maxnreg}"
                row["wgmma"].append(
                    {"config": cfg.__dict__, "ws": ws, "maxnreg": maxnreg, "name": name, "us": us,
                     "rel_err": err}
                )  # fmt: skip
                print(f"  {name}: {us:.1f} us, rel err {err:.1e}", flush=True)
            w4a16_wgmma._WS, w4a16_wgmma._WS_MAXNREG = False, 0
            best = min(row["wgmma"], key=lambda r: r["us"], default=None)
            print(
                f"N={n} K={k} M={m}: cublas {row['cublas_us']:.1f} current {row['current_us']:.1f}"
                + (f" wgmma best {best['us']:.1f} ({best['name']}) = "
                   f"{row['cublas_us'] / best['us']:.2f}x cublas" if best else ""),
                flush=True,
            )  # fmt: skip
            rows.append(row)
            if args.out:
                args.out.write_text(json.dumps({"rows": rows}, indent=1))
        del packed, wf


if __name__ == "__main__":
    main()
