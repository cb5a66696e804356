"""GPU probe: can the W4A8 int_mm path hide its unpacking pass? An experiment, not a kernel.

The int_mm path (`lowering/w4a8.py`) unpacks the whole int4 weight to int8 [N, K], then runs
`torch._int_mm`. On the H100 that pass costs ~120 us of the 261 us at 8192x28672, M = 256
(`results/session17/`). Here the weight is unpacked in C chunks along K on a side stream,
two chunk buffers in turn, while the main stream runs `_int_mm` on the chunk before (each
chunk's int32 product in its own slice of a [C, M, N] workspace, summed by the split-K
epilogue). The unpacking is memory-bound and the GEMM compute-bound, and at M = 256 the GEMM's
tiles leave SMs idle, so the two may overlap; a chunk small enough for L2 may also be read
back from it. Timed beside cuBLAS fp16, bare `_int_mm` and the unchunked int_mm path, CUDA
graphs over weight copies rotated past L2; every variant's accumulator checked exactly.

    python benchmarks/probe_w4a8_overlap.py --out $OUT/probe_w4a8_overlap.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from bench_w4a16 import GROUP, copies, time_graph
from weights import random_w4a8

from qcompile.lowering.autotune import KernelConfig
from qcompile.lowering.w4a8 import _rescale, _w4a8_unpack_kernel, launch, quantize_per_token
from qcompile.quant.w4a8 import int8_weight

_SIDE: list[torch.cuda.Stream] = []


def _unpack(p, k0: int, k1: int, out: torch.Tensor, bn: int, bk: int) -> None:
    """Columns k0..k1 of the int8 weight into out [N, k1 - k0]."""
    n = p.qweight.shape[1]
    g = p.group_size
    _w4a8_unpack_kernel[(triton.cdiv(n, bn), (k1 - k0) // bk)](
        p.qweight[k0 // 8 :], p.group_scales[k0 // g :], p.group_zeros[k0 // g :], out, n,
        k1 - k0, GROUP=g, BLOCK_N=bn, BLOCK_K=bk, ASM=p.qweight.is_cuda, num_warps=4,
    )  # fmt: skip


def overlapped(p, xq_chunks, xs, chunks: int, bn: int, bk: int, accumulator: bool = False):
    """int_mm with the unpacking of chunk c + 1 (side stream) beside the GEMM of chunk c."""
    if not _SIDE:
        _SIDE.append(torch.cuda.Stream())
    side, main = _SIDE[0], torch.cuda.current_stream()
    n = p.qweight.shape[1]
    m, kc = xq_chunks[0].shape
    bufs = [torch.empty((n, kc), dtype=torch.int8, device="cuda") for _ in range(2)]
    acc = torch.empty((chunks, m, n), dtype=torch.int32, device="cuda")
    ready = [torch.cuda.Event() for _ in range(chunks)]
    done = [torch.cuda.Event() for _ in range(chunks)]
    side.wait_stream(main)

    def unpack(c: int) -> None:  # on the side stream, into buffer c % 2
        with torch.cuda.stream(side):
            if c >= 2:
                side.wait_event(done[c - 2])  # the GEMM that read this buffer last
            _unpack(p, c * kc, (c + 1) * kc, bufs[c % 2], bn, bk)
            ready[c].record(side)

    # Host order matters: a stream waits on an event's latest record at the time of the wait,
    # so each wait is issued after the record it waits for.
    for c in range(min(2, chunks)):
        unpack(c)
    for c in range(chunks):
        main.wait_event(ready[c])
        torch._int_mm(xq_chunks[c], bufs[c % 2].t(), out=acc[c])
        done[c].record(main)
        if c + 2 < chunks:
            unpack(c + 2)
    main.wait_stream(side)
    for b in bufs:
        b.record_stream(side)
    if accumulator:
        return acc.sum(dim=0, dtype=torch.int64)
    out = torch.empty((m, n), dtype=torch.float16, device="cuda")
    _rescale(acc, xs, p.channel_scales, None, out, split=chunks)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8192x28672,28672x4096")
    ap.add_argument("--ms", default="256,1024")
    ap.add_argument("--chunks", default="2,4,8")
    ap.add_argument("--tile", default="64,256", help="unpacking BLOCK_N,BLOCK_K")
    ap.add_argument("--budget", type=float, default=200.0, help="seconds; then stop")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    t_start = time.time()
    bn, bk = map(int, args.tile.split(","))
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "group": GROUP, "tile": [bn, bk]}  # fmt: skip
    print(meta, flush=True)
    rows = []
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    for spec in args.shapes.split(","):
        n, k = map(int, spec.split("x"))
        packed = [random_w4a8(n, k, GROUP) for _ in range(copies(n * k // 2, l2))]
        wf = [torch.randn(n, k, dtype=torch.float16, device="cuda") for _ in range(copies(2 * n * k, l2))]  # fmt: skip
        wi = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda").t()
              for _ in range(copies(n * k, l2))]  # fmt: skip
        p0 = packed[0]
        w8 = int8_weight(p0.qweight, p0.group_scales, p0.group_zeros, GROUP).double()
        for m in map(int, args.ms.split(",")):
            if time.time() - t_start > args.budget:
                break
            x = torch.randn(m, k, dtype=torch.float16, device="cuda")
            xq, xs = quantize_per_token(x, "int8")
            ref = (xq.double() @ w8.t()).long()
            row = {"n": n, "k": k, "m": m}
            row["cublas_us"] = time_graph([lambda x=x, w=w: F.linear(x, w) for w in wf])
            row["int_mm_us"] = time_graph([lambda w=w, a=xq: torch._int_mm(a, w) for w in wi])
            unchunked = KernelConfig("int_mm", 0, bn, bk, 1, 4, 1)
            row["int_mm_path_us"] = time_graph(
                [
                    lambda p=p, a=xq, s=xs, cfg=unchunked: launch(
                        cfg, a, s, *p.tensors(), None, GROUP, torch.float16
                    )
                    for p in packed
                ]  # fmt: skip
            )
            for c in map(int, args.chunks.split(",")):
                if (k // c) % bk or (k // c) % GROUP:
                    continue
                kc = k // c

                # the quantize kernel could write xq as [C, M, K/C]; here the copy is timed too
                def split(xq=xq, c=c, kc=kc):
                    return [xq[:, i * kc : (i + 1) * kc].contiguous() for i in range(c)]

                exact = bool(torch.equal(overlapped(p0, split(), xs, c, bn, bk, True), ref))
                pre = split()
                row[f"overlap{c}_us"] = time_graph(
                    [
                        lambda p=p, c=c, f=split, s=xs: overlapped(p, f(), s, c, bn, bk)
                        for p in packed
                    ]
                )
                row[f"overlap{c}_presplit_us"] = time_graph(
                    [
                        lambda p=p, c=c, pre=pre, s=xs: overlapped(p, pre, s, c, bn, bk)
                        for p in packed
                    ]
                )
                row[f"overlap{c}_exact"] = exact
            rows.append(row)
            print(json.dumps({k_: round(v, 1) if isinstance(v, float) else v
                              for k_, v in row.items()}), flush=True)  # fmt: skip
            if args.out:
                args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        del packed, wf, wi


if __name__ == "__main__":
    main()
