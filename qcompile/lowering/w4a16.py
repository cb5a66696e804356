"""W4A16 Triton kernels: int4 group-wise weights x fp16/bf16 activations.

Weight layout: see `qcompile.quant.int4` (qweight [N, K//8] int32, scales/offsets [K//G, N]).
Two kernels and a launcher that picks between them per M bucket by autotuning:

* `_w4a16_gemv_kernel`  (M = 1..4): CUDA-core FMAs, one program per (N tile, K split, row).
  Memory-bound: floor = (N*K/2 + 2*2*N*K/G + 2*(M*K + M*N)) bytes / HBM bandwidth.
* `_w4a16_gemm_kernel`  (any M): tensor-core `tl.dot` on tiles dequantized in registers.
  Memory-bound up to M ~ 64-128 (same floor), then compute-bound: 2*M*N*K / tensor FLOP/s
  plus the dequantization, which is paid once per (weight element, M tile).
Both take a runtime split-K factor (no recompile per split); partial sums go to an fp32
workspace [SPLIT_K, M, N] reduced by `_splitk_reduce_kernel` (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.lowering.autotune import KernelConfig, TuneKey, autotuner, m_bucket

FAMILY = "w4a16"

# Exact int -> float for a nibble without a conversion instruction: OR the code into the
# mantissa of 2**23 and subtract 2**23 (conversions issue at 1/4 the rate of FMAs on sm_90).
_MAGIC_BITS = tl.constexpr(0x4B000000)
_MAGIC = tl.constexpr(8388608.0)


@triton.jit
def _unpack_codes(qw, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K // 8] int32 words -> [BLOCK_N, BLOCK_K] float32 codes 0..15."""
    shifts = tl.arange(0, 8) * 4
    nib = (qw[:, :, None] >> shifts[None, None, :]) & 0xF
    codes = tl.reshape(nib, (BLOCK_N, BLOCK_K))
    return (codes | _MAGIC_BITS).to(tl.float32, bitcast=True) - _MAGIC


