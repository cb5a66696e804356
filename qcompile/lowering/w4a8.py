"""W4A8 Triton kernels: QoQ int4 weights x per-token int8 (or FP8 e4m3) activations.

Layouts and math: `qcompile.quant.w4a8` (qweight [K/8, N] int32 as W4A16's, group_scales and
group_zeros [K/G, N] uint8, channel_scales [N] fp32). Kernels, top to bottom:

* `_quantize_per_token_kernel`: x [M, K] fp16/bf16 -> xq int8 / fp8 + scale [M] fp32, one
  program per row (absmax pass, then a rounding pass). Memory-bound: 3 bytes per element.
  It is the eager path's kernel; in compiled graphs the same math comes from torch ops that
  Inductor fuses into the producer of x (`passes/linear.py`).
* `_w4a8_gemm_kernel` ("gemm", any M): int8 x int8 `tl.dot` with int32 accumulation. The
  weight tile [BLOCK_K, BLOCK_N] is unpacked in natural k order and turned into int8 with
  integer ops only, w8' = q * s2 - z * s2 (QServe's subtraction after multiplication; the
  result is in -127..127 by QoQ's protective range), so the whole K loop stays integer and
  scales are applied once, in the epilogue: out = acc * x_scale[m] * s1[n] (+ bias).
  Compute-bound above M ~ 150 on an H100 (int8 tensor cores 1979 TOPS / 3.35 TB/s ~ 590
  ops per byte; a weight byte carries 2 codes, i.e. 4M ops), where int8 gives up to 2x the
  fp16 tensor-core rate. FP8 variant (constexpr FP8): (q - z) is exact in e4m3 (|q - z| <= 15),
  one fp8 dot per K tile (BLOCK_K <= G) accumulated in fp32 times s2.
* `_w4a8_gemm_planes_kernel` ("gemm_planes", M <= 64, int8 only): like W4A16's planes kernel,
  words [BLOCK_N, BLOCK_K/8] are read once and each of the 8 nibble planes is one int8 dot
  (out^T = W_i @ x_i^T), which needs xq plane-major per BLOCK_K chunk (the quantize kernel
  writes it so directly; `to_planes` permutes an already-quantized xq).
* `_w4a8_gemm_swar_kernel` ("gemm_swar", M >= 128): words read once as bytes; PTX
  turns each word into two int8 registers (even and odd k, (q - z) * s2 per byte: QServe's
  register-level parallelism, ~1.9 instructions per weight against ~9-11 in the kernels
  above), which wgmma takes from registers as W. xq even/odd per BLOCK_K chunk (`to_even_odd`;
  the quantize kernel writes it so directly). The large-M default for int8 (int8 only: an
  FP8 variant, e4m3 (q - z) by PTX into fp8 wgmma, was no faster on the H100, 126.3 against
  124.6 us at 28672x4096, M = 256, and wrong there, so it was removed).
* `_w4a8_mma_kernel` ("mma", M <= 64, int8 only): W4A16's lane kernel on int8, mma.sync
  m16n8k32 per lane through inline PTX with the SWAR-unpacked words as its A registers. The
  default at M <= 16 and a candidate up to 64.
* `_w4a8_unpack_kernel` + `torch._int_mm` ("int_mm", M >= 128 candidate, the default from
  M = 1024, int8 only): W4A16's dequantize + cuBLAS on int8. The kernel writes the int8
  weight (q - z) * s2 [N, K] once (SWAR unpacking as above, K-contiguous: cuBLASLt's fast
  int8 "TN" layout), cuBLASLt's int8 GEMM gives the int32 accumulator,
  `_w4a8_splitk_epilogue_kernel` rescales it. The unpacking
  is memory-bound (N*K/2 bytes read, N*K written: ~0.12 ms for 8192x28672 on an H100), so it
  pays where the GEMM is long: the int8 ceiling is ~1.4x cuBLAS fp16 at M = 1024.
* `_w4a8_unpack_kernel` (FP8) + `F.scaled_mm` ("fp8_mm", FP8 at M >= 32 candidate, the
  default from M = 128, G = 128 on an H100): the weight unpacked to e4m3 (q - z) once per
  call, then cuBLASLt's 1x128 block-scaled FP8 GEMM with s2 * s1 as the weight's block
  scales. Both unpacking paths hold an [N, K] byte weight per call (the caching allocator's
  memory, freed after the GEMM).
* W4A16's `_w4a16_mma_kernel` in its W4A8 mode ("mma_f16", FP8 at M <= 64, the FP8 default at
  M <= 16): the e4m3 xq as fp16 (exact) times the weight (q - z) * s2 made in
  fp16 from uint8 s2 and z (integers in -127..127: exact), x_scale * s1 in its epilogue.
* W4A16's Gluon wgmma_rs kernel in its int8 mode ("wgmma_rs", M >= 16, Hopper, up to 128 x
  rows; on the H100 1.01-1.05x W4A16 at M = 16, 1.1-1.2x at 64-256, session 38): W unpacked
  into wgmma's int8 register operand ((q - z) * s2 by SWAR byte arithmetic,
  `w4a16_wgmma._RS8_ASM`), xq's tile by TMA in even / odd order per 8 k, int32
  accumulation, x_scale * s1 in its epilogue.
* `_w4a8_gemv_kernel` ("gemv", M <= 8): CUDA cores, one program per (N tile, K split, row).
  Integer per group: sum_k (q - z) s2 x = s2 * sum_k q x - z s2 * sum_k x, so the inner loop
  is shift, and, multiply-add per weight. Memory-bound: floor =
  (N*K/2 + 2*N*K/G + 4*N + M*K + 4*M + 2*M*N) bytes / HBM bandwidth.
Every GEMM kernel takes a runtime split-K factor: partial accumulators (int32, or fp32 for
FP8) go to a workspace [SPLIT_K, M, N] summed by `_w4a8_splitk_epilogue_kernel`, which also
applies the rescale (exact integer sums: deterministic, no atomics).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from qcompile.lowering.autotune import KernelConfig, TuneKey, autotuner, m_bucket, time_us
from qcompile.lowering.w4a16 import (
    _COUNTERS,
    _WGMMA_KINDS,
    _emulated_mma_tile,
    _interpreting,
    _lane_results,
    _split4,
    _sum_partials,
    _tile_counters,
    _wgmma_device,
    _wgmma_rs_configs,
    first_rows,
    in_row_chunks,
    reserve_tile_counters,
    rows_of,
)
from qcompile.lowering.w4a16 import launch as w4a16_launch
from qcompile.lowering.w4a16 import valid_config as w4a16_valid_config
from qcompile.quant.int4 import (  # to_planes: W4A16's plane-major layout
    from_even_odd,
    to_even_odd,
    to_planes,
)
from qcompile.quant.w4a8 import ABSMAX_FLOOR, ACT_QMAX, ACT_TORCH_DTYPES

FAMILY = "w4a8"

# Round-half-even of |v| < 2**22 with two fp32 adds: v + 1.5 * 2**23 lies where the fp32 spacing
# is exactly 1 (libdevice's rint is not available in the interpreter).
_ROUND_MAGIC = tl.constexpr(12582912.0)
_ABSMAX_FLOOR = tl.constexpr(ABSMAX_FLOOR)


@triton.jit
def _round_half_even(v):
    return (v + _ROUND_MAGIC) - _ROUND_MAGIC


@triton.jit
def _round_to_e4m3(v):
    """fp32 v (|v| <= 448) rounded to nearest even on the e4m3 grid, still fp32, so the cast
    to fp8 is exact (the interpreter's own fp32 -> fp8 cast does not round to even).

    Adding 1.5 * 2**(E + 20), E = |v|'s exponent (at least -6, e4m3's smallest normal), leaves
    an fp32 whose spacing is 2**(E - 3): 3 mantissa bits at E, subnormal steps 2**-9 below.
    Rounding |v| and putting v's sign bit back keeps -0 for tiny negatives, as the cast does
    (Triton's unary minus is 0 - r, which turns -0 into +0 on the GPU)."""
    bits = v.to(tl.int32, bitcast=True)
    a = tl.abs(v)
    e = tl.maximum(a.to(tl.int32, bitcast=True) >> 23, 121)  # 121: biased exponent of 2**-6
    magic = (((e + 20) << 23) | 0x400000).to(tl.float32, bitcast=True)
    r = ((a + magic) - magic).to(tl.int32, bitcast=True)
    return (r | (bits & -0x80000000)).to(tl.float32, bitcast=True)


# --------------------------------------------------------------------------- activations
@triton.jit
def _store_codes(
    v, k, live, xq_row, QMAX: tl.constexpr, FP8: tl.constexpr, PLANES_BK: tl.constexpr,
    EVEN_ODD_BK: tl.constexpr,
):  # fmt: skip
    """Round v = x * (QMAX / absmax) onto the int8 / e4m3 grid and store it at column k of
    the row (or where the planes / even-odd order puts k). e4m3 values go out as fp8, or
    exactly as fp16 where xq is fp16 (for "mma_f16")."""
    if FP8:
        q = _round_to_e4m3(tl.minimum(tl.maximum(v, -QMAX), QMAX)).to(xq_row.dtype.element_ty)
    else:
        q = tl.minimum(tl.maximum(_round_half_even(v), -QMAX), QMAX).to(tl.int8)
    if PLANES_BK > 0:
        k = (k // PLANES_BK) * PLANES_BK + (k % 8) * (PLANES_BK // 8) + (k % PLANES_BK) // 8
    if EVEN_ODD_BK > 0:
        k = (k // EVEN_ODD_BK) * EVEN_ODD_BK + (k % 2) * (EVEN_ODD_BK // 2) + (k % EVEN_ODD_BK) // 2
    tl.store(xq_row + k, q, mask=live)


@triton.jit
def _quantize_per_token_kernel(
    x_ptr, xq_ptr, scale_ptr, K, stride_xm, stride_xk,
    QMAX: tl.constexpr, FP8: tl.constexpr, BLOCK: tl.constexpr, PLANES_BK: tl.constexpr,
    EVEN_ODD_BK: tl.constexpr = 0, ONE_PASS: tl.constexpr = False, SLICES: tl.constexpr = 1,
    PDL: tl.constexpr = False,
):  # fmt: skip
    # PDL: the GEMM launched after this kernel with programmatic dependent launch may start
    # now (its CTAs issue their weight loads, then wait for this grid's results).
    if PDL:
        gdc_launch_dependents()
    # Row m: absmax over K, then xq = round(x * (QMAX / absmax)), scale = absmax / QMAX, the
    # same fp32 operations as `quantize_activations_per_token` (launched without FMA
    # contraction, so each product is rounded before the rounding add). PLANES_BK > 0 writes
    # each PLANES_BK chunk plane-major (column c*BK + i*BK/8 + r holds k = c*BK + 8r + i) for
    # the planes kernel; EVEN_ODD_BK > 0 writes each chunk's even k's, then its odd k's
    # (column c*BK + p*BK/2 + j holds k = c*BK + 2j + p) for the SWAR kernel. ONE_PASS
    # (BLOCK >= K) keeps the row in registers: one read of x, all loads in flight at once,
    # where the two loops' dependent round trips dominate a lone row (M = 1: ~11 us at
    # K = 28672 on the H100). SLICES > 1 (with ONE_PASS; grid (M, SLICES)): every program
    # of a row takes its absmax, but rounds and stores only its 1/SLICES of the row, so a
    # lone row's rounding is spread over SLICES SMs instead of one.
    m = tl.program_id(0)
    x_row = x_ptr + m * stride_xm
    xq_row = xq_ptr + m * K
    offs = tl.arange(0, BLOCK)
    if ONE_PASS:
        x_all = tl.load(x_row + offs * stride_xk, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.abs(x_all)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + (k0 + offs) * stride_xk, mask=k0 + offs < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    absmax = tl.maximum(tl.max(amax, axis=0), _ABSMAX_FLOOR)
    inv = tl.math.div_rn(tl.full((), QMAX, tl.float32), absmax)
    if SLICES > 1:
        k = tl.program_id(1) * (BLOCK // SLICES) + tl.arange(0, BLOCK // SLICES)
        x = tl.load(x_row + k * stride_xk, mask=k < K, other=0.0)  # (from L1 / L2)
        _store_codes(x.to(tl.float32) * inv, k, k < K, xq_row, QMAX, FP8, PLANES_BK, EVEN_ODD_BK)
        if tl.program_id(1) == 0:
            tl.store(scale_ptr + m, tl.math.div_rn(absmax, tl.full((), QMAX, tl.float32)))
    else:
        for k0 in range(0, K, BLOCK):
            k = k0 + offs
            if ONE_PASS:
                v = x_all * inv
            else:
                x = tl.load(x_row + k * stride_xk, mask=k < K, other=0.0)
                v = x.to(tl.float32) * inv
            _store_codes(v, k, k0 + offs < K, xq_row, QMAX, FP8, PLANES_BK, EVEN_ODD_BK)
        tl.store(scale_ptr + m, tl.math.div_rn(absmax, tl.full((), QMAX, tl.float32)))


# --------------------------------------------------------------------------- shared epilogue
@triton.jit
def _store_result(
    acc, rm, rn, m_mask, n_mask, xs_ptr, s1_ptr, bias_ptr, out_ptr, pid_k, stride_om,
    stride_split, HAS_BIAS: tl.constexpr, WRITE_ACC: tl.constexpr, TRANSPOSED: tl.constexpr,
):  # fmt: skip
    """acc [BLOCK_M, BLOCK_N] (or its transpose) -> out = acc * x_scale[m] * s1[n] (+ bias), or
    the raw accumulator into the split-K workspace when WRITE_ACC."""
    if TRANSPOSED:
        offs = rm[None, :] * stride_om + rn[:, None]
        mask = m_mask[None, :] & n_mask[:, None]
        xs = tl.load(xs_ptr + rm, mask=m_mask, other=0.0)[None, :]
        s1 = tl.load(s1_ptr + rn, mask=n_mask, other=0.0)[:, None]
        rn_b = rn[:, None]
    else:
        offs = rm[:, None] * stride_om + rn[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        xs = tl.load(xs_ptr + rm, mask=m_mask, other=0.0)[:, None]
        s1 = tl.load(s1_ptr + rn, mask=n_mask, other=0.0)[None, :]
        rn_b = rn[None, :]
    if WRITE_ACC:
        tl.store(out_ptr + pid_k * stride_split + offs, acc, mask=mask)
    else:
        out = acc.to(tl.float32) * xs * s1
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn_b, mask=mask, other=0).to(tl.float32)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- GEMV (M tiny)
@triton.jit
def _w4a8_gemv_kernel(
    xq_ptr, xs_ptr, qw_ptr, s2_ptr, z_ptr, s1_ptr, bias_ptr, out_ptr,
    M, N, K, k_per_split, stride_xm, stride_xk, stride_om, stride_split,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_ACC: tl.constexpr, FP8: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Tile: words [BLOCK_K/8, BLOCK_N]; nibble i of word row r is k = k0 + 8r + i, so x is read
    # at stride 8 per nibble (tiny, from L1). Per group: acc += s2 * sum q*x - z*s2 * sum x, in
    # int32 (int8: exact) or fp32 (FP8: products exact, sums rounded).
    ROWS: tl.constexpr = BLOCK_K // 8
    ACC: tl.constexpr = tl.float32 if FP8 else tl.int32
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, ROWS)
    n_mask = rn < N
    k_start = pid_k * k_per_split
    acc = tl.zeros((BLOCK_N,), dtype=ACC)
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        words = tl.load(
            qw_ptr + (k0 // 8 + rr)[:, None] * N + rn[None, :], mask=n_mask[None, :], other=0
        )
        x_tile = xq_ptr + m * stride_xm + (k0 + 8 * rr) * stride_xk
        qx = tl.zeros((ROWS, BLOCK_N), dtype=ACC)
        x_rows = tl.zeros((ROWS,), dtype=ACC)
        for i in tl.static_range(8):
            xi = tl.load(x_tile + i * stride_xk).to(ACC)
            x_rows += xi
            qx += ((words >> (4 * i)) & 0xF).to(ACC) * xi[:, None]
        if BLOCK_K <= GROUP:
            g = k0 // GROUP
            s2 = tl.load(s2_ptr + g * N + rn, mask=n_mask, other=0).to(ACC)
            z = tl.load(z_ptr + g * N + rn, mask=n_mask, other=0).to(ACC)
            acc += s2 * tl.sum(qx, axis=0) - z * s2 * tl.sum(x_rows, axis=0)
        else:  # several groups per tile: scales vary by word row
            g_rows = (k0 + 8 * rr) // GROUP
            s2 = tl.load(s2_ptr + g_rows[:, None] * N + rn[None, :], mask=n_mask[None, :], other=0)
            z = tl.load(z_ptr + g_rows[:, None] * N + rn[None, :], mask=n_mask[None, :], other=0)
            s2 = s2.to(ACC)
            acc += tl.sum(qx * s2 - z.to(ACC) * s2 * x_rows[:, None], axis=0)
    rm = m + tl.arange(0, 1)
    _store_result(
        acc[None, :], rm, rn, rm < M, n_mask, xs_ptr, s1_ptr, bias_ptr, out_ptr, pid_k,
        stride_om, stride_split, HAS_BIAS, WRITE_ACC, False,
    )  # fmt: skip


# --------------------------------------------------------------------------- GEMM (tensor cores)
@triton.jit
def _w4a8_gemm_kernel(
    xq_ptr, xs_ptr, qw_ptr, s2_ptr, z_ptr, s1_ptr, bias_ptr, out_ptr,
    M, N, K, k_per_split, stride_xm, stride_xk, stride_om, stride_split,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_ACC: tl.constexpr, FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # Weight tile [BLOCK_K, BLOCK_N] in natural k order: element (k, n) reads word k // 8 (8
    # rows share a word: one DRAM read, L1 serves the rest) and shifts by 4 * (k % 8).
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
    m_mask = rm < M
    n_mask = rn < N
    shift = (4 * (rk % 8))[:, None]
    k_start = pid_k * k_per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if FP8 else tl.int32)
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        words = tl.load(
            qw_ptr + ((k0 + rk) // 8)[:, None] * N + rn[None, :], mask=n_mask[None, :], other=0
        )
        q = (words >> shift) & 0xF
        if BLOCK_K <= GROUP:
            g = k0 // GROUP
            s2 = tl.load(s2_ptr + g * N + rn, mask=n_mask, other=0).to(tl.int32)[None, :]
            z = tl.load(z_ptr + g * N + rn, mask=n_mask, other=0).to(tl.int32)[None, :]
        else:  # several groups per tile (int8 only): scales vary by k
            g_k = ((k0 + rk) // GROUP)[:, None] * N + rn[None, :]
            s2 = tl.load(s2_ptr + g_k, mask=n_mask[None, :], other=0).to(tl.int32)
            z = tl.load(z_ptr + g_k, mask=n_mask[None, :], other=0).to(tl.int32)
        x = tl.load(
            xq_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :] * stride_xk,
            mask=m_mask[:, None], other=0.0,
        )  # fmt: skip
        if FP8:  # |q - z| <= 15 is exact in e4m3; s2 (one group per tile) scales the partial
            w = (q - z).to(tl.float32).to(tl.float8e4nv)
            acc += tl.dot(x, w) * s2.to(tl.float32)
        else:  # integer ops only: q * s2 - z * s2 is in -127..127
            w = (q * s2 - z * s2).to(tl.int8)
            acc = tl.dot(x, w, acc, out_dtype=tl.int32)  # Triton 3.6 does not infer it
    _store_result(
        acc, rm, rn, m_mask, n_mask, xs_ptr, s1_ptr, bias_ptr, out_ptr, pid_k, stride_om,
        stride_split, HAS_BIAS, WRITE_ACC, False,
    )  # fmt: skip


@triton.jit
def _w4a8_gemm_planes_kernel(
    xq_ptr, xs_ptr, qw_ptr, s2_ptr, z_ptr, s1_ptr, bias_ptr, out_ptr,
    M, N, K, k_per_split, stride_xm, stride_xk, stride_om, stride_split,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Small-M int8 path. out^T [BLOCK_N, BLOCK_M] = sum over the 8 nibble planes i of
    # W_i [BLOCK_N, BLOCK_K/8] @ x_i^T [BLOCK_K/8, BLOCK_M], plane i holding k = 8r + i: each
    # word is loaded once and unpacked by one shift + and per code. xq comes plane-major per
    # BLOCK_K chunk (column i * ROWS + r holds k = 8r + i). Needs BLOCK_K / 8 >= 32 (int8 dot).
    # M tiles vary fastest over the grid, so the programs sharing a weight tile run together.
    ROWS: tl.constexpr = BLOCK_K // 8
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, ROWS)
    m_mask = rm < M
    n_mask = rn < N
    k_start = pid_k * k_per_split
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        words = tl.load(
            qw_ptr + (k0 // 8 + rr)[None, :] * N + rn[:, None], mask=n_mask[:, None], other=0
        )  # [BLOCK_N, ROWS]
        if BLOCK_K <= GROUP:
            g = k0 // GROUP
            s2 = tl.load(s2_ptr + g * N + rn, mask=n_mask, other=0).to(tl.int32)[:, None]
            z = tl.load(z_ptr + g * N + rn, mask=n_mask, other=0).to(tl.int32)[:, None]
        else:  # scales vary by word row
            g_rows = ((k0 + 8 * rr) // GROUP)[None, :] * N + rn[:, None]
            s2 = tl.load(s2_ptr + g_rows, mask=n_mask[:, None], other=0).to(tl.int32)
            z = tl.load(z_ptr + g_rows, mask=n_mask[:, None], other=0).to(tl.int32)
        zs = z * s2
        x_base = xq_ptr + rm[None, :] * stride_xm + (k0 + rr)[:, None] * stride_xk
        for i in tl.static_range(8):
            w = (((words >> (4 * i)) & 0xF) * s2 - zs).to(tl.int8)
            xt = tl.load(x_base + i * ROWS * stride_xk, mask=m_mask[None, :], other=0.0)
            acc = tl.dot(w, xt, acc, out_dtype=tl.int32)
    _store_result(
        acc, rm, rn, m_mask, n_mask, xs_ptr, s1_ptr, bias_ptr, out_ptr, pid_k, stride_om,
        stride_split, HAS_BIAS, WRITE_ACC, True,
    )  # fmt: skip


# --------------------------------------------------------------------------- SWAR GEMM (large M)
# Per byte of a 32-bit register (QServe's register-level parallelism): the low or high nibbles
# of a word's 4 bytes times s2 (<= 15 * 16 = 240: no carry into the next byte), minus z * s2 by
# a borrow-free SWAR subtraction (as in Hacker's Delight: ((a | H) - (b & ~H)) ^ ((a ^ ~b) & H),
# H = 0x80808080). The result, (q - z) * s2 in -127..127 per byte, is the int8 MMA operand as
# it stands: 4 codes per instruction, no per-byte packing.
def _swar_lines(word: str, s2: str, zs: str, y: str, even: str, odd: str) -> list[str]:
    """PTX for one word: `even` / `odd` <- (q - z) * s2 of its even / odd nibbles, 4 int8 per
    register. s2 plain, zs = z * s2 in each byte, y = zs & 0x7F7F7F7F; uses registers a, t, u."""
    lines = []
    for shift, dst in ((0, even), (4, odd)):
        src = word
        if shift:
            lines.append(f"shr.u32 a, {word}, 4;")
            src = "a"
        lines += [
            f"and.b32 a, {src}, 0x0F0F0F0F;",
            f"mul.lo.u32 a, a, {s2};",
            "or.b32 t, a, 0x80808080;",
            f"sub.u32 t, t, {y};",
            f"lop3.b32 u, a, {zs}, 0x80808080, 0x82;",  # (a ^ ~zs) & H
            f"xor.b32 {dst}, t, u;",
        ]
    return lines


# The large-M kernel's step: $2 the word, $3 / $4 s2 / zs with one value in each byte.
_SWAR_UNPACK = tl.constexpr(
    "{\n"
    + "\n".join(
        [".reg .b32 s, y, a, t, u;", "and.b32 s, $3, 0xFF;", "and.b32 y, $4, 0x7F7F7F7F;"]
        + _swar_lines("$2", "s", "$4", "y", "$0", "$1")
    )
    + "\n}"
)


@triton.jit
def _swar_planes(codes, s2, zs, ASM: tl.constexpr):
    """int8 bytes [BN, BK/2] of the packed words (element 4r + b: byte b of word row r), with
    uint8 s2 and z * s2 -> the int8 weights of the even and odd k: (q - z) * s2."""
    if ASM:
        return tl.inline_asm_elementwise(
            _SWAR_UNPACK, "=r,=r,r,r,r", [codes, s2, zs], dtype=(tl.int8, tl.int8),
            is_pure=True, pack=4,
        )  # fmt: skip
    else:
        c = codes.to(tl.int32)
        s = s2.to(tl.int32)
        z = zs.to(tl.int32)
        return ((c & 0xF) * s - z).to(tl.int8), (((c >> 4) & 0xF) * s - z).to(tl.int8)


def _fp8_pair_lines(word: str, z: str) -> list[str]:
    """PTX: b16 registers h0..h3 <- the e4m3 codes of (q - z) at the word's k = (0, 4),
    (2, 6), (1, 5), (3, 7), low byte first; z in the low nibble of `z`. Declares zz, t,
    a0..a3, h0..h3."""
    return [
        ".reg .b32 zz, t, a0, a1, a2, a3;",
        ".reg .b16 h0, h1, h2, h3;",
        f"and.b32 zz, {z}, 0xF;",
        "mul.lo.u32 zz, zz, 0x00010001;",
        "or.b32 zz, zz, 0x64006400;",  # (1024 + z, 1024 + z) in fp16x2
        f"lop3.b32 a0, {word}, 0x000F000F, 0x64006400, 0xEA;",  # k = 0, 4: (w & m) | magic
        f"shr.u32 t, {word}, 8;",
        "lop3.b32 a1, t, 0x000F000F, 0x64006400, 0xEA;",  # k = 2, 6
        f"shr.u32 t, {word}, 4;",
        "lop3.b32 a2, t, 0x000F000F, 0x64006400, 0xEA;",  # k = 1, 5
        f"shr.u32 t, {word}, 12;",
        "lop3.b32 a3, t, 0x000F000F, 0x64006400, 0xEA;",  # k = 3, 7
        *(f"sub.rn.f16x2 a{i}, a{i}, zz;" for i in range(4)),  # exact: q - z
        *(f"cvt.rn.satfinite.e4m3x2.f16x2 h{i}, a{i};" for i in range(4)),  # low half: low byte
    ]


@triton.jit
def _swar_group_scales(
    s2_ptr, z_ptr, k0, rn, rc, n_mask, N, GROUP: tl.constexpr, BLOCK_K: tl.constexpr
):
    """uint8 s2 and z of the K tile at k0: [BLOCK_N] when the tile lies in one group, else
    [BLOCK_N, BLOCK_K/2] per word row (element 4r + b: word row r's group)."""
    if BLOCK_K <= GROUP:
        g = k0 // GROUP
        s2 = tl.load(s2_ptr + g * N + rn, mask=n_mask, other=0)
        z = tl.load(z_ptr + g * N + rn, mask=n_mask, other=0)
    else:
        g_rows = ((k0 + 8 * (rc // 4)) // GROUP)[None, :] * N + rn[:, None]
        s2 = tl.load(s2_ptr + g_rows, mask=n_mask[:, None], other=0)
        z = tl.load(z_ptr + g_rows, mask=n_mask[:, None], other=0)
    return s2, z


@triton.jit
def _w4a8_gemm_swar_kernel(
    xq_ptr, xs_ptr, qw_ptr, s2_ptr, z_ptr, s1_ptr, bias_ptr, out_ptr,
    M, N, K, k_per_split, stride_xm, stride_xk, stride_om, stride_split,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
    ASM: tl.constexpr,
):  # fmt: skip
    # Large-M int8 path: out^T [BLOCK_N, BLOCK_M] = W_even @ x_even^T + W_odd @ x_odd^T. The
    # words are read once, as bytes, so a thread holds whole words, 4 bytes = the 4 int8 k's
    # its MMA register needs; `_SWAR_UNPACK` turns each word into the two registers (even and
    # odd k) with ~1.9 instructions per weight, and wgmma takes W from registers. xq comes
    # even/odd per BLOCK_K chunk (column p * BLOCK_K/2 + c holds k = 2c + p): each plane's
    # activations are contiguous, staged into shared memory by cp.async.
    HALF: tl.constexpr = BLOCK_K // 2
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rc = tl.arange(0, HALF)
    m_mask = rm < M
    n_mask = rn < N
    k_start = pid_k * k_per_split
    k_end = k_start + k_per_split
    qw8 = qw_ptr.to(tl.pointer_type(tl.int8))
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    # element (n, 4r + b): byte b of word row r of column n
    c_row0 = qw8 + (rc // 4)[None, :] * (4 * N) + 4 * rn[:, None] + (rc % 4)[None, :]
    # The codes' loads feed the dots through the PTX, and Triton pipelines them through
    # shared memory (cp.async, num_stages); the group scales' tiny loads it leaves in the
    # loop, where each iteration would wait out their latency before unpacking. PREFETCH
    # loads them one iteration ahead instead. (Prefetching the codes in registers, the first
    # version, took them out of Triton's pipeline: offline SASS 16 -> 132 PRMTs, and the
    # W4A16 analogue's code prefetch was slower on the H200; this one was never timed.)
    if PREFETCH:
        s2_next, z_next = _swar_group_scales(
            s2_ptr, z_ptr, k_start, rn, rc, n_mask, N, GROUP, BLOCK_K
        )
    for k0 in range(k_start, k_end, BLOCK_K):
        codes = tl.load(c_row0 + (k0 // 8) * (4 * N), mask=n_mask[:, None])
        if PREFETCH:
            s2, z = s2_next, z_next
            # the last iteration re-reads its own scales instead of reading past the split
            k_next = tl.minimum(k0 + BLOCK_K, k_end - BLOCK_K)
            s2_next, z_next = _swar_group_scales(
                s2_ptr, z_ptr, k_next, rn, rc, n_mask, N, GROUP, BLOCK_K
            )  # fmt: skip
        else:
            s2, z = _swar_group_scales(s2_ptr, z_ptr, k0, rn, rc, n_mask, N, GROUP, BLOCK_K)
        x_base = xq_ptr + rm[None, :] * stride_xm + (k0 + rc)[:, None] * stride_xk
        zs = (z.to(tl.int32) * s2.to(tl.int32)).to(tl.uint8)
        if BLOCK_K <= GROUP:
            s2 = tl.broadcast_to(s2[:, None], (BLOCK_N, HALF))
            zs = tl.broadcast_to(zs[:, None], (BLOCK_N, HALF))
        w_even, w_odd = _swar_planes(codes, s2, zs, ASM)
        x_even = tl.load(x_base, mask=m_mask[None, :], other=0)
        x_odd = tl.load(x_base + HALF * stride_xk, mask=m_mask[None, :], other=0)
        acc = tl.dot(w_even, x_even, acc, out_dtype=tl.int32)
        acc = tl.dot(w_odd, x_odd, acc, out_dtype=tl.int32)
    _store_result(
        acc, rm, rn, m_mask, n_mask, xs_ptr, s1_ptr, bias_ptr, out_ptr, pid_k, stride_om,
        stride_split, HAS_BIAS, WRITE_ACC, True,
    )  # fmt: skip


# The unpacking kernel's step: $2 a word (8 codes along k), $3 s2, $4 z * s2 in each byte ->
# $0 / $1 the int8 weights of k = 0..3 / 4..7 in natural order (PRMT interleaves the even and
# odd registers of `_swar_lines`).
_UNPACK_WORD = tl.constexpr(
    "{\n"
    + "\n".join(
        [".reg .b32 s, y, a, t, u, e, o;", "and.b32 s, $3, 0xFF;", "and.b32 y, $4, 0x7F7F7F7F;"]
        + _swar_lines("$2", "s", "$4", "y", "e", "o")
        + ["prmt.b32 $0, e, o, 0x5140;", "prmt.b32 $1, e, o, 0x7362;"]
    )
    + "\n}"
)


@triton.jit
def _unpack_word(words, s2, zs, ASM: tl.constexpr):
    """int32 words, s2 and z * s2 (int32, broadcast to the words' shape) -> two int32 words
    holding (q - z) * s2 of k = 0..3 and 4..7, one int8 per byte, low byte first."""
    if ASM:
        return tl.inline_asm_elementwise(
            _UNPACK_WORD, "=r,=r,r,r,r", [words, s2, zs * 0x01010101], dtype=(tl.int32, tl.int32),
            is_pure=True, pack=1,
        )  # fmt: skip
    else:
        return _emulated_unpack(words, s2, zs, False)


@triton.jit
def _emulated_unpack(words, s2, zs, FP8: tl.constexpr):
    """Interpreter: the unpacking PTX's two output words, byte by byte (k = 0..3, 4..7): int8
    (q - z) * s2 from q * s2 - zs, or with FP8 (s2 = 1, zs = z) the e4m3 codes of (q - z)."""
    lo = tl.zeros_like(words)
    hi = tl.zeros_like(words)
    for i in tl.static_range(4):
        d_lo = ((words >> (4 * i)) & 0xF) * s2 - zs
        d_hi = ((words >> (4 * i + 16)) & 0xF) * s2 - zs
        if FP8:
            d_lo = d_lo.to(tl.float32).to(tl.float8e4nv).to(tl.int8, bitcast=True).to(tl.int32)
            d_hi = d_hi.to(tl.float32).to(tl.float8e4nv).to(tl.int8, bitcast=True).to(tl.int32)
        lo |= (d_lo & 0xFF) << (8 * i)
        hi |= (d_hi & 0xFF) << (8 * i)
    return lo, hi


# The FP8 unpacking kernel's step: $2 a word, $3 z -> $0 / $1 the e4m3 codes of (q - z) at
# k = 0..3 / 4..7, low byte first (`_fp8_pair_lines`' pairs, interleaved by PRMTs).
_UNPACK_WORD_FP8 = tl.constexpr(
    "{\n"
    + "\n".join(
        [".reg .b32 e, o, e2, o2;"]
        + _fp8_pair_lines("$2", "$3")
        + [
            "cvt.u32.u16 e, h0;",
            "cvt.u32.u16 e2, h1;",
            "prmt.b32 e, e, e2, 0x5410;",  # bytes k = 0, 4, 2, 6
            "cvt.u32.u16 o, h2;",
            "cvt.u32.u16 o2, h3;",
            "prmt.b32 o, o, o2, 0x5410;",  # bytes k = 1, 5, 3, 7
            "prmt.b32 $0, e, o, 0x6240;",  # k = 0, 1, 2, 3
            "prmt.b32 $1, e, o, 0x7351;",  # k = 4, 5, 6, 7
        ]
    )
    + "\n}"
)


@triton.jit
def _unpack_word_fp8(words, z, ASM: tl.constexpr):
    """int32 words and z (int32, broadcast to the words' shape) -> two int32 words holding the
    e4m3 codes of (q - z) at k = 0..3 and 4..7, low byte first."""
    if ASM:
        return tl.inline_asm_elementwise(
            _UNPACK_WORD_FP8, "=r,=r,r,r", [words, z], dtype=(tl.int32, tl.int32),
            is_pure=True, pack=1,
        )  # fmt: skip
    else:
        return _emulated_unpack(words, 1, z, True)


@triton.jit
def _w4a8_unpack_kernel(
    qw_ptr, s2_ptr, z_ptr, w8_ptr, N, K,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr,
    FP8: tl.constexpr = False,
):  # fmt: skip
    # words [BLOCK_K / 8, BLOCK_N] (N-contiguous, coalesced) -> w8 [N, K] int8, K-contiguous
    # (the "int_mm" path's weight). Memory-bound: reads N*K/2 + 2*N*K/G bytes, writes N*K.
    # FP8: e4m3 (q - z) instead, s2 left to the GEMM's block scales (`_unpack_fp8_scaled_mm`).
    ROWS: tl.constexpr = BLOCK_K // 8
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rr = tl.arange(0, ROWS)
    n_mask = rn < N
    words = tl.load(qw_ptr + (k0 // 8 + rr)[:, None] * N + rn[None, :], mask=n_mask[None, :])
    g = ((k0 + 8 * rr) // GROUP)[:, None] * N + rn[None, :]
    if FP8:
        z = tl.load(z_ptr + g, mask=n_mask[None, :], other=0).to(tl.int32)
        lo, hi = _unpack_word_fp8(words, z, ASM)
    else:
        s2 = tl.load(s2_ptr + g, mask=n_mask[None, :], other=0).to(tl.int32)
        z = tl.load(z_ptr + g, mask=n_mask[None, :], other=0).to(tl.int32)
        lo, hi = _unpack_word(words, s2, z * s2, ASM)
    w = tl.reshape(tl.permute(tl.join(lo, hi), (1, 0, 2)), (BLOCK_N, 2 * ROWS))  # (n, k / 4)
    w8_words = w8_ptr.to(tl.pointer_type(tl.int32))
    rw = k0 // 4 + tl.arange(0, 2 * ROWS)
    tl.store(w8_words + rn[:, None].to(tl.int64) * (K // 4) + rw[None, :], w, mask=n_mask[:, None])


# --------------------------------------------------------------------------- lane MMA (M <= 64)
# W4A16's lane kernel (`lowering/w4a16.py`) on int8: mma.sync m16n8k32 (s8 x s8 -> s32) with
# the weights as the A operand, issued per lane through inline PTX, the SWAR unpacking of the
# large-M kernel feeding it. Per 32 k's, lane (r, q) = (lane // 4, lane % 4) loads word row
# k/8 + q of its 4 consecutive columns (one 16-byte load); tile t's A rows r and r + 8 are
# columns n_lane + 2t and n_lane + 2t + 1. A word's even nibbles (k = 8q + 0, 2, 4, 6) become
# register a0 (a1 for row r + 8) and its odd ones a2 (a3): the mma's k order is permuted to
# fit the words, and the lane's B registers hold x at the same k's, which xq in even/odd
# order (`to_even_odd`) keeps in 4 consecutive bytes each. No per-group scale enters the loop:
# (q - z) * s2 is the exact int8 weight, so the int32 accumulator spans all of K.
def _w4a8_lane_asm(m_tiles: int) -> str:
    """PTX for one 32-k step of one 16-column tile: SWAR-unpack the lane's two words (columns
    n and n + 8) and accumulate `m_tiles` mma.sync m16n8k32. Operands: outputs $0.. (4 int32
    per B tile), then the accumulators in, w_lo, w_hi, s2_lo, s2_hi (plain), zs_lo, zs_hi
    (z * s2 in each byte), the same & 0x7F7F7F7F (the SWAR subtrahend, formed once per
    group) and 2 x registers (even, odd k) per B tile."""
    nacc = 4 * m_tiles
    w_lo, w_hi, s_lo, s_hi, z_lo, z_hi, y_lo, y_hi = (f"${2 * nacc + i}" for i in range(8))
    x0 = 2 * nacc + 8
    lines = [".reg .b32 a, t, u, e0, o0, e1, o1;"]
    lines += _swar_lines(w_lo, s_lo, z_lo, y_lo, "e0", "o0")
    lines += _swar_lines(w_hi, s_hi, z_hi, y_hi, "e1", "o1")
    for mt in range(m_tiles):
        d = ", ".join(f"${4 * mt + j}" for j in range(4))
        c = ", ".join(f"${nacc + 4 * mt + j}" for j in range(4))
        xe, xo = f"${x0 + 2 * mt}", f"${x0 + 2 * mt + 1}"
        lines.append(
            f"mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {{{d}}}, {{e0, e1, o0, o1}}, "
            f"{{{xe}, {xo}}}, {{{c}}};"
        )
    return "{\n" + "\n".join(lines) + "\n}"


def _w4a8_lane_constraints(m_tiles: int) -> str:
    return ",".join(["=r"] * 4 * m_tiles + ["r"] * (4 * m_tiles + 8 + 2 * m_tiles))


_W4A8_LANE_1 = tl.constexpr(_w4a8_lane_asm(1))
_W4A8_LANE_2 = tl.constexpr(_w4a8_lane_asm(2))
_W4A8_LANE_4 = tl.constexpr(_w4a8_lane_asm(4))
_W4A8_LANE_8 = tl.constexpr(_w4a8_lane_asm(8))
_W4A8_LANE_CON_1 = tl.constexpr(_w4a8_lane_constraints(1))
_W4A8_LANE_CON_2 = tl.constexpr(_w4a8_lane_constraints(2))
_W4A8_LANE_CON_4 = tl.constexpr(_w4a8_lane_constraints(4))
_W4A8_LANE_CON_8 = tl.constexpr(_w4a8_lane_constraints(8))


@triton.jit
def _lane_int8_mma(args, M_TILES: tl.constexpr):
    """The PTX step of `_w4a8_lane_asm` for M_TILES B tiles: args are its input operands."""
    if M_TILES == 1:
        return tl.inline_asm_elementwise(
            _W4A8_LANE_1, _W4A8_LANE_CON_1, args, dtype=(tl.int32,) * 4, is_pure=True, pack=1
        )
    elif M_TILES == 2:
        return tl.inline_asm_elementwise(
            _W4A8_LANE_2, _W4A8_LANE_CON_2, args, dtype=(tl.int32,) * 8, is_pure=True, pack=1
        )
    elif M_TILES == 4:
        return tl.inline_asm_elementwise(
            _W4A8_LANE_4, _W4A8_LANE_CON_4, args, dtype=(tl.int32,) * 16, is_pure=True, pack=1
        )
    else:
        return tl.inline_asm_elementwise(
            _W4A8_LANE_8, _W4A8_LANE_CON_8, args, dtype=(tl.int32,) * 32, is_pure=True, pack=1
        )


@triton.jit
def _x_even_odd(w0, w1, ASM: tl.constexpr):
    """x in natural order, k = 8q .. 8q + 3 (w0) and 8q + 4 .. 8q + 7 (w1), 4 int8 per int32 ->
    the lane's two B registers: its even k's and its odd k's (2 PRMT)."""
    if ASM:
        return tl.inline_asm_elementwise(
            "prmt.b32 $0, $2, $3, 0x6420;\nprmt.b32 $1, $2, $3, 0x7531;", "=r,=r,r,r",
            [w0, w1], dtype=(tl.int32, tl.int32), is_pure=True, pack=1,
        )  # fmt: skip
    else:
        even = (w0 & 0xFF) | ((w0 >> 8) & 0xFF00) | ((w1 & 0xFF) << 16) | ((w1 & 0xFF0000) << 8)
        odd = ((w0 >> 8) & 0xFF) | ((w0 >> 16) & 0xFF00) | ((w1 & 0xFF00) << 8)
        odd = odd | (((w1 >> 24) & 0xFF) << 24)
        return even, odd


@triton.jit
def _lane_int8_codes(word, s2, zs):
    """Interpreter: a lane's word -> [LANES, 8] int32 weights (q - z) * s2 at k = 8q + i."""
    i = tl.arange(0, 8)[None, :]
    return ((word[:, None] >> (4 * i)) & 0xF) * s2[:, None] - zs[:, None]


@triton.jit
def _lane_int8_x(x_even, x_odd):
    """Interpreter: a lane's two x registers -> [LANES, 8] int32 x at k = 8q + i (register
    byte i // 2 of the even or odd one, sign-extended)."""
    i = tl.arange(0, 8)[None, :]
    reg = tl.where(i % 2 == 0, x_even[:, None], x_odd[:, None])
    return (reg << (24 - 8 * (i // 2))) >> 24


@triton.jit
def _emulated_int8_mma(c0, c1, c2, c3, w_top, w_bot, x, NW: tl.constexpr):
    """Interpreter: what mma.sync m16n8k32 returns to each lane, from every lane's [LANES, 8]
    weights of rows r (w_top) and r + 8 (w_bot) and x of column r: lane 4r + q holds rows
    r and r + 8, columns 2q and 2q + 1 of the 16x8 result. The lanes' k = 8q + i make the
    32 k's of a row by a reshape."""
    a_top = tl.reshape(w_top, (NW, 8, 32))
    a_bot = tl.reshape(w_bot, (NW, 8, 32))
    return _emulated_mma_tile(c0, c1, c2, c3, a_top, a_bot, tl.reshape(x, (NW, 8, 32)), NW)


@triton.jit
def _lane_int8_step(
    acc, w_lo, w_hi, s_lo, s_hi, z_lo, z_hi, y_lo, y_hi, xs, M_TILES: tl.constexpr,
    ASM: tl.constexpr, NW: tl.constexpr,
):  # fmt: skip
    """32 k's of one 16-column tile: acc[4b .. 4b + 3] += the mma of B tile b (its x
    registers xs[2b], xs[2b + 1]). s: plain s2, z: z * s2 splat into each byte, y: z & 0x7F.."""
    if ASM:
        return _lane_int8_mma(acc + (w_lo, w_hi, s_lo, s_hi, z_lo, z_hi, y_lo, y_hi) + xs, M_TILES)
    else:
        zl = z_lo & 0xFF
        zh = z_hi & 0xFF
        w_top = _lane_int8_codes(w_lo, s_lo, zl)
        w_bot = _lane_int8_codes(w_hi, s_hi, zh)
        out = ()
        for b in tl.static_range(M_TILES):
            x = _lane_int8_x(xs[2 * b], xs[2 * b + 1])
            out = out + _emulated_int8_mma(
                acc[4 * b], acc[4 * b + 1], acc[4 * b + 2], acc[4 * b + 3], w_top, w_bot, x, NW
            )
        return out


@triton.jit
def _w4a8_mma_kernel(
    xq_ptr, xs_ptr, qw_ptr, s2_ptr, z_ptr, s1_ptr, bias_ptr, out_ptr,
    M, N, K, k_per_split, stride_xm, stride_xk, stride_om, stride_split,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, M_TILES: tl.constexpr, ASM: tl.constexpr,
    X_NATURAL: tl.constexpr = False, SELF_REDUCE: tl.constexpr = False, final_ptr=None,
    cnt_ptr=None, REDUCE_UNROLL: tl.constexpr = 1, ATOMIC: tl.constexpr = False,
    PREFETCH: tl.constexpr = False, PDL: tl.constexpr = False,
):  # fmt: skip
    # Small-M int8 path (see the comment above `_w4a8_lane_asm`). Memory-bound like the GEMV:
    # floor = weight bytes / HBM bandwidth; the SWAR unpacking costs ~1.9 instructions per
    # weight against the W4A16 lane kernel's ~3. A warp owns 32 columns (2 tiles of 16), 8 *
    # M_TILES rows of x; every tensor in the loop is [LANES] = one element per thread.
    # xq: contiguous rows, even/odd per BLOCK_K chunk (as the eager path's quantize kernel
    # writes it), or with X_NATURAL in natural order (as a compiled graph's fused producer
    # writes it): then each lane reads its 8 consecutive k's and PRMTs them apart, instead of
    # the launcher permuting xq in a kernel of its own.
    LANES: tl.constexpr = BLOCK_N
    NW: tl.constexpr = LANES // 32
    HALF: tl.constexpr = BLOCK_K // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    lane = tl.arange(0, LANES)
    r = (lane % 32) // 4
    q = lane % 4
    n_lane = pid_n * BLOCK_N + (lane // 32) * 32 + 4 * r
    cols = n_lane[:, None] + tl.arange(0, 4)[None, :]  # [LANES, 4]
    col_mask = cols < N
    # Rows past M read row M - 1; their results land in rows the store masks.
    x_rows = ()
    for b in tl.static_range(M_TILES):
        row = tl.minimum(r + 8 * b, M - 1)
        x_rows = x_rows + ((xq_ptr + row * stride_xm).to(tl.pointer_type(tl.int32)),)
    z = tl.zeros((LANES,), dtype=tl.int32)
    acc0 = ()
    for _e in tl.static_range(4 * M_TILES):
        acc0 = acc0 + (z,)
    acc1 = acc0
    k_start = pid_k * k_per_split
    k_end = k_start + k_per_split
    # PREFETCH (as W4A16's lane kernel): every load of the next BLOCK_K is issued before this
    # one's MMAs, so the loads stay in flight across the loop's back edge (inline asm feeds
    # on them, which num_stages does not pipeline). Costs registers: one BLOCK_K of words and
    # x held twice.
    # PDL (launched with programmatic dependent launch after the quantize kernel, which lets
    # it start early): the first BLOCK_K's weights are loaded (with PREFETCH) before waiting
    # for the quantize grid's xq and scales; nothing of x is read before the wait.
    if PREFETCH:
        if PDL:
            w_first = _lane_int8_block_loads(
                qw_ptr, s2_ptr, z_ptr, x_rows, k_start, q, cols, col_mask, N, GROUP, BLOCK_K,
                M_TILES, X_NATURAL, 1,
            )  # fmt: skip
            if ASM:
                gdc_wait()
            x_first = _lane_int8_block_loads(
                qw_ptr, s2_ptr, z_ptr, x_rows, k_start, q, cols, col_mask, N, GROUP, BLOCK_K,
                M_TILES, X_NATURAL, 2,
            )  # fmt: skip
            nxt = (w_first[0], w_first[1], w_first[2], x_first[3])
        else:
            nxt = _lane_int8_block_loads(
                qw_ptr, s2_ptr, z_ptr, x_rows, k_start, q, cols, col_mask, N, GROUP, BLOCK_K,
                M_TILES, X_NATURAL,
            )  # fmt: skip
        for k0 in range(k_start, k_end, BLOCK_K):
            words_k, s2_k, z_k, x_k = nxt
            # the last iteration re-reads its own block instead of reading past the split
            nxt = _lane_int8_block_loads(
                qw_ptr, s2_ptr, z_ptr, x_rows, tl.minimum(k0 + BLOCK_K, k_end - BLOCK_K), q,
                cols, col_mask, N, GROUP, BLOCK_K, M_TILES, X_NATURAL,
            )  # fmt: skip
            for st in tl.static_range(BLOCK_K // 32):
                if st == 0 or BLOCK_K > GROUP:
                    sc = _lane_int8_scales(
                        s2_k[st if BLOCK_K > GROUP else 0], z_k[st if BLOCK_K > GROUP else 0]
                    )
                xs = ()
                for b in tl.static_range(M_TILES):  # (a constexpr index must be written inline)
                    lo = x_k[2 * (M_TILES * st + b)]
                    hi = x_k[2 * (M_TILES * st + b) + 1]
                    xs = xs + (_x_even_odd(lo, hi, ASM) if X_NATURAL else (lo, hi))
                acc0, acc1 = _lane_int8_words_step(
                    acc0, acc1, words_k[st], sc, xs, M_TILES, ASM, NW
                )
    else:
        if PDL and ASM:
            gdc_wait()
        for k0 in range(k_start, k_end, BLOCK_K):
            for st in tl.static_range(BLOCK_K // 32):
                kk = k0 + 32 * st
                if st == 0 or BLOCK_K > GROUP:
                    g = (kk // GROUP) * N
                    sc = _lane_int8_scales(
                        tl.load(s2_ptr + g + cols, mask=col_mask, other=0),
                        tl.load(z_ptr + g + cols, mask=col_mask, other=0),
                    )
                words = tl.load(qw_ptr + (kk // 8 + q)[:, None] * N + cols, mask=col_mask, other=0)
                # even k's of word row q: 4 bytes from the chunk's first half, odd from its second
                pos = (k0 + 16 * st) // 4 + q  # int32 units: (k0 + (kk - k0) / 2 + 4q) / 4
                xs = ()
                for b in tl.static_range(M_TILES):
                    if X_NATURAL:  # k = kk + 8q .. kk + 8q + 7: int32 words kk / 4 + 2q, + 1
                        w_x = x_rows[b] + kk // 4 + 2 * q
                        xs = xs + _x_even_odd(tl.load(w_x), tl.load(w_x + 1), ASM)
                    else:
                        xs = xs + (tl.load(x_rows[b] + pos), tl.load(x_rows[b] + pos + HALF // 4))
                acc0, acc1 = _lane_int8_words_step(acc0, acc1, words, sc, xs, M_TILES, ASM, NW)
    acc, m, n = _lane_results(acc0 + acc1, q, n_lane, M_TILES)
    mask = (m < M) & (n < N)
    offs = m * stride_om + n
    if WRITE_ACC:
        if ATOMIC:  # (with SELF_REDUCE) int32 adds into one zeroed [M, N] workspace
            tl.atomic_add(out_ptr + offs, acc, mask=mask, sem="relaxed", scope="gpu")
        else:
            tl.store(out_ptr + pid_k * stride_split + offs, acc, mask=mask)
        if SELF_REDUCE:
            # W4A16's `_finish_tile` on int32: the last split of this column tile to arrive
            # sums the partials in split order, rescales into final_ptr and re-arms its
            # counter, so split K costs one launch, not two. REDUCE_UNROLL > 1 keeps that
            # many partials' loads in flight (masked past the split count) instead of one
            # L2 round trip per split.
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if arrived == tl.num_programs(1) - 1:
                if ATOMIC:  # the sum, and the workspace zeroed again for the next call
                    total = tl.atomic_xchg(
                        out_ptr + offs, tl.zeros_like(acc), mask=mask, sem="relaxed", scope="gpu"
                    )
                else:
                    total = _sum_partials(
                        tl.zeros_like(acc), out_ptr, offs, mask, stride_split,
                        tl.num_programs(1), REDUCE_UNROLL,
                    )  # fmt: skip
                _lane_rescale_store(
                    total, m, n, mask, offs, xs_ptr, s1_ptr, bias_ptr, final_ptr, HAS_BIAS
                )
                tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")
    else:
        _lane_rescale_store(acc, m, n, mask, offs, xs_ptr, s1_ptr, bias_ptr, out_ptr, HAS_BIAS)


@triton.jit
def _lane_int8_scales(s2_raw, z_raw):
    """uint8 s2 and z rows [LANES, 4] -> per column: s2, z * s2 splat into each byte, and that
    splat & 0x7F.. (the operands `_lane_int8_step` takes), 4 columns each."""
    s2 = s2_raw.to(tl.int32)
    zs = z_raw.to(tl.int32) * s2
    s_0, s_1, s_2, s_3 = _split4(s2)
    z_0, z_1, z_2, z_3 = _split4(zs * 0x01010101)
    y_0, y_1, y_2, y_3 = _split4((zs * 0x01010101) & 0x7F7F7F7F)
    return s_0, s_1, s_2, s_3, z_0, z_1, z_2, z_3, y_0, y_1, y_2, y_3


@triton.jit
def _lane_int8_words_step(
    acc0, acc1, words, sc, xs, M_TILES: tl.constexpr, ASM: tl.constexpr, NW: tl.constexpr
):  # fmt: skip
    """32 k's of a warp's two 16-column tiles: the word row [LANES, 4] split per column, each
    tile's mma with its columns' scale operands `sc` (`_lane_int8_scales`)."""
    w_0, w_1, w_2, w_3 = _split4(words)
    s_0, s_1, s_2, s_3, z_0, z_1, z_2, z_3, y_0, y_1, y_2, y_3 = sc
    acc0 = _lane_int8_step(acc0, w_0, w_1, s_0, s_1, z_0, z_1, y_0, y_1, xs, M_TILES, ASM, NW)
    acc1 = _lane_int8_step(acc1, w_2, w_3, s_2, s_3, z_2, z_3, y_2, y_3, xs, M_TILES, ASM, NW)
    return acc0, acc1


@triton.jit
def _lane_int8_block_loads(
    qw_ptr, s2_ptr, z_ptr, x_rows, k0, q, cols, col_mask, N, GROUP: tl.constexpr,
    BLOCK_K: tl.constexpr, M_TILES: tl.constexpr, X_NATURAL: tl.constexpr,
    PART: tl.constexpr = 0,
):  # fmt: skip
    """Every load of one BLOCK_K of the int8 lane loop, raw: per 32-k step its words, the s2
    and z rows (one per step when BLOCK_K spans groups, else one) and two x words per B
    tile (step-major). PART 1: the weight loads only, 2: the x loads only (empty tuples for
    the rest)."""
    HALF: tl.constexpr = BLOCK_K // 2
    words = ()
    s2s = ()
    zs = ()
    xw = ()
    for st in tl.static_range(BLOCK_K // 32):
        kk = k0 + 32 * st
        if PART != 2:
            if st == 0 or BLOCK_K > GROUP:
                g = (kk // GROUP) * N
                s2s = s2s + (tl.load(s2_ptr + g + cols, mask=col_mask, other=0),)
                zs = zs + (tl.load(z_ptr + g + cols, mask=col_mask, other=0),)
            words = words + (
                tl.load(qw_ptr + (kk // 8 + q)[:, None] * N + cols, mask=col_mask, other=0),
            )
        if PART != 1:
            pos = (k0 + 16 * st) // 4 + q
            for b in tl.static_range(M_TILES):
                if X_NATURAL:
                    w_x = x_rows[b] + kk // 4 + 2 * q
                    xw = xw + (tl.load(w_x), tl.load(w_x + 1))
                else:
                    xw = xw + (tl.load(x_rows[b] + pos), tl.load(x_rows[b] + pos + HALF // 4))
    return words, s2s, zs, xw


@triton.jit
def _lane_rescale_store(
    acc, m, n, mask, offs, xs_ptr, s1_ptr, bias_ptr, out_ptr, HAS_BIAS: tl.constexpr
):
    """out = acc * x_scale[m] * s1[n] (+ bias) for the lane kernel's element tensors."""
    xs_m = tl.load(xs_ptr + m, mask=mask, other=0.0)
    s1_n = tl.load(s1_ptr + n, mask=mask, other=0.0)
    out = acc.to(tl.float32) * xs_m * s1_n
    if HAS_BIAS:
        out += tl.load(bias_ptr + n, mask=mask, other=0).to(tl.float32)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _w4a8_splitk_epilogue_kernel(
    ws_ptr, xs_ptr, s1_ptr, bias_ptr, out_ptr, MN, N, SPLIT_K,
    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # ws: [SPLIT_K, M, N] partial accumulators -> out [M, N], fixed summation order (int32
    # partials sum exactly).
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.load(ws_ptr + offs, mask=mask, other=0)
    for s in range(1, SPLIT_K):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0)
    out = acc.to(tl.float32) * tl.load(xs_ptr + offs // N, mask=mask, other=0.0)
    out = out * tl.load(s1_ptr + offs % N, mask=mask, other=0.0)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs % N, mask=mask, other=0).to(tl.float32)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- configs
def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


# Smallest BLOCK_K per kernel: 8-bit tl.dot needs K tiles >= 32; planes: 32 word rows per dot.
_MIN_BLOCK_K = {
    "gemv": 32, "gemm": 32, "gemm_planes": 256, "gemm_swar": 64, "mma": 32, "int_mm": 32,
    "fp8_mm": 32, "mma_f16": 32, "wgmma_rs": 64, "wgmma_rs_ws": 64,
}  # fmt: skip
# W4A8 int8 on the wgmma_rs kernel with its TMA producer warp, capped at 96 registers below
# 128 x rows as W4A16's candidates are. On the H100 (session 39, `results/session39/w4a8v/`)
# it was the fastest kernel at M = 16 and 64 on 8192x28672 (52.2 / 64.3 us against
# wgmma_rs's 53.4 / 69.5) and 4096x14336 (19.3 / 24.3 against 20.4 / 25.3) and lost on
# 28672x4096; the tuner picks per key. At 128 x rows (M >= 128, uncapped) the H200 had it
# 10% ahead of every wgmma_rs tile on 8192x28672 M = 256 (161.2 against 178.1 us,
# `results/session40/pipe/w4a8.log`) and 13% behind on 28672x4096, so it is a candidate
# there too since session 41. A switch for the probes and tests.
_WGMMA_RS_WS = True
# wgmma_rs K tiles of two groups (`w4a16._SUBTILES`, W4A16's since session 40) as W4A8
# candidates too, up to 64 x rows: the gpu tests have them exact, offline they compile with
# no spills or hazards. The tuner times them beside the one-group tiles per key; on the H200
# (session 41, `results/session41/h200/acc8/`) they won 28672x4096 M = 16 and lost 8192x28672.
_SUBTILES = True
_LANE_ROWS = (8, 16, 32, 64)  # lane MMA: 1, 2, 4 or 8 B tiles of 8 rows
_LANE_REDUCE_MAX_ROWS = 8  # the lane kernel reduces split K in its own launch up to 8 rows
# ... with 8 partials' loads in flight: M = 1 on the H100, 52.3 -> 47.4 us on 8192x28672 (split
# 16), 29.4 -> 26.2 on 28672x4096 (split 4), where 2 and 4 gained nothing
# (`results/session19/small/probe_lane_unroll.json`)
_LANE_REDUCE_UNROLL = 8


def valid_config(cfg: KernelConfig, n: int, k: int, group: int, act_dtype: str) -> bool:
    """Power-of-two tiles (Triton needs them; the interpreter does not check, so this must),
    whole tiles per split, tiles aligned to groups; FP8 needs BLOCK_K <= group (one s2 per
    tile) and has no planes, SWAR or lane kernel; cuBLASLt's int8 GEMM needs N a multiple of 8,
    its block-scaled FP8 GEMM G = 128 on an H100."""
    if cfg.kernel not in _MIN_BLOCK_K:
        return False
    if cfg.reduce and not (
        cfg.kernel == "mma" and cfg.reduce in ("atomic", "unroll8") and cfg.split_k > 1
    ):
        return False
    if cfg.kernel == "fp8_mm":  # the unpacking kernel's tiles, then cuBLASLt
        return (
            act_dtype == "float8_e4m3fn" and group == 128 and n % 16 == 0
            and k % _FP8_MM_K_MULTIPLE == 0 and cfg.split_k == 1 and _pow2(cfg.block_n)
            and _pow2(cfg.block_k) and cfg.block_k >= 32 and k % cfg.block_k == 0
            and _block_scaled_fp8()
        )  # fmt: skip
    if cfg.kernel == "int_mm":  # the unpacking kernel's tiles; no M tile, no split
        return (
            act_dtype == "int8" and n % 8 == 0 and cfg.split_k == 1 and _pow2(cfg.block_n)
            and _pow2(cfg.block_k) and cfg.block_k >= 32 and k % cfg.block_k == 0
            and (group % cfg.block_k == 0 or cfg.block_k % group == 0)
        )  # fmt: skip
    if cfg.kernel in _WGMMA_KINDS:  # W4A16's rules (one group per K tile); TMA: 16-byte rows;
        # Triton 3.6 has no s8 wgmma with N = 256 ("WGMMA type or shape is not supported")
        return (
            act_dtype == "int8" and n % 16 == 0 and 16 <= cfg.block_m <= 128
            and w4a16_valid_config(cfg, k, group)
        )  # fmt: skip
    if cfg.kernel == "mma_f16":  # W4A16's lane-kernel rules
        return (
            act_dtype == "float8_e4m3fn" and cfg.num_stages == 1
            and w4a16_valid_config(dataclasses.replace(cfg, kernel="mma"), k, group)
        )  # fmt: skip
    if cfg.kernel == "mma":  # 32 columns per warp, whole 32-k steps, one group per step
        return (
            act_dtype == "int8"
            and cfg.block_m in _LANE_ROWS and cfg.block_n == 32 * cfg.num_warps
            and _pow2(cfg.block_k) and cfg.block_k >= 32 and group % 32 == 0
            and (group % cfg.block_k == 0 or cfg.block_k % group == 0)
            and cfg.split_k >= 1 and k % cfg.split_k == 0 and (k // cfg.split_k) % cfg.block_k == 0
        )  # fmt: skip
    if not (_pow2(cfg.block_m) and _pow2(cfg.block_n) and _pow2(cfg.block_k)):
        return False
    if cfg.split_k < 1 or k % cfg.split_k or (k // cfg.split_k) % cfg.block_k:
        return False
    if cfg.block_k < _MIN_BLOCK_K[cfg.kernel] or not (
        group % cfg.block_k == 0 or cfg.block_k % group == 0
    ):
        return False
    if cfg.kernel != "gemv" and (cfg.block_m < 16 or cfg.block_n < 16):
        return False
    # SWAR at BLOCK_N = 16 with K tiles of two groups of 128 computes wrong sums on the H100
    # (Triton 3.6), right in the interpreter; BLOCK_N 32 and 64 were exact at every BLOCK_K
    # and group (`benchmarks/probe_swar_tiles.py`, session 42). Its candidates use 64 and 128.
    if cfg.kernel == "gemm_swar" and cfg.block_n < 32:
        return False
    if act_dtype != "int8":  # FP8: one group per K tile
        return cfg.kernel in ("gemv", "gemm") and group % cfg.block_k == 0
    return True


# Split K only while the grid is under ~4 waves of an H100 (132 SMs).
_SPLIT_K_PROGRAM_TARGET = 4 * 132


def _useful_split(programs: int, split: int) -> bool:
    return split == 1 or programs * split // 2 < _SPLIT_K_PROGRAM_TARGET


def candidate_configs(m: int, n: int, k: int, group: int, act_dtype: str) -> list[KernelConfig]:
    """The configs autotuning tries for one (M bucket, N, K, group, activation dtype)."""
    mb = m_bucket(m)
    out: list[KernelConfig] = []
    splits = (1, 2, 4, 8, 16) if mb <= 64 else (1, 2, 4) if mb <= 256 else (1,)
    if mb <= 8:
        for bn, bk, warps in ((128, 64, 1), (256, 64, 2), (512, 64, 4), (256, 128, 2),
                              (512, 128, 4), (1024, 64, 8), (512, 32, 4)):  # fmt: skip
            for sk in (*splits, 32):
                if _useful_split(triton.cdiv(n, bn) * mb, sk):
                    out.append(KernelConfig("gemv", 1, bn, bk, sk, warps, 1))
    # BLOCK_M = 256 amortizes the unpacking over twice the rows: by `benchmarks/sass_report.py`
    # the K loop of BM128 x BN128 issues ~1.9x longer than its int8 MMAs, BM256 ~1.4x.
    bms = (16,) if mb <= 16 else (32,) if mb <= 32 else (64,) if mb <= 64 else (64, 128)
    bms = (*bms, 256) if mb >= 256 else bms
    # int8 at M >= 256: the natural-order GEMM (0.39-0.45x cuBLAS on the H100 at M = 256 and
    # 1024) lost to both the planes (0.68x) and SWAR (0.55-0.85x) kernels, so only they are
    # tuned: ~60 configs per shape instead of ~130, each a Triton compile on first use.
    natural_gemm = act_dtype != "int8" or mb < 256
    for bm in bms if natural_gemm else ():
        for bn, bk, warps, stages in ((64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3),
                                      (128, 128, 8, 3), (256, 64, 8, 3), (128, 256, 8, 2),
                                      (256, 128, 8, 3), (64, 32, 4, 4), (128, 32, 4, 4)):  # fmt: skip
            for sk in splits:
                if _useful_split(triton.cdiv(n, bn) * triton.cdiv(mb, bm), sk):
                    out.append(KernelConfig("gemm", bm, bn, bk, sk, warps, stages))
    if mb <= 64:
        for bn, bk, warps in ((64, 256, 4), (128, 256, 4), (256, 256, 8), (128, 512, 8)):
            for sk in splits:
                if _useful_split(triton.cdiv(n, bn) * triton.cdiv(mb, bms[0]), sk):
                    out.append(KernelConfig("gemm_planes", bms[0], bn, bk, sk, warps, 2))
    if mb >= 128:  # planes at large M: W as wgmma's register A, x^T its shared B (N = BM)
        for bm in (64, 128, 256):
            for bn, bk, warps, stages in ((128, 256, 8, 2), (128, 256, 4, 3), (64, 256, 4, 3),
                                          (256, 256, 8, 2), (128, 512, 8, 2)):  # fmt: skip
                for sk in splits:
                    programs = triton.cdiv(n, bn) * triton.cdiv(mb, bm)
                    if bm <= mb and bm * bn <= 128 * 256 and _useful_split(programs, sk):
                        out.append(KernelConfig("gemm_planes", bm, bn, bk, sk, warps, stages))
    if mb >= 128 and act_dtype == "int8":
        # SWAR unpacking (4 codes per 32-bit op): on the H200 the leaders at M = 256 and 1024
        # on both acceptance shapes were BLOCK_N 64 on one warpgroup, BLOCK_M 256 (or 128),
        # BLOCK_K 128, 3 stages (`results/session16/probe_w4a8_swar.json`). The group-scale
        # prefetch won at every point timed on the H100 (`results/session18/third/`), so it is the
        # only variant tuned.
        for bm, bn, warps, stages in ((256, 64, 4, 3), (128, 64, 4, 3), (256, 64, 4, 4),
                                      (256, 128, 8, 3), (128, 128, 8, 3)):  # fmt: skip
            for sk in splits:
                programs = triton.cdiv(n, bn) * triton.cdiv(mb, bm)
                if bm <= mb and _useful_split(programs, sk):
                    out.append(KernelConfig("gemm_swar", bm, bn, 128, sk, warps, stages, 1))
    if mb >= 128 and act_dtype == "int8":
        # unpack to int8 once, then cuBLASLt: on the H100 it beat SWAR by 1.38-1.40x on
        # 8192x28672 (M = 256, 1024) and 1.09x on 28672x4096 at M = 1024, and lost there at
        # M = 256 (166.4 against 130.8 us; `results/session17/probe_w4a8_int_mm.json`)
        out += [KernelConfig("int_mm", 0, bn, bk, 1, 4, 1) for bn, bk in _UNPACK_TILES]
    if mb >= 32 and act_dtype != "int8":
        out += [KernelConfig("fp8_mm", 0, bn, bk, 1, 4, 1) for bn, bk in _UNPACK_TILES]
    if mb >= 16 and act_dtype == "int8" and _wgmma_device():
        # W4A16's tiles, up to 128 x rows (no s8 wgmma with N = 256 in Triton 3.6)
        kinds = [("wgmma_rs", 0)] + (
            [("wgmma_rs_ws", 96 if mb < 128 else 0)] if _WGMMA_RS_WS else []
        )
        out += _wgmma_rs_configs(mb, n, group, kinds, max_rows=128, two_groups=_SUBTILES)
    if mb <= 64 and act_dtype != "int8":  # W4A16's lane kernel on e4m3 values as fp16
        rows = max(8, mb)
        for warps, bk, sk in itertools.product((2, 4), (64, 128), (1, 2, 4, 8, 16)):
            if _useful_split(triton.cdiv(n, 32 * warps), sk):
                out += [
                    KernelConfig("mma_f16", rows, 32 * warps, bk, sk, warps, 1, pf)
                    for pf in ((False, True) if rows >= 32 else (False,))
                ]
    if mb <= 64 and act_dtype == "int8":  # lane MMA, 32 columns per warp
        rows = max(8, mb)
        for warps, bk, sk in itertools.product((2, 4), (64, 128), (1, 2, 4, 8, 16)):
            if _useful_split(triton.cdiv(n, 32 * warps), sk):
                # with and without the next BLOCK_K's loads issued ahead (W4A16's lane
                # kernel gained from it at 16 rows; not yet timed here)
                out += [
                    KernelConfig("mma", rows, 32 * warps, bk, sk, warps, 1, pf)
                    for pf in (False, True)
                ]
        if rows == 16:  # split K summed by atomics (see `_lane_default`), or in one launch with
            # 8 partials' loads in flight (a serial sum lost at 16 rows in the eighteenth
            # session; the unrolled one is W4A16's M = 16 winner on 8 of 14 keys)
            out += [KernelConfig("mma", 16, 128, 128, sk, 4, 1, reduce="atomic") for sk in (4, 8)]
            out += [
                KernelConfig("mma", 16, 128, bk, sk, 4, 1, pf, "unroll8")
                for bk, sk, pf in itertools.product((64, 128), (4, 8, 16), (False, True))
            ]
    return [c for c in out if valid_config(c, n, k, group, act_dtype)]


# The unpacking kernel's (BLOCK_N, BLOCK_K), 4 warps: within 4% of each other on the H100,
# (64, 256) first on all four points it won.
_UNPACK_TILES = ((64, 256), (128, 128), (128, 256), (64, 128))


def _lane_default(mb: int, n: int, k: int, group: int) -> KernelConfig | None:
    """The lane-MMA kernel at M <= 16: 4 warps, BLOCK_K 128, K split until ~1024 programs (the
    H100's leaders: split 16 on 8192x28672, 4 on 28672x4096); None where it does not fit.
    At 9-16 rows a split of 16 becomes 8 summed by atomics: 67.5 -> 65.3 us on 8192x28672
    (H100; atomics at split 16: 79.4, and on 28672x4096 at split 4 they lost, 41.3 -> 53.7:
    ~1-2M int32 atomics cost more than the epilogue launch saves;
    `results/session19/atomic/probe_lane_atomic.json`)."""
    programs = triton.cdiv(n, 128)
    for bk in (128, 64, 32):
        for split in (16, 8, 4, 2, 1):
            cfg = KernelConfig("mma", max(8, mb), 128, bk, split, 4, 1)
            if programs * split <= 1024 and valid_config(cfg, n, k, group, "int8"):
                if split == 16 and cfg.block_m == 16:
                    return KernelConfig("mma", 16, 128, bk, 8, 4, 1, reduce="atomic")
                return cfg
    return None


def default_config(m: int, n: int, k: int, group: int, act_dtype: str) -> KernelConfig:
    """Used without tuning (QCOMPILE_AUTOTUNE=0, CUDA-graph capture): valid for every shape
    the pass lets through (K a multiple of 32 and of the group)."""
    mb = m_bucket(m)
    bk = next(b for b in (128, 64, 32) if k % b == 0 and group % b == 0)
    if mb <= 16 and act_dtype != "int8":
        # W4A16's lane kernel on e4m3 values as fp16 ("mma_f16"), split as the int8 lane
        # default (its split 16 at 16 rows halved, with no atomic sum). H100 probe, 8192x28672
        # at M = 1 / 16: 56.3 / 71.6 us (split 16 / 8; split 8 / 16: 76.5 / 88.8); 28672x4096:
        # 33.4 / 52.1 (split 4); the FP8 GEMV / GEMM took 192.5 / 249.5 and 146.8 / 98.6
        # (`results/session21/lane/probe_lane_f16.log`, `session19/verify/`; the whole op:
        # `session21/kernels/w4a8.md`)
        lane = _lane_default(mb, n, k, group)
        if lane is not None:
            lane = dataclasses.replace(lane, kernel="mma_f16", reduce="")
            if valid_config(lane, n, k, group, act_dtype):
                return lane
    if mb <= 16 and act_dtype == "int8":
        # the lane kernel: 58.0 / 68.0 us at M = 1 / 16 on 8192x28672 (H100), where the GEMV
        # and GEMM took 72.3 / 131.1 (whole op, fourth session); 33.6 / 41.7 on 28672x4096
        lane = _lane_default(mb, n, k, group)
        if lane is not None:
            return lane
    if mb >= 1024 and act_dtype == "int8":
        unpack = KernelConfig("int_mm", 0, 64, 256 if k % 256 == 0 else 128, 1, 4, 1)
        if valid_config(unpack, n, k, group, act_dtype):
            return unpack
    if mb >= 128 and act_dtype != "int8":
        # e4m3 unpacking + cuBLASLt's block-scaled FP8 GEMM: 269 / 641 us on 8192x28672 at
        # M = 256 / 1024 and 148 / 332 on 28672x4096 (H100), where the natural-order FP8 GEMM
        # took 2195 / 6618 and 941 / 3207 (`results/session19/fp8/`, `session18/final/`)
        unpack = KernelConfig("fp8_mm", 0, 128, 128, 1, 4, 1)
        if valid_config(unpack, n, k, group, act_dtype):
            return unpack
    if mb <= 4:
        bk = min(bk, 64)
        sk = next(s for s in (8, 4, 2, 1) if (k // s) % bk == 0) if n <= 8192 else 1
        return KernelConfig("gemv", 1, 512, bk, sk, 4, 1)
    if mb >= 128 and act_dtype == "int8":
        # K split in two while the grid is under two programs per SM: 8192x28672 at M = 256
        # has 128 tiles, where split 2 took 267.7 us against 358.8 (H100, eighteenth session;
        # at M = 1024, 512 tiles, split 1 stays best: 857.5 against 956.9). The group scales
        # prefetched: 4-22% faster at all four acceptance points (223.7 against 274.5 us on
        # 8192x28672, M = 256; `results/session18/third/probe_swar_prefetch.json`)
        bm = 256 if mb >= 256 else 128
        split = 2 if triton.cdiv(n, 64) * triton.cdiv(mb, bm) < 2 * 132 else 1
        for sk in dict.fromkeys((split, 1)):
            swar = KernelConfig("gemm_swar", bm, 64, 128, sk, 4, 3, 1)
            if valid_config(swar, n, k, group, act_dtype):
                return swar
    bm = 16 if mb <= 16 else 32 if mb <= 32 else 64 if mb <= 64 else 128
    return KernelConfig("gemm", bm, 64 if mb <= 64 else 128, min(bk, 64), 1, 4, 3)


# --------------------------------------------------------------------------- launchers
# The quantize kernel keeps a row in registers (one pass over x) at M <= 16, K <= 32768.
_ONE_PASS_MAX_M = 16
_ONE_PASS_MAX_K = 32768
_QUANTIZE_SLICES = 8  # programs per row in one pass, from K = 4096
_SLICES_MIN_K = 4096


def quantize_per_token(
    x: torch.Tensor,
    act_dtype: str,
    planes_block_k: int = 0,
    even_odd_block_k: int = 0,
    one_pass: bool | None = None,
    slices: int | None = None,
    as_fp16: bool = False,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (any strides) -> (xq [M, K] contiguous, scale [M] fp32) with the Triton kernel;
    `planes_block_k` > 0 writes xq plane-major per chunk for the planes kernel,
    `even_odd_block_k` > 0 in `to_even_odd` order for the SWAR kernel. `one_pass` (default:
    M <= 16 and K <= 32768) holds each row in registers instead of reading it twice;
    `slices` > 1 (one pass only; default 8 there at K >= 4096) spreads a row's rounding over
    that many programs. `as_fp16` (FP8 only): the e4m3 values written as fp16, exactly, which
    is what "mma_f16" reads (no cast kernel). `pdl`: let a kernel launched next with
    programmatic dependent launch start right away (`launch(pdl=True)`)."""
    if planes_block_k and even_odd_block_k:
        raise ValueError("quantize_per_token: one xq order at a time (planes or even/odd)")
    m, k = x.shape
    if as_fp16 and act_dtype == "int8":
        raise ValueError("quantize_per_token: as_fp16 is for e4m3 activations only")
    xq_dtype = torch.float16 if as_fp16 else ACT_TORCH_DTYPES[act_dtype]
    xq = torch.empty((m, k), device=x.device, dtype=xq_dtype)
    scale = torch.empty((m,), device=x.device, dtype=torch.float32)
    if m == 0:
        return xq, scale
    if one_pass is None:
        one_pass = m <= _ONE_PASS_MAX_M and k <= _ONE_PASS_MAX_K
    if one_pass and k > _ONE_PASS_MAX_K:
        raise ValueError(f"quantize_per_token: one pass holds K <= {_ONE_PASS_MAX_K}, got K={k}")
    if slices is None:
        # H100, bit-exact, M = 1 / 16: 5.5 -> 2.2 / 5.8 -> 3.4 us at K = 28672, 2.0 -> 1.6 /
        # 2.0 -> 1.8 at K = 4096; 4 or 16 slices were within 0.4 us of 8 at every point
        # (`results/session19/small/probe_w4a8_quantize_slices.json`). Smaller K: not timed.
        slices = _QUANTIZE_SLICES if one_pass and k >= _SLICES_MIN_K else 1
    if slices > 1 and not (one_pass and _pow2(slices) and slices <= triton.next_power_of_2(k)):
        raise ValueError(
            f"quantize_per_token: slices={slices} needs one_pass and a power of two <= K"
        )
    block = triton.next_power_of_2(k) if one_pass else min(triton.next_power_of_2(k), 2048)
    warps = min(16, max(4, block // 2048)) if one_pass else 4 if block <= 1024 else 8
    _quantize_per_token_kernel[(m, slices)](
        x, xq, scale, k, x.stride(0), x.stride(1),
        QMAX=ACT_QMAX[act_dtype], FP8=act_dtype != "int8", BLOCK=block, PLANES_BK=planes_block_k,
        EVEN_ODD_BK=even_odd_block_k, ONE_PASS=one_pass, SLICES=slices,
        PDL=pdl and not _interpreting(), num_warps=warps, enable_fp_fusion=False,
    )  # fmt: skip
    return xq, scale


def launch(
    cfg: KernelConfig,
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    qweight: torch.Tensor,
    group_scales: torch.Tensor,
    group_zeros: torch.Tensor,
    channel_scales: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    accumulator: bool = False,
    xq_plane_major: bool = False,
    xq_even_odd: bool = False,
    self_reduce: bool | str | None = None,
    reduce_unroll: int = _LANE_REDUCE_UNROLL,
    pdl: bool = False,
) -> torch.Tensor:
    """Run one config: xq [M, K] int8 / fp8 (any strides), x_scale [M] -> out [M, N].

    `accumulator=True` returns the raw accumulator instead (int64 sum of the int32 partials,
    or fp32 for FP8) so tests can hold the integer part to the exact reference.
    `xq_plane_major` / `xq_even_odd`: xq was written plane-major (planes kernel) or even/odd
    (SWAR kernel) for `cfg.block_k`; otherwise the launcher permutes it (one small copy).
    The lane kernel's split K reduces in its own launch (tile counters) at 8 rows per program
    (`self_reduce` None; True: at any row count, False: never) unless no counters exist
    (first call inside a CUDA-graph capture); otherwise the split-K epilogue kernel sums the
    partials, `reduce_unroll` of their loads in flight at a time. `self_reduce="atomic"` (by
    default where the config says so, `cfg.reduce`): the splits add their int32 partials
    atomically into one zeroed workspace instead (exact and order-free: integer sums), so
    the last split reads one tile. `pdl` (int8 lane kernel only): launched with programmatic
    dependent launch, so it may start while the kernel before it (the quantize kernel, which
    then signals early) still runs; it reads nothing of xq before that kernel is done."""
    m, k = xq.shape
    n = qweight.shape[1]
    fp8 = xq.dtype != torch.int8
    if pdl and cfg.kernel != "mma":
        raise ValueError(f"launch: pdl is for the int8 lane kernel (mma), not {cfg.kernel}")
    if xq.dtype == torch.float16 and cfg.kernel != "mma_f16":
        raise ValueError(f"launch: fp16 xq (e4m3 values) is for mma_f16, not {cfg.kernel}")
    if cfg.kernel == "fp8_mm":
        if not fp8 or xq_plane_major or xq_even_odd or accumulator:
            raise ValueError(
                "launch: fp8_mm takes e4m3 activations in natural k order and has no raw "
                "accumulator (cuBLASLt applies the scales)"
            )
        res = _unpack_fp8_scaled_mm(
            xq, x_scale, qweight, group_scales, group_zeros, channel_scales, bias, group_size,
            out_dtype, cfg.block_n, cfg.block_k,
        )  # fmt: skip
        return res if out is None else out.copy_(res)
    if cfg.kernel in _WGMMA_KINDS:
        return _launch_wgmma_rs(
            cfg, xq, x_scale, qweight, group_scales, group_zeros, channel_scales, bias,
            group_size, out_dtype, out, accumulator, xq_plane_major, xq_even_odd,
        )  # fmt: skip
    if cfg.kernel == "mma_f16":
        if not fp8 or xq_plane_major or xq_even_odd or accumulator:
            raise ValueError(
                "launch: mma_f16 takes e4m3 activations in natural k order and returns no raw "
                "accumulator (it rescales in its epilogue)"
            )
        if out is None:
            out = torch.empty((m, n), device=xq.device, dtype=out_dtype)
        lane = dataclasses.replace(cfg, kernel="mma")
        scales = (x_scale.float().contiguous(), channel_scales)
        return w4a16_launch(
            lane, xq.to(torch.float16), qweight, group_scales, group_zeros, bias, group_size,
            out=out, w4a8=scales,
        )  # fmt: skip
    if out is None:
        out = torch.empty((m, n), device=xq.device, dtype=out_dtype)
    elif not out.is_contiguous():  # the split-K epilogue writes out as flat [M * N] memory
        raise ValueError("launch: out must be contiguous")
    if cfg.kernel == "int_mm":
        if fp8 or xq_plane_major or xq_even_odd:
            raise ValueError("launch: the int_mm path takes int8 activations in natural k order")
        acc = _unpack_int_mm(cfg, xq, qweight, group_scales, group_zeros, group_size)
        if accumulator:
            return acc.to(torch.int64)
        _rescale(acc, x_scale, channel_scales, bias, out, split=1)
        return out
    split = cfg.split_k
    ws_dtype = torch.float32 if fp8 else torch.int32
    raw = accumulator or split > 1
    target = torch.empty((split, m, n), device=xq.device, dtype=ws_dtype) if raw else out
    bias_arg = bias if bias is not None else out  # never read when HAS_BIAS is False
    common = dict(
        GROUP=group_size, HAS_BIAS=bias is not None, WRITE_ACC=raw, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if cfg.kernel == "gemm_planes":
        if fp8:
            raise ValueError("launch: the planes kernel takes int8 activations only")
        if not xq_plane_major:
            xq = to_planes(xq, cfg.block_k)
    if cfg.kernel in ("gemm_swar", "mma"):
        if fp8:
            raise ValueError(f"launch: the {cfg.kernel} kernel takes int8 activations only")
        if xq_plane_major:
            raise ValueError(
                f"launch: the {cfg.kernel} kernel reads xq in even/odd order, not plane-major"
            )
        if not xq_even_odd and cfg.kernel == "gemm_swar":
            xq = to_even_odd(xq, cfg.block_k)  # (the lane kernel reads natural order itself)
        if cfg.kernel == "mma" and (xq.stride(1) != 1 or xq.stride(0) % 4 or xq.data_ptr() % 4):
            # its x loads are 4-byte words of a row (a view may start mid-word: copy it)
            xq = xq.clone(memory_format=torch.contiguous_format)
    elif xq_even_odd:
        raise ValueError(
            f"launch: xq in even/odd order is for the SWAR and lane kernels, not {cfg.kernel}"
        )
    args = (
        xq, x_scale, qweight, group_scales, group_zeros, channel_scales, bias_arg, target,
        m, n, k, k // split, xq.stride(0), xq.stride(1), out.stride(0), m * n,
    )  # fmt: skip
    if cfg.kernel == "gemv":
        grid = (triton.cdiv(n, cfg.block_n), split, m)
        _w4a8_gemv_kernel[grid](*args, FP8=fp8, **common)
    elif cfg.kernel == "mma":
        if m > cfg.block_m:
            raise ValueError(f"launch: lane-MMA config got M={m} rows but BLOCK_M={cfg.block_m}")
        tiles = triton.cdiv(n, cfg.block_n)
        counters = None
        # One launch pays at 8 rows (H100, M = 1: 54.4 -> 52.2 us on 8192x28672 at split 16,
        # 30.7 -> 29.6 on 28672x4096 at split 4) and loses at 16 (67.8 -> 115.9 at split 16:
        # the last split's serial sum over 16 partials of 16 x 128 int32, and 72 -> 100
        # registers; `results/session18/fourth/probe_lane_reduce.json`)
        if self_reduce is None:
            self_reduce = cfg.reduce or cfg.block_m <= _LANE_REDUCE_MAX_ROWS
        if split > 1 and self_reduce and not accumulator and tiles <= _COUNTERS:
            counters = _tile_counters(xq.device)  # None under capture before they exist
        atomic = self_reduce == "atomic" and counters is not None
        if atomic:
            args = list(args)
            args[7] = _atomic_workspace(xq.device, m * n)
            if args[7] is None:
                atomic, counters = False, None
        if m > 0:  # (with no rows it would read row M - 1 = -1)
            extra = {}
            if counters is not None:
                extra = dict(SELF_REDUCE=True, final_ptr=out, cnt_ptr=counters)
                if atomic:
                    extra["ATOMIC"] = True
                elif reduce_unroll > 1:
                    extra["REDUCE_UNROLL"] = reduce_unroll
            _w4a8_mma_kernel[(tiles, split)](
                *args,
                M_TILES=cfg.block_m // 8,
                ASM=not _interpreting(),
                X_NATURAL=not xq_even_odd,
                PREFETCH=bool(cfg.prefetch),
                PDL=pdl,
                **({"launch_pdl": True} if pdl and not _interpreting() else {}),
                **extra,
                **common,
            )
        if counters is not None:
            return out
    elif cfg.kernel == "gemm_swar":
        grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
        _w4a8_gemm_swar_kernel[grid](
            *args, BLOCK_M=cfg.block_m, PREFETCH=bool(cfg.prefetch), ASM=not _interpreting(),
            **common,
        )  # fmt: skip
    elif cfg.kernel == "gemm_planes":
        grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
        _w4a8_gemm_planes_kernel[grid](*args, BLOCK_M=cfg.block_m, **common)
    else:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
        _w4a8_gemm_kernel[grid](*args, FP8=fp8, BLOCK_M=cfg.block_m, GROUP_M=8, **common)
    if accumulator:
        return target.sum(dim=0)
    if split > 1:
        _rescale(target, x_scale, channel_scales, bias, out, split)
    return out


_atomic_workspaces: dict[torch.device, torch.Tensor] = {}
_outgrown_workspaces: list[torch.Tensor] = []  # never freed (see `_atomic_workspace`)


def _launch_wgmma_rs(
    cfg, xq, x_scale, qweight, group_scales, group_zeros, channel_scales, bias, group_size,
    out_dtype, out, accumulator, xq_plane_major, xq_even_odd,
) -> torch.Tensor:  # fmt: skip
    """`launch` for "wgmma_rs" (and "_ws"): xq in even / odd order per 8 k (`xq_even_odd`:
    already so); split K (or `accumulator`) through int32 partials, summed and rescaled here.
    Weights TMA cannot read in place run the lane kernel's default instead."""
    from qcompile.lowering import w4a16_wgmma

    m, k = xq.shape
    n = qweight.shape[1]
    if xq.dtype != torch.int8 or xq_plane_major:
        raise ValueError("launch: wgmma_rs takes int8 activations, natural or even / odd order")
    if out is not None and not out.is_contiguous():  # (its stores address out as [M * N])
        raise ValueError("launch: out must be contiguous")
    if not w4a16_wgmma.fits(qweight, group_scales, group_zeros):
        lane = _lane_default(m_bucket(m), n, k, group_size) or default_config(
            m, n, k, group_size, "int8"
        )
        if xq_even_odd:  # (the lane kernel reads natural order)
            xq = from_even_odd(xq, 8)
        return launch(
            lane, xq, x_scale, qweight, group_scales, group_zeros, channel_scales, bias,
            group_size, out_dtype, out=out, accumulator=accumulator,
        )  # fmt: skip
    if not xq_even_odd:
        xq = to_even_odd(xq, 8)
    if out is None:
        out = torch.empty((m, n), device=xq.device, dtype=out_dtype)
    raw = accumulator or cfg.split_k > 1
    ws = torch.empty((cfg.split_k, m, n), device=xq.device, dtype=torch.int32) if raw else None
    scales = (x_scale.float().contiguous(), channel_scales)
    w4a16_wgmma.launch(
        cfg, xq, qweight, group_scales, group_zeros, None if raw else bias, group_size, out,
        ws=ws, w4a8=scales,
    )  # fmt: skip
    if accumulator:
        return ws.to(torch.int64).sum(0)
    if raw:
        _rescale(ws, x_scale, channel_scales, bias, out, split=cfg.split_k)
    return out


def _atomic_workspace(device: torch.device, numel: int) -> torch.Tensor | None:
    """A zeroed int32 buffer of >= numel elements that the lane kernel's atomic reduction
    leaves zeroed (one per device, as `_tile_counters`); None under capture when it would
    have to grow (then split K takes the two-launch reduction)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    found = _atomic_workspaces.get(device)
    if found is None or found.numel() < numel:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        if found is not None:  # CUDA graphs captured earlier may hold its address
            _outgrown_workspaces.append(found)
        found = _atomic_workspaces[device] = torch.zeros(
            max(numel, 1 << 16), dtype=torch.int32, device=device
        )
    return found


def reserve_lane_buffers(device: torch.device, n: int) -> None:
    """Allocate the lane kernel's split-K counters and its atomic workspace (16 rows of N)
    now, while a graph is traced, outside any CUDA-graph pool (see `reserve_tile_counters`)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    reserve_tile_counters(device)
    with unset_fake_temporarily():
        _atomic_workspace(device, 16 * n)


def _rescale(acc, x_scale, channel_scales, bias, out, split: int) -> None:
    """out [M, N] = (sum of the `split` accumulators [split, M, N]) * x_scale[m] * s1[n] + bias."""
    m, n = out.shape
    block = 1024
    _w4a8_splitk_epilogue_kernel[(triton.cdiv(m * n, block),)](
        acc, x_scale, channel_scales, bias if bias is not None else out, out, m * n, n, split,
        HAS_BIAS=bias is not None, BLOCK=block,
    )  # fmt: skip


# cuBLASLt's int8 GEMM (torch._int_mm) takes M > 16 rows; fewer are padded with zero rows.
_INT_MM_MIN_ROWS = 17


def _unpacked_weight(
    qweight, group_scales, group_zeros, group_size, block_n, block_k, num_warps=4, fp8=False
) -> torch.Tensor:
    """The weight [N, K], K-contiguous, written once by `_w4a8_unpack_kernel`: int8
    (q - z) * s2, or with `fp8` e4m3 (q - z) (s2 left to the GEMM's block scales)."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    w = torch.empty((n, k), device=qweight.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    _w4a8_unpack_kernel[(triton.cdiv(n, block_n), k // block_k)](
        qweight, group_scales, group_zeros, w.view(torch.int8), n, k,
        GROUP=group_size, BLOCK_N=block_n, BLOCK_K=block_k, ASM=not _interpreting(), FP8=fp8,
        num_warps=num_warps,
    )  # fmt: skip
    return w


def _unpack_int_mm(cfg, xq, qweight, group_scales, group_zeros, group_size) -> torch.Tensor:
    """The "int_mm" path's accumulator [M, N] int32: the int8 weight [N, K] written once by
    `_w4a8_unpack_kernel`, then torch._int_mm (cuBLASLt int8 x int8 -> int32)."""
    m, k = xq.shape
    n = qweight.shape[1]
    if m == 0:
        return torch.zeros((0, n), device=xq.device, dtype=torch.int32)
    w8 = _unpacked_weight(
        qweight, group_scales, group_zeros, group_size, cfg.block_n, cfg.block_k, cfg.num_warps
    )
    rows = xq.contiguous()
    if xq.is_cuda and m < _INT_MM_MIN_ROWS:
        rows = torch.cat([rows, rows.new_zeros((_INT_MM_MIN_ROWS - m, k))])
    return torch._int_mm(rows, w8.t())[:m]


def _unpack_fp8_scaled_mm(
    xq, x_scale, qweight, group_scales, group_zeros, channel_scales, bias, group_size, out_dtype,
    block_n: int = 64, block_k: int = 128,
) -> torch.Tensor:  # fmt: skip
    """The "fp8_mm" path (e4m3 activations, G = 128, an H100): the weight unpacked once to
    e4m3 (q - z) [N, K], then `F.scaled_mm` (cuBLASLt's block-scaled FP8 GEMM) with 1x128
    block scales on both sides, x_scale[m] for x and s2 * s1 for the weight, so out = sum_g
    x_scale * s1 * s2 * sum_k x (q - z), the FP8 reference's sum (the scales multiply in
    another order: fp32 rounding apart). Rows are padded to a multiple of 16 (zeros)."""
    import torch.nn.functional as F

    m, k = xq.shape
    n = qweight.shape[1]
    if group_size != 128 or xq.dtype != torch.float8_e4m3fn:
        raise ValueError("_unpack_fp8_scaled_mm: e4m3 activations and group_size=128 only")
    if m == 0:
        return torch.empty((0, n), device=xq.device, dtype=out_dtype)
    w8 = _unpacked_weight(
        qweight, group_scales, group_zeros, group_size, block_n, block_k, fp8=True
    )
    rows = -(-m // _FP8_MM_ROWS) * _FP8_MM_ROWS
    xs = x_scale.float()
    if rows != m:
        xq = torch.cat([xq, xq.new_zeros((rows - m, k))])
        xs = torch.cat([xs, xs.new_ones((rows - m,))])
    # scales [rows, K / 128] with strides (1, rows), as cuBLASLt's 1x128 recipe wants
    scale_a = xs[None, :].expand(k // 128, rows).contiguous().t()
    scale_b = (group_scales.float() * channel_scales.float()[None, :]).contiguous().t()
    recipe = F.ScalingType.BlockWise1x128
    out = F.scaled_mm(
        xq.contiguous(), w8.t(), scale_a, recipe, scale_b, recipe, output_dtype=out_dtype
    )[:m]
    return out + bias if bias is not None else out


# cuBLASLt's 1x128 block-scaled FP8 GEMM: rows padded to 16; K a multiple of 512 (the only K
# timed; the scale tensors' K / 128 columns then come in fours)
_FP8_MM_ROWS = 16
_FP8_MM_K_MULTIPLE = 512


@functools.cache
def _block_scaled_fp8() -> bool:
    """torch has `F.scaled_mm` with the 1x128 recipe and the GPU is an sm_90 (where it was
    timed; the interpreter has no cuBLASLt)."""
    import torch.nn.functional as F

    recipes = getattr(F, "ScalingType", None)
    return (
        not _interpreting() and hasattr(F, "scaled_mm") and hasattr(recipes, "BlockWise1x128")
        and torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
    )  # fmt: skip


def tune_key(m: int, n: int, k: int, group_size: int, act_dtype: str, out_dtype) -> TuneKey:
    """Family "w4a8"; dtype names the activation and output dtypes, e.g. "int8:float16"."""
    out = str(out_dtype).removeprefix("torch.")
    return TuneKey(FAMILY, m_bucket(m), n, k, group_size, f"{act_dtype}:{out}")


def _tuned_config(m, n, k, group_size, act_dtype, out_dtype, device, bench) -> KernelConfig:
    key = tune_key(m, n, k, group_size, act_dtype, out_dtype)
    return autotuner(device.index or 0).get(
        key,
        lambda: candidate_configs(m, n, k, group_size, act_dtype),
        bench,
        lambda: default_config(m, n, k, group_size, act_dtype),
        valid=lambda c: valid_config(c, n, k, group_size, act_dtype),
    )


def w4a8_linear_quantized_act_cuda(
    xq, x_scale, qweight, group_scales, group_zeros, channel_scales, bias, group_size, out_dtype
) -> torch.Tensor:
    """xq [M, K] int8 / fp8, x_scale [M] -> [M, N] with the tuned config of this shape."""
    m, k = xq.shape
    n = qweight.shape[1]
    act_dtype = "int8" if xq.dtype == torch.int8 else "float8_e4m3fn"
    w = (qweight, group_scales, group_zeros, channel_scales, bias, group_size, out_dtype)

    def bench(c: KernelConfig) -> float:
        rows = first_rows(xq, n, c.split_k)
        return time_us(lambda: launch(c, rows_of(xq, rows), rows_of(x_scale, rows), *w))

    cfg = _tuned_config(m, n, k, group_size, act_dtype, out_dtype, xq.device, bench)
    return in_row_chunks(
        lambda rows, out: launch(cfg, rows_of(xq, rows), rows_of(x_scale, rows), *w, out=out),
        xq, n, cfg.split_k, out_dtype,
    )  # fmt: skip


def w4a8_linear_cuda(
    x, qweight, group_scales, group_zeros, channel_scales, bias, group_size, act_dtype
) -> torch.Tensor:
    """x [M, K] fp16/bf16 -> quantize per token (plane-major when the planes kernel runs) ->
    [M, N] in x's dtype."""
    m, k = x.shape
    n = qweight.shape[1]
    w = (qweight, group_scales, group_zeros, channel_scales, bias, group_size, act_dtype)
    cfg = _tuned_config(
        m, n, k, group_size, act_dtype, x.dtype, x.device,
        lambda c: time_us(
            lambda: quantize_and_launch(c, rows_of(x, first_rows(x, n, c.split_k)), *w)
        ),
    )  # fmt: skip
    return in_row_chunks(
        lambda rows, out: quantize_and_launch(cfg, rows_of(x, rows), *w, out=out),
        x, n, cfg.split_k, x.dtype,
    )  # fmt: skip


def quantize_and_launch(
    cfg, x, qweight, group_scales, group_zeros, channel_scales, bias, group_size, act_dtype,
    out=None, pdl=False,
) -> torch.Tensor:  # fmt: skip
    """The eager path for one config: the quantize kernel (writing xq in the order the planes
    or SWAR kernel reads, so it needs no extra permutation pass), then `launch`. `pdl` (the
    lane kernel; ignored for others): the GEMM starts during the quantize kernel and loads
    its first weights before waiting for xq (written, not yet timed: off by default)."""
    pdl = pdl and cfg.kernel == "mma"
    planes = cfg.block_k if cfg.kernel == "gemm_planes" else 0
    swar = cfg.kernel in ("gemm_swar", "mma")  # (even / odd per 8 k for wgmma_rs)
    even_odd = cfg.block_k if swar else 8 if cfg.kernel in _WGMMA_KINDS else 0
    xq, scale = quantize_per_token(
        x, act_dtype, planes, even_odd, as_fp16=cfg.kernel == "mma_f16", pdl=pdl
    )
    w = (qweight, group_scales, group_zeros, channel_scales, bias, group_size, x.dtype)
    return launch(
        cfg, xq, scale, *w, out=out, xq_plane_major=planes > 0, xq_even_odd=even_odd > 0,
        pdl=pdl,
    )  # fmt: skip
