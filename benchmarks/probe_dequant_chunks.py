"""GPU probe: W4A16 at large M as dequantize + cuBLAS with the fp16 weight made and used in
chunks that fit in L2, beside the one-shot `dequant_mm` (the current large-M path) and cuBLAS
fp16 on an fp16 weight.

Why: one-shot `dequant_mm` writes the whole fp16 weight to HBM and cuBLAS reads it back, 4
bytes per weight on top of the int4 read. That costs about as much as cuBLAS's own GEMM at
M = 256 (28672x4096: 212.5 against 112.6 us on the H100, nineteenth session). Chunks of the
weight that stay in the 50 MB L2 between the dequantize kernel that writes them and the GEMM
that reads them could skip most of that traffic, at the price of smaller GEMMs:
- along N: each chunk of columns is a whole GEMM; x ([M, K]) is read once per chunk, so this
  suits small K;
- along K: each chunk of K adds into the output (`addmm_`, beta = 1, so the sum goes through
  fp16 between chunks: its error is reported beside the time).
One [chunk] buffer is reused, so its lines stay resident. Timed as CUDA-graph replays over
weight copies rotated past L2 (`bench_w4a16.time_graph`).

    python benchmarks/probe_dequant_chunks.py --out $OUT/probe_dequant_chunks.json
    TRITON_INTERPRET=1 python benchmarks/probe_dequant_chunks.py --smoke   # CPU: numerics only
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton

from qcompile.lowering.w4a16 import _dequant_rows, _dequantize_kernel
from qcompile.quant.int4 import PackedInt4, dequantize_int4

BLOCK_N = 256  # the dequantize kernel's columns per program, as `dequant_mm` launches it


def dequantize_into(p: PackedInt4, w: torch.Tensor, n0: int, r0: int) -> None:
    """w ([rows, cols], contiguous) = the fp weight^T of K rows r0.. and columns n0.. of `p`
    (`_dequantize_kernel` on views of the packed tensors: their row stride stays N)."""
    rows, cols = w.shape
    g = p.group_size
    if r0 % g or rows % 8 or n0 + cols > p.qweight.shape[1]:
        raise ValueError(f"dequantize_into: rows {r0}+{rows} must start on a group ({g})")
    words = rows // 8
    per_program = _dequant_rows(rows)
    n = p.qweight.shape[1]
    _dequantize_kernel[(triton.cdiv(cols, BLOCK_N), words // per_program)](
        p.qweight[r0 // 8 :, n0:], p.scales[r0 // g :, n0:], p.offsets[r0 // g :, n0:], w,
        cols, n, GROUP=g, BLOCK_N=BLOCK_N, ROWS=per_program, num_warps=4,
    )  # fmt: skip


def chunked_n(x: torch.Tensor, p: PackedInt4, chunk: int, buf: torch.Tensor, out: torch.Tensor):
    """out = x @ W^T, W dequantized `chunk` output columns at a time into `buf`."""
    k, n = x.shape[1], p.qweight.shape[1]
    for n0 in range(0, n, chunk):
        c = min(chunk, n - n0)
        w = buf[: k * c].view(k, c)
        dequantize_into(p, w, n0, 0)
        torch.mm(x, w, out=out[:, n0 : n0 + c])
    return out


def chunked_k(x: torch.Tensor, p: PackedInt4, chunk: int, buf: torch.Tensor, out: torch.Tensor):
    """out = x @ W^T, W dequantized `chunk` K rows at a time into `buf`, summed by addmm."""
    k, n = x.shape[1], p.qweight.shape[1]
    for i, k0 in enumerate(range(0, k, chunk)):
        c = min(chunk, k - k0)
        w = buf[: c * n].view(c, n)
        dequantize_into(p, w, 0, k0)
        if i == 0:
            torch.mm(x[:, k0 : k0 + c], w, out=out)
        else:
            out.addmm_(x[:, k0 : k0 + c], w)
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def smoke() -> None:
    """CPU (Triton's interpreter): both chunkings equal dequantize + matmul."""
    from qcompile.config import Scheme
    from qcompile.quant.rtn import quantize_weight_int4

    gen = torch.Generator().manual_seed(0)
    n, k, g, m = 96, 256, 32, 5
    p = quantize_weight_int4(torch.randn(n, k, generator=gen), Scheme(group_size=g), torch.float16)
    x = torch.randn(m, k, generator=gen).half()
    ref = x.double() @ dequantize_int4(p, torch.float64).t()
    for fn, chunk in ((chunked_n, 32), (chunked_n, 64), (chunked_k, 64), (chunked_k, 128)):
        buf = torch.empty(k * n, dtype=torch.float16)
        out = fn(x, p, chunk, buf, torch.empty(m, n, dtype=torch.float16))
        err = rel_err(out, ref.float())
        assert err < 2e-3, (fn.__name__, chunk, err)
        print(f"{fn.__name__} chunk {chunk}: rel err {err:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="28672x4096,8192x28672")
    ap.add_argument("--ms", default="256,1024")
    ap.add_argument("--n-chunks", default="1024,2048,4096", help="columns per chunk")
    ap.add_argument("--k-chunks", default="1024,2048,4096", help="K rows per chunk")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter numerics check")
    args = ap.parse_args()
    if args.smoke:
        smoke()
        return
    import torch.nn.functional as F
    from bench_w4a16 import GROUP, time_graph
    from weights import rotated_w4a16

    from qcompile.lowering.w4a16 import w4a16_linear_cuda

    dtype = torch.float16
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "l2_bytes": l2}  # fmt: skip
    rows = []
    for spec in args.shapes.split(","):
        n, k = map(int, spec.split("x"))
        packed, wf = rotated_w4a16(n, k, GROUP, dtype, l2)
        ref_w = dequantize_int4(packed[0], torch.float32).t()  # [K, N]
        buf = torch.empty(k * n, dtype=dtype, device="cuda")  # the largest chunk's room
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            out = torch.empty(m, n, dtype=dtype, device="cuda")
            ref = x.float() @ ref_w
            row = {"n": n, "k": k, "m": m}
            row["cublas_us"] = time_graph([lambda x=x, w=w: F.linear(x, w) for w in wf], batches=7)
            # the op's pick at this M (dequant_mm in the shipped configs)
            row["dequant_mm_us"] = time_graph(
                [
                    lambda x=x, p=p: w4a16_linear_cuda(
                        x, p.qweight, p.scales, p.offsets, None, GROUP
                    )
                    for p in packed
                ],
                batches=7,
            )
            row["variants"] = []
            for name, fn, chunks in (
                ("n", chunked_n, args.n_chunks),
                ("k", chunked_k, args.k_chunks),
            ):
                for chunk in map(int, chunks.split(",")):
                    if chunk >= (n if name == "n" else k):
                        continue
                    err = rel_err(fn(x, packed[0], chunk, buf, out), ref)
                    us = time_graph(
                        [
                            lambda x=x, p=p, c=chunk, f=fn, b=buf, o=out: f(x, p, c, b, o)
                            for p in packed
                        ],
                        batches=7,
                    )
                    mb = 2 * chunk * (k if name == "n" else n) / 2**20
                    row["variants"].append(
                        {"along": name, "chunk": chunk, "chunk_mib": mb, "us": us, "rel_err": err}
                    )
            row["variants"].sort(key=lambda r: r["us"])
            best = row["variants"][0] if row["variants"] else None
            print(
                f"N={n} K={k} M={m}: cublas {row['cublas_us']:.1f} dequant_mm "
                f"{row['dequant_mm_us']:.1f} | "
                + ", ".join(f"{v['along']}{v['chunk']} ({v['chunk_mib']:.0f} MiB) {v['us']:.1f}"
                            f" err {v['rel_err']:.0e}" for v in row["variants"])
                + (f" | best {row['cublas_us'] / best['us']:.2f}x cublas" if best else ""),
                flush=True,
            )  # fmt: skip
            rows.append(row)
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