# --------------------------------------------------------------------------- GEMV (M tiny)
@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, o_ptr, bias_ptr, out_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_xk, stride_qn, stride_om, stride_split,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Per group: sum_k (q*s + o) * x = s * sum_k q*x + o * sum_k x, so the inner loop is one
    # FMA per code and the scale/offset are applied once per (row, group).
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rw = tl.arange(0, BLOCK_K // 8)
    n_mask = rn < N
    k_start = pid_k * k_per_split
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        x = tl.load(x_ptr + m * stride_xm + (k0 + rk) * stride_xk).to(tl.float32)
        qw = tl.load(
            qw_ptr + rn[:, None] * stride_qn + (k0 // 8 + rw)[None, :],
            mask=n_mask[:, None],
            other=0,
        )
        q = _unpack_codes(qw, BLOCK_N, BLOCK_K)
        if BLOCK_K <= GROUP:
            g = k0 // GROUP
            s = tl.load(s_ptr + g * N + rn, mask=n_mask, other=0).to(tl.float32)
            o = tl.load(o_ptr + g * N + rn, mask=n_mask, other=0).to(tl.float32)
            acc += s * tl.sum(q * x[None, :], axis=1) + o * tl.sum(x, axis=0)
        else:
            NG: tl.constexpr = BLOCK_K // GROUP
            rg = k0 // GROUP + tl.arange(0, NG)
            s = tl.load(s_ptr + rg[None, :] * N + rn[:, None], mask=n_mask[:, None], other=0)
            o = tl.load(o_ptr + rg[None, :] * N + rn[:, None], mask=n_mask[:, None], other=0)
            qx = tl.sum(tl.reshape(q * x[None, :], (BLOCK_N, NG, GROUP)), axis=2)
            xs = tl.sum(tl.reshape(x, (NG, GROUP)), axis=1)
            acc += tl.sum(qx * s.to(tl.float32) + o.to(tl.float32) * xs[None, :], axis=1)
    if WRITE_PARTIAL:
        tl.store(out_ptr + pid_k * stride_split + m * stride_om + rn, acc, mask=n_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_mask, other=0).to(tl.float32)
        tl.store(out_ptr + m * stride_om + rn, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


# --------------------------------------------------------------------------- GEMM (tensor cores)
@triton.jit
def _w4a16_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, o_ptr, bias_ptr, out_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_xk, stride_qn, stride_om, stride_split,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # Tiles: x [BLOCK_M, BLOCK_K] (fp16/bf16) @ dequant(W)^T [BLOCK_K, BLOCK_N] -> fp32 acc.
    # BLOCK_K <= GROUP uses one scale vector per tile; BLOCK_K > GROUP (GROUP=32, BLOCK_K=64/128)
    # loads [BLOCK_N, BLOCK_K // GROUP] scales and broadcasts them over each group.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped launch order: GROUP_M M-tiles walk the same N-tiles together so W stays in L2.
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rw = tl.arange(0, BLOCK_K // 8)
    m_mask = rm < M
    n_mask = rn < N
    dtype = x_ptr.dtype.element_ty
    k_start = pid_k * k_per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :] * stride_xk,
            mask=m_mask[:, None],
            other=0.0,
        )
        qw = tl.load(
            qw_ptr + rn[:, None] * stride_qn + (k0 // 8 + rw)[None, :],
            mask=n_mask[:, None],
            other=0,
        )
        q = _unpack_codes(qw, BLOCK_N, BLOCK_K)
        if BLOCK_K <= GROUP:
            g = k0 // GROUP
            s = tl.load(s_ptr + g * N + rn, mask=n_mask, other=0).to(tl.float32)
            o = tl.load(o_ptr + g * N + rn, mask=n_mask, other=0).to(tl.float32)
            w = q * s[:, None] + o[:, None]
        else:
            NG: tl.constexpr = BLOCK_K // GROUP
            rg = k0 // GROUP + tl.arange(0, NG)
            s = tl.load(s_ptr + rg[None, :] * N + rn[:, None], mask=n_mask[:, None], other=0)
            o = tl.load(o_ptr + rg[None, :] * N + rn[:, None], mask=n_mask[:, None], other=0)
            q3 = tl.reshape(q, (BLOCK_N, NG, GROUP))
            w3 = q3 * s.to(tl.float32)[:, :, None] + o.to(tl.float32)[:, :, None]
            w = tl.reshape(w3, (BLOCK_N, BLOCK_K))
        acc = tl.dot(x, tl.trans(w.to(dtype)), acc)
    out_offs = rm[:, None] * stride_om + rn[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if WRITE_PARTIAL:
        tl.store(out_ptr + pid_k * stride_split + out_offs, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_mask, other=0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _splitk_reduce_kernel(
    ws_ptr, bias_ptr, out_ptr, MN, N, SPLIT_K,
    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # ws: [SPLIT_K, M, N] fp32 partial sums -> out [M, N] (+ bias), fixed summation order.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- configs
def _valid(cfg: KernelConfig, k: int, group: int) -> bool:
    """A config fits when each split's K range is a whole number of tiles aligned to groups."""
    if k % cfg.split_k:
        return False
    k_split = k // cfg.split_k
    if k_split % cfg.block_k or cfg.block_k % 8:
        return False
    return group % cfg.block_k == 0 or cfg.block_k % group == 0


# Split K only while the grid is under ~4 waves of an H100 (132 SMs): more splits past that
# add workspace traffic without adding parallelism.
_SPLIT_K_PROGRAM_TARGET = 4 * 132


def _useful_split(programs: int, split: int) -> bool:
    return split == 1 or programs * split // 2 < _SPLIT_K_PROGRAM_TARGET


def candidate_configs(m: int, n: int, k: int, group: int) -> list[KernelConfig]:
    """The configs autotuning tries for one (M bucket, N, K, group): small and hand-pruned."""
    mb = m_bucket(m)
    out: list[KernelConfig] = []
    splits = (1, 2, 4, 8, 16) if mb <= 64 else (1, 2, 4) if mb <= 256 else (1,)
    if mb <= 4:
        for bn, bk, warps in ((16, 256, 4), (32, 128, 4), (32, 256, 4), (64, 128, 4),
                              (16, 512, 4), (32, 512, 8)):  # fmt: skip
            for sk in splits:
                if _useful_split(triton.cdiv(n, bn) * mb, sk):
                    out += [KernelConfig("gemv", 1, bn, bk, sk, warps, st) for st in (1, 3)]
    bms = (16,) if mb <= 16 else (32,) if mb <= 32 else (64,) if mb <= 64 else (64, 128)
    for bm in bms:
        for bn, bk, warps, stages in ((64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3),
                                      (128, 128, 8, 3), (256, 64, 8, 3), (128, 32, 4, 4),
                                      (256, 128, 8, 2)):  # fmt: skip
            for sk in splits:
                if _useful_split(triton.cdiv(n, bn) * triton.cdiv(mb, bm), sk):
                    out.append(KernelConfig("gemm", bm, bn, bk, sk, warps, stages))
    return [c for c in out if _valid(c, k, group)]


def default_config(m: int, n: int, k: int, group: int) -> KernelConfig:
    """Used without tuning (QCOMPILE_AUTOTUNE=0, CUDA-graph capture): a safe, decent choice."""
    mb = m_bucket(m)
    bk = min(group, 128) if group % 32 == 0 else 32
    while k % bk:
        bk //= 2
    if mb <= 4:
        sk = 4 if n <= 8192 and (k // 4) % bk == 0 else 1
        return KernelConfig("gemv", 1, 32, bk, sk, 4, 3)
    bm = 16 if mb <= 16 else 32 if mb <= 32 else 64
    return KernelConfig("gemm", bm, 64 if mb <= 64 else 128, min(bk, 64), 1, 4, 3)


# --------------------------------------------------------------------------- launcher
def launch(
    cfg: KernelConfig,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run one config: x [M, K] (any strides) -> out [M, N] in x's dtype."""
    m, k = x.shape
    n = qweight.shape[0]
    if out is None:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    split = cfg.split_k
    target = out if split == 1 else torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    bias_arg = bias if bias is not None else out  # never read when HAS_BIAS is False
    common = dict(
        GROUP=group_size, HAS_BIAS=bias is not None, WRITE_PARTIAL=split > 1,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    args = (
        x, qweight, scales, offsets, bias_arg, target, m, n, k, k // split,
        x.stride(0), x.stride(1), qweight.stride(0), n, m * n,
    )  # fmt: skip
    if cfg.kernel == "gemv":
        _w4a16_gemv_kernel[(triton.cdiv(n, cfg.block_n), split, m)](*args, **common)
    else:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
        _w4a16_gemm_kernel[grid](*args, BLOCK_M=cfg.block_m, GROUP_M=8, **common)
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
            target, bias_arg, out, m * n, n, split, HAS_BIAS=bias is not None, BLOCK=block
        )
    return out


def _bench_us(fn) -> float:
    from triton.testing import do_bench

    return 1000.0 * do_bench(fn, warmup=2, rep=10, return_mode="median")


def w4a16_linear_cuda(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """x [M, K] -> [M, N] with the tuned config of this (M bucket, N, K, group, dtype)."""
    m, k = x.shape
    n = qweight.shape[0]
    key = TuneKey(FAMILY, m_bucket(m), n, k, group_size, str(x.dtype).removeprefix("torch."))
    tuner = autotuner(x.device.index or 0)
    cfg = tuner.lookup(key)
    if cfg is None:
        cfg = tuner.get(
            key,
            candidate_configs(m, n, k, group_size),
            lambda c: _bench_us(lambda: launch(c, x, qweight, scales, offsets, bias, group_size)),
            default_config(m, n, k, group_size),
        )
    return launch(cfg, x, qweight, scales, offsets, bias, group_size)
