"""The KV4 cache write of one token per head (a decode step) by tile: tokens per program and
warps, CUDA-graph replays (median), beside the 16-bit `index_copy_` of StaticCache.update;
B in --batches, 8 KV heads, D = 128, per-token groups of 128. Checks each tile bit for bit
against the default tile before timing. Writes kv4_write.json and .md under --out.

    python benchmarks/probe_kv4_write.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_w4a16 import time_graph

from qcompile.lowering.kv4_attention import kv4_cache_write_cuda

HKV, D, S = 8, 128, 8192
TILES = ((8, 4), (1, 1), (1, 2), (1, 4), (2, 1), (4, 1))


def probe(b: int) -> dict:
    """Every tile's time at batch b, after checking it against the default tile."""

    def cache():
        return [torch.zeros(b, HKV, S, D // 2, dtype=torch.uint8, device="cuda"),
                *(torch.zeros(b, HKV, S, 1, dtype=torch.float16, device="cuda") for _ in "so")]  # fmt: skip

    k = torch.randn(b, 1, HKV, D, dtype=torch.float16, device="cuda").transpose(1, 2)  # HF
    v = torch.randn(b, HKV, 1, D, dtype=torch.float16, device="cuda") * 3
    pos = torch.tensor([S - 33], device="cuda")
    want = cache() + cache()
    kv4_cache_write_cuda(k, v, *want, pos, 8, None, 4)
    row = {"b": b}
    for bt, w in TILES:
        got = cache() + cache()
        kv4_cache_write_cuda(k, v, *got, pos, bt, None, w)
        assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True)), (bt, w)
        row[f"{bt}x{w}"] = time_graph(
            [lambda bt=bt, w=w, got=got: kv4_cache_write_cuda(k, v, *got, pos, bt, None, w)]
        )
    kc, vc = (torch.zeros(b, HKV, S, D, dtype=torch.float16, device="cuda") for _ in "kv")
    row["fp16_index_copy"] = time_graph(
        [lambda: (kc.index_copy_(2, pos, k), vc.index_copy_(2, pos, v))]
    )
    return row


ap = argparse.ArgumentParser()
ap.add_argument("--batches", default="1,16,64")
ap.add_argument("--out", type=Path, default=Path("."))
args = ap.parse_args()
args.out.mkdir(parents=True, exist_ok=True)
rows = []
for b in map(int, args.batches.split(",")):
    rows.append(probe(b))
    print(json.dumps(rows[-1]), flush=True)
(args.out / "kv4_write.json").write_text(json.dumps(rows, indent=1))
head = " | ".join(f"{bt} tok / {w} warps" for bt, w in TILES)
lines = [f"| B | {head} | fp16 index_copy (K and V) |", "|---:" * (len(TILES) + 2) + "|"]
lines += ["| " + " | ".join([str(r["b"])] + [f"{r[f'{bt}x{w}']:.2f}" for bt, w in TILES]
          + [f"{r['fp16_index_copy']:.2f}"]) + " |" for r in rows]  # fmt: skip
(args.out / "kv4_write.md").write_text(
    "# KV4 cache write of one token per head, microseconds (CUDA-graph replays)\n\n"
    + "\n".join(lines)
    + "\n"
)
