"""GPU probe: W4A8 int8 on W4A16's Gluon wgmma_rs kernel over a few tiles.

Beside W4A8's current pick, W4A16's current pick and cuBLAS fp16, on rotated weights in
CUDA-graph replays; each wgmma_rs config is checked against the current pick's
output first (both rescale the same exact integer sums).

    python benchmarks/probe_w4a8_wgmma.py --ms 16,64,256 --out $OUT/w4a8rs.json
    python benchmarks/probe_w4a8_wgmma.py --variants rs,rs+pairs,ws,ws+pairs ...
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

TILES = [  # (BLOCK_N, BLOCK_K, split, warps, stages); BLOCK_M is M's bucket (at most 128)
    (64, 128, 1, 4, 4), (64, 128, 2, 4, 4), (64, 128, 4, 4, 4), (128, 128, 1, 8, 4),
    (128, 128, 2, 8, 4), (64, 64, 1, 4, 4), (128, 64, 1, 8, 4), (128, 64, 2, 8, 4),
]  # fmt: skip
TWO_GROUPS = [  # `--two-groups`: K tiles of two groups (`w4a16_wgmma`'s SUB = 2), up to 64 rows
    (64, 256, 1, 4, 2), (64, 256, 1, 4, 3), (64, 256, 2, 4, 2), (64, 256, 2, 4, 3),
    (128, 256, 1, 8, 2), (128, 256, 2, 8, 2),
]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="28672x4096,8192x28672")
    ap.add_argument("--ms", default="16,64,256")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--variants", default="rs",
        help="comma list of rs (wgmma_rs), ws (producer warp, 96 registers below 128 rows), "
        "either with '+pairs' (`w4a16_wgmma._W4A8_PAIRS`; without it, rows one at a time) "
        "and / or '+pipe' (`w4a16_wgmma._PIPE`)",
    )  # fmt: skip
    ap.add_argument(
        "--two-groups", action="store_true",
        help="also K tiles of two groups (BLOCK_K 256 at group 128; tuning candidates since "
        "the fortieth session for W4A16, the forty-first for W4A8)",
    )  # fmt: skip
    args = ap.parse_args()
    tiles = TILES + (TWO_GROUPS if args.two_groups else [])
    import torch
    import torch.nn.functional as F
    from bench_w4a16 import time_graph
    from weights import random_w4a8, rotated_w4a16

    from qcompile.lowering import w4a16_wgmma
    from qcompile.lowering.autotune import KernelConfig, m_bucket
    from qcompile.lowering.w4a8 import quantize_and_launch, valid_config, w4a8_linear_cuda
    from qcompile.lowering.w4a16 import w4a16_linear_cuda

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    pairs_default = w4a16_wgmma._W4A8_PAIRS
    rows = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        copies = max(2, -(-4 * l2 // (n * k // 2)))
        w8 = [random_w4a8(n, k, 128) for _ in range(copies)]
        packed16, wf = rotated_w4a16(n, k, 128, torch.float16, l2)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            row = {"n": n, "k": k, "m": m, "rs": []}
            row["cublas_us"] = time_graph([lambda w=w, x=x: F.linear(x, w) for w in wf])
            row["w4a16_us"] = time_graph(
                [
                    lambda p=p, x=x: w4a16_linear_cuda(x, p.qweight, p.scales, p.offsets, None, 128)
                    for p in packed16
                ]  # fmt: skip
            )
            w8args = [(*p.tensors(), None, 128, "int8") for p in w8]
            row["w4a8_us"] = time_graph([lambda a=a, x=x: w4a8_linear_cuda(x, *a) for a in w8args])
            want = w4a8_linear_cuda(x, *w8args[0]).float()
            bm = min(max(m_bucket(m), 16), 128)
            for (bn, bk, split, warps, stages), variant in itertools.product(
                tiles, args.variants.split(",")
            ):
                ws = variant.startswith("ws")
                kind, regs = ("wgmma_rs_ws", 96 if bm < 128 else 0) if ws else ("wgmma_rs", 0)
                cfg = KernelConfig(kind, bm, bn, bk, split, warps, stages, max_registers=regs)
                if not valid_config(cfg, n, k, 128, "int8") or (bm > 64 and bk >= 128):
                    continue
                w4a16_wgmma._W4A8_PAIRS = "+pairs" in variant
                w4a16_wgmma._PIPE = "+pipe" in variant
                got = quantize_and_launch(cfg, x, *w8args[0]).float()
                err = ((got - want).norm() / want.norm()).item()
                us = time_graph(
                    [lambda a=a, c=cfg, x=x: quantize_and_launch(c, x, *a) for a in w8args]
                )
                name = f"{variant} bm{bm} bn{bn} bk{bk} sk{split} w{warps} st{stages}"
                row["rs"].append({"config": cfg.__dict__, "name": name, "us": us, "rel_err": err})
                print(f"  {name}: {us:.1f} us, rel err vs current {err:.1e}", flush=True)
            w4a16_wgmma._W4A8_PAIRS, w4a16_wgmma._PIPE = pairs_default, None
            best = min(row["rs"], key=lambda r: r["us"], default=None)
            print(
                f"N={n} K={k} M={m}: cublas {row['cublas_us']:.1f} w4a16 {row['w4a16_us']:.1f} "
                f"w4a8 {row['w4a8_us']:.1f}"
                + (f" wgmma_rs best {best['us']:.1f} ({best['name']}) = "
                   f"{row['w4a16_us'] / best['us']:.2f}x w4a16" if best else ""),
                flush=True,
            )  # fmt: skip
            rows.append(row)
            if args.out:
                args.out.write_text(json.dumps({"rows": rows}, indent=1))
        del w8, packed16, wf


if __name__ == "__main__":
    main()
