"""W4A8 linear on the GPU, side by side: cuBLAS fp16 (F.linear), torch._int_mm (int8 x int8,
the int8 ceiling), torch._scaled_mm (fp8 e4m3, the fp8 ceiling), our W4A16, and our W4A8 (int8
and fp8 activations; with the per-token quantize kernel, and GEMM only as the fused compiled
graph runs it). At M <= 16 also producer -> linear as a compiled model runs it (RMSNorm or
SiLU * mul), W4A16 beside W4A8 with the quantization fused into Inductor's producer kernel.

Same shapes, M and method as `bench_w4a16.py`: medians over batches of CUDA-graph replays, each
graph running the op over R weight copies (R * weight bytes >= 4 x L2). Roofline = the larger
of the memory floor (bytes moved once / measured HBM bandwidth) and the int8 compute floor
(2 M N K / the int8 rate torch._int_mm reaches on an 8192^3 product). The ceilings leave out
what a real W4A8 layer also does (activation quantization, rescale): they bound it.

    python benchmarks/bench_w4a8.py --out benchmarks/results   # on the H100
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_w4a16 import MS, SHAPES, copies, hbm_bandwidth, time_graph
from weights import random_packed, random_w4a8

from qcompile.lowering.autotune import KernelConfig, autotuner

GROUP = 128
# The acceptance: these shapes (N x K) >= 1.3x cuBLAS fp16 at these M; W4A8 no slower
# than our W4A16 at M <= 16.
ACCEPTANCE_SHAPES = ((8192, 28672), (28672, 4096))
ACCEPTANCE_MS = (256, 1024)
ACCEPTANCE_SPEEDUP = 1.3
SMALL_M = 16


def w4a8_bytes(m: int, n: int, k: int, group: int) -> int:
    """Bytes a W4A8 linear moves once: int4 codes, uint8 group scales and zeros, fp32 channel
    scales, int8 activations and their fp32 scales, fp16 output."""
    return n * k // 2 + 2 * n * (k // group) + 4 * n + m * k + 4 * m + 2 * m * n


def roofline_us(m: int, n: int, k: int, group: int, hbm_bytes_s: float, int8_ops_s: float) -> float:
    """max(memory floor, int8 compute floor), microseconds."""
    return 1e6 * max(w4a8_bytes(m, n, k, group) / hbm_bytes_s, 2 * m * n * k / int8_ops_s)


def padded_rows(m: int, multiple: int, minimum: int = 0) -> int:
    """M rounded up for library kernels with shape rules (_int_mm: M > 16; _scaled_mm: % 16)."""
    return max(-(-m // multiple) * multiple, minimum)


def int8_rate() -> float:
    """int8 ops/s of torch._int_mm on an 8192^3 product (the compute ceiling we report)."""
    a = torch.randint(-127, 128, (8192, 8192), dtype=torch.int8, device="cuda")
    b = torch.randint(-127, 128, (8192, 8192), dtype=torch.int8, device="cuda").t()
    us = time_graph([lambda: torch._int_mm(a, b)], batches=5, min_ms=50.0)
    return 2 * 8192**3 / (us * 1e-6)


def bench_shape(n: int, k: int, ms: list[int], l2: int, bw: float, ops: float) -> list[dict]:
    from qcompile.lowering.w4a8 import (
        quantize_per_token,
        tune_key,
        w4a8_linear_cuda,
        w4a8_linear_quantized_act_cuda,
    )
    from qcompile.lowering.w4a16 import w4a16_linear_cuda

    rows = []
    dev = "cuda"
    r_q = copies(w4a8_bytes(0, n, k, GROUP), l2)
    w8s = [random_w4a8(n, k, GROUP) for _ in range(r_q)]
    w16s = [random_packed(n, k, GROUP, torch.float16) for _ in range(r_q)]
    r_f = copies(2 * n * k, l2)
    wf = [torch.randn(n, k, dtype=torch.float16, device=dev) * 0.02 for _ in range(r_f)]
    r_i = copies(n * k, l2)
    wi = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev).t() for _ in range(r_i)]
    try:
        w_fp8 = [w.to(torch.float8_e4m3fn).t() for w in wf[:r_i]]  # [K, N] column-major
    except (RuntimeError, TypeError) as err:
        print(f"fp8 unavailable: {err}")
        w_fp8 = []
    one = torch.ones((), device=dev)
    for m in ms:
        x = torch.randn(m, k, dtype=torch.float16, device=dev)
        m_int = padded_rows(m, 8, minimum=32)
        x8 = torch.randint(-127, 128, (m_int, k), dtype=torch.int8, device=dev)
        row = {"n": n, "k": k, "m": m, "group": GROUP, "int_mm_rows": m_int}
        row["cublas_fp16_us"] = time_graph([lambda x=x, w=w: F.linear(x, w) for w in wf])
        row["int_mm_us"] = time_graph([lambda x8=x8, w=w: torch._int_mm(x8, w) for w in wi])
        if w_fp8:
            m_fp8 = padded_rows(m, 16)
            xf8 = torch.randn(m_fp8, k, device=dev).to(torch.float8_e4m3fn)
            row["scaled_mm_rows"] = m_fp8
            row["scaled_mm_fp8_us"] = time_graph(
                [
                    lambda a=xf8, w=w: torch._scaled_mm(a, w, one, one, out_dtype=torch.float16)
                    for w in w_fp8
                ]
            )
        row["w4a16_us"] = time_graph(
            [lambda x=x, p=p: w4a16_linear_cuda(x, *p.tensors(), None, GROUP) for p in w16s]
        )
        for act, name in (("int8", "w4a8"), ("float8_e4m3fn", "w4a8_fp8")):
            try:  # a failure (e.g. no config compiles) is recorded in the row; the run goes on
                row[f"{name}_us"] = time_graph(
                    [
                        lambda x=x, p=p, a=act: w4a8_linear_cuda(x, *p.tensors(), None, GROUP, a)
                        for p in w8s
                    ]
                )
                xq, xs = quantize_per_token(x, act)
                row[f"{name}_gemm_only_us"] = time_graph(
                    [
                        lambda xq=xq, xs=xs, p=p: w4a8_linear_quantized_act_cuda(
                            xq, xs, *p.tensors(), None, GROUP, torch.float16
                        )
                        for p in w8s
                    ]
                )
            except RuntimeError as err:
                row[f"{name}_error"] = str(err)[-3000:]
                row[f"{name}_us"] = row[f"{name}_gemm_only_us"] = float("nan")
                print(f"{name} failed at M={m}: {row[f'{name}_error']}", flush=True)
            cfg = autotuner(0).lookup(tune_key(m, n, k, GROUP, act, torch.float16))
            row[f"{name}_config"] = None if cfg is None else asdict(cfg)
        if m <= SMALL_M:
            row.update(fused_block_us(m, k, w16s, w8s))
        row["roofline_us"] = roofline_us(m, n, k, GROUP, bw, ops)
        row["speedup_vs_cublas"] = row["cublas_fp16_us"] / row["w4a8_us"]
        row["speedup_vs_w4a16"] = row["w4a16_us"] / row["w4a8_us"]
        rows.append(row)
        print(
            f"N={n:6d} K={k:6d} M={m:5d}  cublas {row['cublas_fp16_us']:8.1f}  int_mm "
            f"{row['int_mm_us']:8.1f}  fp8 {row.get('scaled_mm_fp8_us', float('nan')):8.1f}  "
            f"w4a16 {row['w4a16_us']:8.1f}  w4a8 {row['w4a8_us']:8.1f} "
            f"(gemm {row['w4a8_gemm_only_us']:8.1f})  floor {row['roofline_us']:7.1f}  "
            f"x{row['speedup_vs_cublas']:.2f}",
            flush=True,
        )
    return rows


def _rms_norm(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Llama's RMSNorm (transformers' LlamaRMSNorm): fp32 statistics, result in h's dtype."""
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5)
    return weight * hf.to(h.dtype)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Llama's MLP activation, what feeds down_proj."""
    return torch.nn.functional.silu(gate) * up


