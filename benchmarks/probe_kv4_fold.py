"""GPU probe: `_kv4_decode_kernel` with P @ V accumulated in place (`_FOLD_UNIT`) vs a fresh
dot per tile, same configs side by side, decode and causal prefill, with fp16 SDPA.

    python benchmarks/probe_kv4_fold.py --out /tmp/fold.json    # on the GPU
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_kv4 import GROUP, HKV, HQ, D, kv_bytes, random_kv4
from bench_w4a16 import copies, hbm_bandwidth, time_graph

from qcompile.lowering import kv4_attention as kv4
from qcompile.lowering.autotune import KernelConfig

DECODE = ((1, 8192), (1, 32768), (16, 8192), (16, 32768), (64, 8192))
DECODE_TILES = ((64, 1, 3), (64, 1, 2), (128, 4, 3), (256, 4, 3))  # (BLOCK_N, warps, stages)
PREFILL = (4096, 8192)
PREFILL_TILES = ((64, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2))


def timed(cfg: KernelConfig, fold: bool, q, caches, causal: bool) -> tuple[float, float]:
    """(median us of CUDA-graph replays over the cache copies, rel. difference to the other
    accumulation on the first copy)."""
    kv4._FOLD_UNIT = fold
    calls = [
        lambda k=k, v=v: kv4.launch_attention(
            cfg,
            q,
            *(k.codes, k.scales, k.offsets),
            *(v.codes, v.scales, v.offsets),
            None,
            None,
            causal,
            D**-0.5,
        )  # fmt: skip
        for k, v in caches
    ]
    out = calls[0]()
    kv4._FOLD_UNIT = not fold
    other = calls[0]()
    kv4._FOLD_UNIT = fold
    err = ((out.float() - other.float()).norm() / other.float().norm()).item()
    return time_graph(calls), err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    bw = hbm_bandwidth()
    rows = []
    for b, s in DECODE:
        q = torch.randn(b, HQ, 1, D, dtype=torch.float16, device="cuda")
        int4 = kv_bytes(b, HKV, s, D, GROUP)
        caches = [random_kv4(b, HKV, s, D, GROUP) for _ in range(copies(int4, l2, cap=16))]
        base = kv4.default_config(b, HKV, 1, HQ // HKV, s)
        floor = int4 / bw * 1e6
        kv = [tuple(torch.randn(b, HKV, s, D, dtype=torch.float16, device="cuda") for _ in "kv")]
        qp = q.view(b, HKV, HQ // HKV, D)
        sdpa = time_graph(
            [lambda q=qp, k=k, v=v: F.scaled_dot_product_attention(q, k, v) for k, v in kv]
        )
        del kv
        for bn, warps, stages in DECODE_TILES:
            for split in sorted({base.split_k, max(1, base.split_k // 2), base.split_k * 2}):
                cfg = KernelConfig("decode", base.block_m, bn, 0, split, warps, stages)
                if not kv4.valid_config(cfg, HQ // HKV):
                    continue
                for fold in (False, True):
                    us, err = timed(cfg, fold, q, caches, False)
                    rows.append({"phase": "decode", "b": b, "s": s, "cfg": cfg.__dict__,
                                 "fold": fold, "us": us, "sdpa_us": sdpa, "floor_us": floor,
                                 "err_vs_other": err})  # fmt: skip
                    print(json.dumps(rows[-1]), flush=True)
        del caches
        args.out.write_text(json.dumps(rows, indent=1))
    for s in PREFILL:
        q = torch.randn(1, HQ, s, D, dtype=torch.float16, device="cuda")
        k = torch.randn(1, HKV, s, D, dtype=torch.float16, device="cuda")
        sdpa = time_graph(
            [
                lambda q=q, k=k: F.scaled_dot_product_attention(
                    q, k, k, is_causal=True, enable_gqa=True
                )
            ]
        )
        caches = [random_kv4(1, HKV, s, D, GROUP)]
        for bm, bn, warps, stages in PREFILL_TILES:
            cfg = KernelConfig("prefill", bm, bn, 0, 1, warps, stages)
            for fold in (False, True):
                us, err = timed(cfg, fold, q, caches, True)
                rows.append({"phase": "prefill", "s": s, "cfg": cfg.__dict__, "fold": fold,
                             "us": us, "sdpa_us": sdpa, "err_vs_other": err})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
        args.out.write_text(json.dumps(rows, indent=1))
    best = {}
    for r in rows:
        key = (r["phase"], r.get("b", 1), r["s"], r["fold"])
        best[key] = min(best.get(key, 1e9), r["us"])
    for (phase, b, s, fold), us in sorted(best.items()):
        print(f"{phase} B={b} S={s} fold={fold}: best {us:.1f} us")


if __name__ == "__main__":
    main()
