"""GPU probe: the W4A16 Gluon "wgmma_rs" kernels (`qcompile/lowering/w4a16_wgmma.py`) over a
grid of configs, beside cuBLAS fp16 and the op's current pick; every config is checked against
dequantize + matmul. CUDA-graph replays over weight copies rotated past L2.

The thirty-fifth session's "wgmma" kernel (W^T through shared memory) was built and probed here
first (commit 593a7d2 holds that standalone copy; b21d7f3 the last with it).

    python benchmarks/probe_gluon_w4a16.py --ms 16,64,256,1024 --out $OUT/gluon.json
    python benchmarks/probe_gluon_w4a16.py --ws 0,1  # + "wgmma_rs_ws", the TMA producer warp
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

# (BLOCK_M, BLOCK_N, BLOCK_K, split, warps, stages); BLOCK_M is x's rows, wgmma's N side
CONFIGS = [
    (16, 128, 64, 1, 8, 4), (16, 128, 128, 1, 8, 4), (16, 64, 128, 1, 4, 4),
    (16, 128, 128, 2, 8, 4), (16, 64, 128, 2, 4, 4), (32, 128, 128, 1, 8, 4),
    (32, 64, 128, 2, 4, 4), (64, 128, 64, 1, 8, 4), (64, 128, 128, 1, 8, 4),
    (64, 64, 128, 1, 4, 4), (64, 128, 128, 2, 8, 3), (64, 64, 128, 2, 4, 4),
    (128, 128, 64, 1, 8, 4), (128, 64, 64, 1, 4, 4), (128, 128, 128, 1, 8, 3),
    (128, 128, 64, 2, 8, 4), (256, 128, 64, 1, 8, 3), (256, 64, 64, 1, 4, 3),
    (256, 128, 64, 1, 8, 4), (256, 128, 64, 2, 8, 4), (256, 64, 64, 2, 4, 4),
    (16, 64, 128, 4, 4, 4), (16, 64, 64, 2, 4, 6), (32, 64, 128, 1, 4, 4),
    (64, 64, 64, 2, 4, 6), (128, 64, 64, 2, 4, 4),
    # 26-31: two groups a K tile (`w4a16._SUBTILES`)
    (16, 64, 256, 1, 4, 2), (16, 64, 256, 2, 4, 2), (16, 64, 256, 4, 4, 2),
    (16, 64, 256, 1, 4, 3), (64, 64, 256, 2, 4, 2), (64, 128, 256, 1, 8, 2),
]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="28672x4096,8192x28672")
    ap.add_argument("--ms", default="64,256")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--configs", default="", help="indices into CONFIGS (default: all)")
    ap.add_argument("--ws", default="0", help="0: wgmma_rs, 1: wgmma_rs_ws (a TMA producer warp)")
    ap.add_argument("--maxnreg", default="0", help="register caps (Triton's maxnreg; 0: none)")
    ap.add_argument("--fit-only", action="store_true", help="BLOCK_M = M's bucket only")
    ap.add_argument(
        "--pipe", default="0",
        help="0: each wgmma waited for within its step; 1: left in flight past it "
        "(`w4a16_wgmma._PIPE`)",
    )  # fmt: skip
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
    picked = [CONFIGS[int(i)] for i in args.configs.split(",")] if args.configs else CONFIGS
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
            variants = [  # (kind, maxnreg, pipe)
                (("wgmma_rs", "wgmma_rs_ws")[ws], r, pipe)
                for ws in map(int, args.ws.split(","))
                for r in map(int, args.maxnreg.split(","))
                for pipe in map(int, args.pipe.split(","))
            ]
            for (bm, bn, bk, split, warps, stages), (kind, maxnreg, pipe) in itertools.product(
                picked, variants
            ):
                w4a16_wgmma._PIPE = bool(pipe)
                cfg = KernelConfig(kind, bm, bn, bk, split, warps, stages, max_registers=maxnreg)
                fit = min(max(triton.next_power_of_2(m), 16), 256)  # (this tile or half)
                if not valid_config(cfg, k, 128) or bm not in (fit, fit // 2):
                    continue
                if args.fit_only and bm != fit:
                    continue

                def run(p, cfg=cfg, x=x):
                    return launch(cfg, x, p.qweight, p.scales, p.offsets, None, 128)

                out = run(packed[0]).float()
                err = ((out - ref).norm() / ref.norm()).item()
                us = time_graph([lambda p=p: run(p) for p in packed])
                name = (
                    f"{kind} bm{bm} bn{bn} bk{bk} sk{split} w{warps} st{stages} r{maxnreg} p{pipe}"
                )
                row["wgmma"].append(
                    {"config": cfg.__dict__, "name": name, "us": us, "rel_err": err}
                )
                print(f"  {name}: {us:.1f} us, rel err {err:.1e}", flush=True)
            w4a16_wgmma._PIPE = None  # back to the shipped rule
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