# What produces a linear's input in a Llama block: the RMSNorm for q/k/v and gate/up (K = the
# hidden size), SiLU(gate) * up for down_proj (K = the intermediate size, 14336 / 28672 in
# Llama-3-8B / 70B)
PRODUCERS = {"rmsnorm": _rms_norm, "silu_mul": _silu_mul}
PRODUCER_NAMES = {"rmsnorm": "RMSNorm", "silu_mul": "SiLU * mul"}


def producer_for(k: int) -> str:
    """The producer of a K-wide input in Llama-3's shapes (hidden sizes 4096 and 8192)."""
    return "rmsnorm" if k in (4096, 8192) else "silu_mul"


def _then_quantize(kind: str, chunks: int = 1):
    from qcompile.quant.w4a8 import quantize_activations_per_token

    def fn(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_activations_per_token(PRODUCERS[kind](a, b), "int8", chunks)

    return fn


def fused_block_us(m: int, k: int, w16s: list, w8s: list) -> dict:
    """Producer -> linear as a compiled model runs it, W4A16 beside int8 W4A8: Inductor's
    kernel for the producer (RMSNorm or SiLU * mul, `producer_for`; for W4A8 with the
    per-token quantization fused into it, as the pass emits it), then our GEMM; one CUDA
    graph per variant over the rotated weights."""
    from qcompile.lowering.w4a8 import w4a8_linear_quantized_act_cuda
    from qcompile.lowering.w4a16 import w4a16_linear_cuda

    kind = producer_for(k)
    produce = torch.compile(PRODUCERS[kind], dynamic=False)
    from qcompile.quant.w4a8 import absmax_chunks

    shipped = absmax_chunks(k)  # the chunks the pass emits (`quant.w4a8._ABSMAX_CHUNK`)
    produce_q = torch.compile(_then_quantize(kind, shipped), dynamic=False)
    a = torch.randn(m, k, dtype=torch.float16, device="cuda") * 3
    if kind == "rmsnorm":
        b = torch.rand(k, dtype=torch.float16, device="cuda") + 0.5
    else:
        b = torch.randn(m, k, dtype=torch.float16, device="cuda")
    row = {
        "producer": kind,
        "producer_us": time_graph([lambda: produce(a, b)]),
        "producer_quantize_us": time_graph([lambda: produce_q(a, b)]),
        "w4a16_block_us": time_graph(
            [lambda p=p: w4a16_linear_cuda(produce(a, b), *p.tensors(), None, GROUP) for p in w16s]
        ),
        "w4a8_block_us": time_graph(
            [
                lambda p=p: w4a8_linear_quantized_act_cuda(
                    *produce_q(a, b), *p.tensors(), None, GROUP, torch.float16
                )
                for p in w8s
            ]
        ),
    }
    row["block_speedup_vs_w4a16"] = row["w4a16_block_us"] / row["w4a8_block_us"]
    if ABSMAX_CHUNK and k % ABSMAX_CHUNK == 0 and k >= 2 * ABSMAX_CHUNK:
        # the same block with the row's absmax over K / chunk chunks (`--absmax-chunk`)
        produce_c = torch.compile(_then_quantize(kind, k // ABSMAX_CHUNK), dynamic=False)
        xq, xs = produce_q(a, b)
        cq, cs = produce_c(a, b)
        row["chunked_same_bits"] = bool(torch.equal(xq, cq) and torch.equal(xs, cs))
        row["producer_quantize_chunked_us"] = time_graph([lambda: produce_c(a, b)])
        row["w4a8_block_chunked_us"] = time_graph(
            [
                lambda p=p: w4a8_linear_quantized_act_cuda(
                    *produce_c(a, b), *p.tensors(), None, GROUP, torch.float16
                )
                for p in w8s
            ]
        )
        print(
            f"  M={m} K={k}: {kind} + quantize over {shipped} chunks "
            f"{row['producer_quantize_us']:.1f} us, over "
            f"{k // ABSMAX_CHUNK} chunks {row['producer_quantize_chunked_us']:.1f} us (same bits: "
            f"{row['chunked_same_bits']}); block {row['w4a8_block_us']:.1f} -> "
            f"{row['w4a8_block_chunked_us']:.1f} us, W4A16's {row['w4a16_block_us']:.1f}",
            flush=True,
        )
    return row


ABSMAX_CHUNK = 0  # `--absmax-chunk`: also time the block with the chunked absmax


def acceptance(rows: list[dict]) -> list[tuple[str, float, bool]]:
    """The issue's checks on these rows: (what, measured ratio, passed)."""
    checks = []
    for r in rows:
        if (r["n"], r["k"]) in ACCEPTANCE_SHAPES and r["m"] in ACCEPTANCE_MS:
            s = r["cublas_fp16_us"] / r["w4a8_us"]
            what = f"{r['n']}x{r['k']} M={r['m']}: W4A8 vs cuBLAS fp16 >= {ACCEPTANCE_SPEEDUP}x"
            checks.append((what, s, s >= ACCEPTANCE_SPEEDUP))
        if r["m"] <= SMALL_M:
            s = r["w4a16_us"] / r["w4a8_us"]
            what = f"{r['n']}x{r['k']} M={r['m']}: W4A8 no slower than W4A16"
            checks.append((what, s, s >= 1.0))
        if "block_speedup_vs_w4a16" in r:
            s = r["block_speedup_vs_w4a16"]
            prod = PRODUCER_NAMES[r.get("producer", "rmsnorm")]
            what = (
                f"{r['n']}x{r['k']} M={r['m']}: compiled {prod} -> W4A8 (quantization fused) "
                f"no slower than {prod} -> W4A16"
            )
            checks.append((what, s, s >= 1.0))
    return checks


def _us(r: dict, key: str) -> str:
    v = r.get(key)
    return "n/a" if v is None else f"{v:.1f}"


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# W4A8 linear: qcompile vs cuBLAS fp16, torch._int_mm, torch._scaled_mm and W4A16",
        "",
        f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; HBM "
        f"{meta['hbm_tb_s']:.2f} TB/s and int8 {meta['int8_tops']:.0f} TOPS (torch._int_mm, "
        f"8192^3) measured; group size {GROUP}; CUDA-graph replays, weights rotated over >= 4x "
        "L2. Times in microseconds (median). W4A8 = per-token quantize kernel + GEMM (the eager "
        "op); gemm = GEMM only (the compiled graph, quantization fused upstream). _int_mm pads "
        "M to >= 32, _scaled_mm to a multiple of 16; both are bare GEMMs (no quantization, no "
        "rescale): ceilings, not competitors. Speedup = cuBLAS / W4A8.",
        "",
        "| N x K | M | cuBLAS fp16 | _int_mm | _scaled_mm fp8 | W4A16 | W4A8 int8 | gemm | "
        "W4A8 fp8 | gemm | floor | % of floor | vs cuBLAS | vs W4A16 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']}x{r['k']} | {r['m']} | {_us(r, 'cublas_fp16_us')} | {_us(r, 'int_mm_us')} "
            f"| {_us(r, 'scaled_mm_fp8_us')} | {_us(r, 'w4a16_us')} | {_us(r, 'w4a8_us')} | "
            f"{_us(r, 'w4a8_gemm_only_us')} | {_us(r, 'w4a8_fp8_us')} | "
            f"{_us(r, 'w4a8_fp8_gemm_only_us')} | {r['roofline_us']:.1f} | "
            f"{100 * r['roofline_us'] / r['w4a8_us']:.0f}% | {r['speedup_vs_cublas']:.2f}x | "
            f"{r['speedup_vs_w4a16']:.2f}x |"
        )
    blocks = [r for r in rows if "w4a8_block_us" in r]
    if blocks:
        lines += [
            "",
            "## Compiled producer -> linear at small M",
            "",
            "What a compiled model runs: Inductor's kernel for what produces x (the RMSNorm "
            "where K is a hidden size, SiLU(gate) * up where it is an intermediate size; for "
            "W4A8 with the per-token int8 quantization fused into it, as the pass emits it), "
            "then our GEMM. One CUDA graph per variant, weights rotated as above; microseconds.",
            "",
            "| N x K | M | producer | alone | with quantize | -> W4A16 | -> W4A8 | W4A8 vs W4A16 |",
            "|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['n']}x{r['k']} | {r['m']} | {PRODUCER_NAMES[r.get('producer', 'rmsnorm')]} "
            f"| {r.get('producer_us', r.get('norm_us')):.1f} "
            f"| {r.get('producer_quantize_us', r.get('norm_quantize_us')):.1f} "
            f"| {r['w4a16_block_us']:.1f} | {r['w4a8_block_us']:.1f} | "
            f"{r['block_speedup_vs_w4a16']:.2f}x |"
            for r in blocks
        ]
    checks = acceptance(rows)
    if checks:
        lines += ["", "## Acceptance", "", "| check | measured | |", "|---|---:|---|"]
        lines += [f"| {w} | {s:.2f}x | {'pass' if ok else 'FAIL'} |" for w, s, ok in checks]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument(
        "--retune", action="store_true",
        help="tune every shape afresh (ignore the shipped configs and the user cache)",
    )  # fmt: skip
    ap.add_argument(
        "--int8-config", default="",
        help="kernel,block_m,block_n,block_k,split_k,warps,stages: the int8 W4A8 config at "
        "M >= 128 instead of the tuned or default one (in memory only), e.g. int_mm,0,128,128,1,4,1",
    )  # fmt: skip
    ap.add_argument(
        "--absmax-chunk", type=int, default=0,
        help="also time the compiled producer -> W4A8 block with each row's absmax taken over "
        "K / this many columns' chunks first, beside the shipped `quant.w4a8._ABSMAX_CHUNK` "
        "(2048; set 0 there for one reduction a row)",
    )  # fmt: skip
    args = ap.parse_args()
    import triton

    global ABSMAX_CHUNK
    ABSMAX_CHUNK = args.absmax_chunk
    if args.retune:
        autotuner(0).shipped = {}
        autotuner(0).user = {}
    forced = None
    if args.int8_config:
        kind, *ints = args.int8_config.split(",")
        forced = KernelConfig(kind, *map(int, ints))
    args.out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    bw = hbm_bandwidth()
    ops = int8_rate()
    meta = {
        "device": props.name, "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "hbm_tb_s": bw / 1e12, "int8_tops": ops / 1e12,
        "l2_bytes": props.L2_cache_size,
    }  # fmt: skip
    print(meta, flush=True)
    rows: list[dict] = []
    ms = [int(m) for m in args.ms.split(",")]
    if forced is not None:
        meta["int8_config_forced_at_m_ge_128"] = asdict(forced)
    for spec in args.shapes.split(","):
        n, k = map(int, spec.split("x"))
        if forced is not None:
            from qcompile.lowering.w4a8 import tune_key

            for m in ms:
                if m >= 128:
                    autotuner(0).user[tune_key(m, n, k, GROUP, "int8", torch.float16)] = forced
        rows += bench_shape(n, k, ms, props.L2_cache_size, bw, ops)
        torch.cuda.empty_cache()
        (args.out / "w4a8.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "w4a8.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
