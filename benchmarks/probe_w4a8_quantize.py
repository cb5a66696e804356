"""GPU probe: the eager W4A8 path's per-token quantize kernel, one pass (row in registers)
against two loops over x, at the small M where it sits in front of the lane kernel; with
--slices, one pass spread over several programs per row.

Each variant is checked bit-exact against the other; times are CUDA-graph replays over
activation copies rotated past L2 (`bench_w4a16.time_graph`).

    python benchmarks/probe_w4a8_quantize.py --out $OUT/probe_w4a8_quantize.json
    python benchmarks/probe_w4a8_quantize.py --ms 1,16 --slices 4,8,16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_w4a16 import copies, time_graph

from qcompile.lowering.w4a8 import quantize_per_token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="1,4,16,64")
    ap.add_argument("--ks", default="4096,14336,28672")
    ap.add_argument("--slices", default="", help="also one pass split over these programs per row")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    for k in map(int, args.ks.split(",")):
        for m in map(int, args.ms.split(",")):
            xs = [torch.randn(m, k, dtype=torch.float16, device="cuda")
                  for _ in range(copies(2 * m * k, l2))]  # fmt: skip
            row = {"m": m, "k": k}
            ref = quantize_per_token(xs[0], "int8", 0, 128, one_pass=False)
            variants = [("two_loops_us", False, 1), ("one_pass_us", True, 1)]
            variants += [(f"slices{s}_us", True, s) for s in map(int, args.slices.split(",")) if s]
            for name, one, sl in variants:
                got = quantize_per_token(xs[0], "int8", 0, 128, one_pass=one, slices=sl)
                row[name.replace("_us", "_exact")] = bool(
                    torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
                )
                calls = [
                    lambda x=x, one=one, sl=sl: quantize_per_token(
                        x, "int8", 0, 128, one_pass=one, slices=sl
                    )
                    for x in xs
                ]
                row[name] = time_graph(calls)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "triton": __import__("triton").__version__}  # fmt: skip
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
