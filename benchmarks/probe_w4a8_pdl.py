"""GPU probe: the eager W4A8 op at small M with the lane GEMM launched by programmatic
dependent launch (PDL) after the quantize kernel, beside the plain launch and W4A16.

Why: at M <= 16 the int8 GEMM alone matches W4A16, and the eager op loses 4-7% to it by the
quantize kernel in front (2-3 us; twenty-second session, `results/session22/final/`). With
PDL the quantize kernel signals at its start, the GEMM's CTAs launch beside it, issue their
first weight loads and wait (`griddepcontrol.wait`) only before reading xq. Each PDL result
is checked bit-exact against the plain one; times are CUDA-graph replays over weight copies
rotated past L2 (`bench_w4a16.time_graph`), with the shipped (or default) config per key.

    python benchmarks/probe_w4a8_pdl.py --out $OUT/probe_w4a8_pdl.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_w4a8 import GROUP, w4a8_bytes
from bench_w4a16 import copies, time_graph
from weights import random_packed, random_w4a8

from qcompile.lowering.autotune import autotuner
from qcompile.lowering.w4a8 import default_config, quantize_and_launch, tune_key
from qcompile.lowering.w4a16 import w4a16_linear_cuda

REST = (None, GROUP, "int8")  # the op's bias, group size and activation dtype


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8192x28672,28672x4096")
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    for spec in args.shapes.split(","):
        n, k = map(int, spec.split("x"))
        r = copies(w4a8_bytes(0, n, k, GROUP), l2)
        w8s = [random_w4a8(n, k, GROUP) for _ in range(r)]
        w16s = [random_packed(n, k, GROUP, torch.float16) for _ in range(r)]
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, dtype=torch.float16, device="cuda")
            key = tune_key(m, n, k, GROUP, "int8", torch.float16)
            cfg = autotuner(0).lookup(key) or default_config(m, n, k, GROUP, "int8")
            row = {"n": n, "k": k, "m": m, "config": str(cfg)}
            if cfg.kernel != "mma":
                row["skipped"] = f"not the lane kernel: {cfg.kernel}"
                rows.append(row)
                continue
            plain = quantize_and_launch(cfg, x, *w8s[0].tensors(), *REST)
            row["bit_exact"] = all(
                torch.equal(quantize_and_launch(cfg, x, *w8s[0].tensors(), *REST, pdl=True), plain)
                for _ in range(3)
            )
            row["w4a16_us"] = time_graph(
                [lambda p=p, x=x: w4a16_linear_cuda(x, *p.tensors(), None, GROUP) for p in w16s]
            )
            for name, pdl in (("plain_us", False), ("pdl_us", True)):
                row[name] = time_graph(
                    [
                        lambda p=p, pdl=pdl, c=cfg, x=x: quantize_and_launch(
                            c, x, *p.tensors(), *REST, pdl=pdl
                        )
                        for p in w8s
                    ]
                )
            row["plain_vs_w4a16"] = row["w4a16_us"] / row["plain_us"]
            row["pdl_vs_w4a16"] = row["w4a16_us"] / row["pdl_us"]
            rows.append(row)
            print(
                f"N={n} K={k} M={m} {cfg}: W4A16 {row['w4a16_us']:.1f}  W4A8 plain "
                f"{row['plain_us']:.1f} ({row['plain_vs_w4a16']:.2f}x)  PDL {row['pdl_us']:.1f} "
                f"({row['pdl_vs_w4a16']:.2f}x)  bit-exact {row['bit_exact']}",
                flush=True,
            )
    if args.out:
        args.out.write_text(
            json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
