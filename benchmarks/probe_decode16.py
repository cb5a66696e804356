"""GPU probe: decode_attention over a grid of configs wider than autotuning's candidates.

Llama-3-8B heads (32 query / 8 KV, D=128), bf16, one query token, a bool mask as transformers
passes it; CUDA-graph replays over caches rotated past L2. Prints each shape's fastest
configs, so candidates worth adding show up.

    python benchmarks/probe_decode16.py --shapes 1x185,16x185 --out $OUT/probe_decode16.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from bench_w4a16 import copies, time_graph

from qcompile.lowering.autotune import KernelConfig
from qcompile.lowering.decode_attention import default_config, launch, valid_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1x185,16x185", help="B x S list")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    results = []
    for spec in args.shapes.split(","):
        b, s = map(int, spec.split("x"))
        q = torch.randn(b, 32, 1, 128, dtype=torch.bfloat16, device="cuda")
        nbytes = 2 * b * 8 * s * 128 * 2
        caches = [
            tuple(torch.randn(b, 8, s, 128, dtype=torch.bfloat16, device="cuda") for _ in "kv")
            for _ in range(copies(nbytes, l2, cap=16))
        ]
        mask = (torch.arange(s, device="cuda") < s - 8).view(1, 1, 1, s).expand(b, 1, 1, s)
        rows = []
        grid = itertools.product((64, 128, 256), (4, 8), (2, 3, 4), (1, 2, 4))
        default = default_config(b, 8, 1, 4, s)
        for bn, warps, stages, split in grid:
            cfg = KernelConfig("decode16", 16, bn, 0, split, warps, stages)
            if not valid_config(cfg, 4):
                continue
            try:
                us = time_graph(
                    [
                        lambda k=k, v=v, c=cfg, q=q, m=mask: launch(c, q, k, v, m, 128**-0.5)
                        for k, v in caches
                    ]
                )
            except Exception as e:  # noqa: BLE001 - out of shared memory, say, and go on
                print(f"{spec} {cfg}: {type(e).__name__}", flush=True)
                continue
            rows.append({"b": b, "s": s, "config": cfg.__dict__, "us": us})
        rows.sort(key=lambda r: r["us"])
        floor = nbytes / 3.0e12 * 1e6
        print(f"B={b} S={s}: fp16 floor {floor:.1f} us; default {default}", flush=True)
        for r in rows[:6]:
            c = r["config"]
            print(f"  {r['us']:6.1f} us  n{c['block_n']} w{c['num_warps']} s{c['num_stages']} "
                  f"split{c['split_k']}", flush=True)  # fmt: skip
        results += rows
        del caches
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
