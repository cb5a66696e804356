"""W4A16 Triton kernels: int4 group-wise weights x fp16/bf16 activations.

Weight layout: see `qcompile.quant.int4` (qweight [K/8, N] int32, scales/offsets [K/G, N]).
Strategies, picked per (M bucket, N, K, group, dtype) by autotuning:

* `_w4a16_gemv_kernel` (M = 1..4): CUDA-core FMAs, one program per (N tile, K split, row).
  Memory-bound: floor = (N*K/2 + 2*2*N*K/G + 2*(M*K + M*N)) bytes / HBM bandwidth. At that
  rate an H100 SM must retire ~23 weights per clock, so the issue rate caps a naive int4 GEMV
  first: the inner loop is ~3 instructions per weight (and|or, fsub, fma; one shift per 4
  codes), 4.5 in all by `benchmarks/sass_report.py`, against a budget of ~5.5.
* `_w4a16_gemm_kernel` (any M; "gemm" and "gemm_swap"): tensor-core `tl.dot` on
  [BLOCK_N, BLOCK_K] weight tiles dequantized in registers. Memory-bound up to M ~ 64-128,
  then bound by the dot plus the dequantization, paid once per (weight element, M tile).
* `_w4a16_gemm_planes_kernel` (M <= 32): tensor cores, one `tl.dot` per nibble plane, so
  unpacking costs what it costs in the GEMV (~5.7-6 instructions per weight vs ~9 for the
  natural-order GEMM at BLOCK_M = 16, by `benchmarks/sass_report.py`).
* "wgmma_rs" / "wgmma_rs_ws" (M >= 16, Hopper only): the Gluon GEMM of `w4a16_wgmma.py`,
  out^T = W x^T with each weight tile unpacked straight into wgmma's register operand while
  the previous tile's wgmma runs; TMA ring (issued by a producer warp in "_ws").
* "dequant_mm" (large M): `_dequantize_kernel` writes the fp16/bf16 weight once, then cuBLAS.
  Costs a transient [K, N] buffer; wins only where dequantizing in the GEMM loop costs more.
GEMV and GEMM take a runtime split-K factor (no recompile per split); partial sums go to an
fp32 workspace [SPLIT_K, M, N], summed in split order (deterministic) by the last program of
each output tile to finish (`_finish_tile`: one launch), or by `_splitk_reduce_kernel` where
no tile counters exist (first use under CUDA-graph capture).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from qcompile.lowering.autotune import KernelConfig, TuneKey, autotuner, m_bucket, time_us
from qcompile.quant.int4 import PLANE_CHUNK, from_planes, to_planes

FAMILY = "w4a16"

# Exact int -> float of a nibble without a conversion instruction (conversions issue at a
# fraction of the FMA rate on sm_90): OR the code into the mantissa of 2**23, subtract 2**23.
_MAGIC_BITS = tl.constexpr(0x4B000000)
_MAGIC = tl.constexpr(8388608.0)


@triton.jit
def _codes(words, shift):
    """int32 words -> float32 codes 0..15 of the nibble at bit `shift`."""
    return (((words >> shift) & 0xF) | _MAGIC_BITS).to(tl.float32, bitcast=True) - _MAGIC


@triton.jit
def _codes_in_place(words, mask):
    """The nibble selected by `mask` (0xF << 4j, j <= 3) as the float code * 16**j: one LOP3.

    (w & 0xF << 4j) | bits(2**23) is the float 2**23 + code * 16**j exactly while the nibble
    sits below the mantissa's top (bits 0..15); the caller folds 16**-j into x. `mask` comes
    from a runtime argument: as a literal, ptxas re-materializes it before every LOP3 (which
    takes one immediate, spent on 2**23), one extra MOV per weight.
    """
    return ((words & mask) | _MAGIC_BITS).to(tl.float32, bitcast=True) - _MAGIC


_CHUNK = tl.constexpr(PLANE_CHUNK)


@triton.jit
def _x_pos(k, X_PLANES: tl.constexpr):
    """Where activation k sits in x's row: k itself, or with X_PLANES (x from `to_planes`)
    chunk start + (k % 8) * CHUNK / 8 + (k % CHUNK) / 8. Literals: k may be a Python int
    (the interpreter's loop counter), which does not combine with a constexpr."""
    if X_PLANES:
        return (k // 128) * 128 + (k % 8) * 16 + (k % 128) // 8
    return k


assert PLANE_CHUNK == 128, "_x_pos spells out PLANE_CHUNK"


@triton.jit
def _sum_partials(total, ws_ptr, offs, mask, stride_split, num_splits, UNROLL: tl.constexpr):
    """total + the split-K partials ws[0 .. num_splits - 1] at offs, in split order (the
    self-reducing epilogues' sum, read from L2); UNROLL partials' loads in flight at a time,
    masked past the (runtime) split count."""
    if UNROLL == 1:
        for k in range(num_splits):
            total += tl.load(
                ws_ptr + k * stride_split + offs, mask=mask, other=0, cache_modifier=".cg"
            )
    else:
        for k0 in range(0, num_splits, UNROLL):
            for j in tl.static_range(UNROLL):
                live = mask & (offs * 0 + (k0 + j) < num_splits)  # a tensor
                total += tl.load(
                    ws_ptr + (k0 + j) * stride_split + offs, mask=live, other=0,
                    cache_modifier=".cg",
                )  # fmt: skip
    return total


@triton.jit
def _finish_tile(
    acc, out_ptr, ws_ptr, cnt_ptr, bias_ptr, out_offs, mask, bias_offs, N, pid_k, num_splits,
    stride_split, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SELF_REDUCE: tl.constexpr,
    UNROLL: tl.constexpr = 1,
):  # fmt: skip
    """Write one output tile. Unsplit: + bias, cast, store. Split K: store this program's
    fp32 partial to the workspace [SPLIT_K, M, N]; with SELF_REDUCE the last program of the
    tile to arrive (a counter per tile) sums all partials in split order (deterministic),
    writes out and re-arms the counter, so split-K costs one launch, not two. The sum reads
    the partials UNROLL at a time (masked past the split count, which stays a runtime
    value: one binary for every split), so that many loads from L2 are in flight at once.
    The GEMV unrolls 32 (its tile is a few registers per thread; on the H100 a batch-1
    Llama-3-8B step took 2.73 ms in GEMVs with a plain loop, 2.56 ms fully unrolled); the
    tensor-core kernels keep the loop, whose registers they need (at 8 their batch-16 step
    went from 4.25 to 4.74 ms)."""
    if SPLIT:
        tl.store(ws_ptr + pid_k * stride_split + out_offs, acc, mask=mask)
        if SELF_REDUCE:
            # Every thread's partial is stored before one thread's release (CUTLASS's
            # semaphore pattern); the acquiring program then reads the partials from L2.
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
            if arrived == num_splits - 1:
                total = _sum_partials(
                    tl.zeros_like(acc), ws_ptr, out_offs, mask, stride_split, num_splits, UNROLL
                )
                if HAS_BIAS:
                    total += tl.load(bias_ptr + bias_offs, mask=bias_offs < N, other=0).to(
                        tl.float32
                    )
                tl.store(out_ptr + out_offs, total.to(out_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + bias_offs, mask=bias_offs < N, other=0).to(tl.float32)
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- GEMV (M tiny)
@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, k_per_split, stride_w,
    stride_xm, stride_xk, stride_om, stride_split, nibble_mask,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SELF_REDUCE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
    X_PLANES: tl.constexpr = False,
):  # fmt: skip
    # Tile: words [BLOCK_K/8, BLOCK_N] (N-contiguous 16-byte loads). Nibble i of word row r is
    # k = k0 + 8r + i, so x is read at stride 8 per nibble (tiny, from L1) and each code meets
    # its activation without any register shuffle. Per group,
    #   sum_k (q*s + o) * x = s * sum_k q*x + o * sum_k x,
    # so scale and offset are applied once per (column, group), not per weight.
    ROWS: tl.constexpr = BLOCK_K // 8
    X_STEP: tl.constexpr = _CHUNK // 8 if X_PLANES else 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, ROWS)
    n_mask = rn < N
    k_start = pid_k * k_per_split
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_end = k_start + k_per_split
    w_row0 = qw_ptr + rr[:, None] * stride_w + rn[None, :]
    w_ptrs = w_row0 + (k_start // 8) * stride_w
    if PREFETCH:  # words of the first tile; each iteration then loads the next one up front
        words_next = tl.load(w_ptrs, mask=n_mask[None, :], other=0)
    for k0 in range(k_start, k_end, BLOCK_K):
        if PREFETCH:
            words = words_next
            # the last iteration re-reads its own tile instead of reading past the split
            k_next = tl.minimum(k0 + BLOCK_K, k_end - BLOCK_K)
            words_next = tl.load(w_row0 + (k_next // 8) * stride_w, mask=n_mask[None, :], other=0)
        else:
            words = tl.load(w_ptrs, mask=n_mask[None, :], other=0)
            w_ptrs += (BLOCK_K // 8) * stride_w
        high = words >> 16  # nibbles 4..7 moved to bits 0..15: one shift per 4 codes
        # one address per word row; code i's activation is i * X_STEP further. Plane-major,
        # a tile within one chunk has its word rows' first codes at consecutive addresses:
        # one scalar position per tile (index math per element cost the GEMV 4% on the H100)
        if X_PLANES and BLOCK_K <= _CHUNK:
            x_tile = x_row + (_x_pos(k0, True) + rr) * stride_xk
        else:
            x_tile = x_row + _x_pos(k0 + 8 * rr, X_PLANES) * stride_xk
        x0 = tl.load(x_tile).to(tl.float32)
        qx = _codes_in_place(words, nibble_mask) * x0[:, None]
        x_rows = x0
        for i in tl.static_range(1, 8):
            xi = tl.load(x_tile + i * X_STEP * stride_xk).to(tl.float32)
            x_rows += xi
            xi_scaled = xi * (1.0 / (1 << (4 * (i % 4))))  # exact: a power of two
            mask = nibble_mask << (4 * (i % 4))
            if i < 4:
                qx += _codes_in_place(words, mask) * xi_scaled[:, None]
            else:
                qx += _codes_in_place(high, mask) * xi_scaled[:, None]
        if BLOCK_K <= GROUP:
            g = k0 // GROUP
            s = tl.load(s_ptr + g * stride_w + rn, mask=n_mask, other=0).to(tl.float32)
            o = tl.load(o_ptr + g * stride_w + rn, mask=n_mask, other=0).to(tl.float32)
            acc += s * tl.sum(qx, axis=0) + o * tl.sum(x_rows, axis=0)
        else:  # several groups per tile: scales vary by word row
            g_rows = (k0 + 8 * rr) // GROUP
            s = tl.load(
                s_ptr + g_rows[:, None] * stride_w + rn[None, :], mask=n_mask[None, :], other=0
            )
            o = tl.load(
                o_ptr + g_rows[:, None] * stride_w + rn[None, :], mask=n_mask[None, :], other=0
            )
            acc += tl.sum(qx * s.to(tl.float32) + o.to(tl.float32) * x_rows[:, None], axis=0)
    _finish_tile(
        acc, out_ptr, ws_ptr, cnt_ptr + m * tl.num_programs(0) + pid_n, bias_ptr,
        m * stride_om + rn, n_mask, rn, N, pid_k, tl.num_programs(1), stride_split, HAS_BIAS,
        SPLIT, SELF_REDUCE, UNROLL=32,
    )  # fmt: skip


# --------------------------------------------------------------------------- GEMM (tensor cores)
@triton.jit
def _w4a16_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, k_per_split, stride_w,
    stride_xm, stride_xk, stride_om, stride_split,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SELF_REDUCE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SWAP_AB: tl.constexpr, X_PLANES: tl.constexpr = False,
):  # fmt: skip
    # The weight tile W [BLOCK_N, BLOCK_K] is built in natural k order: element (n, k) reads
    # word k // 8 (8 columns share a word: one DRAM read, L1 serves the rest) and shifts by
    # 4 * (k % 8), so no reshape is needed. SWAP_AB computes out^T = W @ x^T, which lets
    # wgmma take the dequantized W from registers (operand A) instead of a shared-memory
    # round trip, and lets M as small as 8 fill the instruction's N side; otherwise
    # out = x @ W^T with W^T staged in shared memory (mma.sync for BLOCK_M < 64).
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
    shift = (4 * (rk % 8))[None, :]
    dtype = x_ptr.dtype.element_ty
    k_start = pid_k * k_per_split
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        words = tl.load(
            qw_ptr + ((k0 + rk) // 8)[None, :] * stride_w + rn[:, None],
            mask=n_mask[:, None],
            other=0,
        )
        q = _codes(words, shift)
        if BLOCK_K <= GROUP:
            g = k0 // GROUP
            s = tl.load(s_ptr + g * stride_w + rn, mask=n_mask, other=0).to(tl.float32)
            o = tl.load(o_ptr + g * stride_w + rn, mask=n_mask, other=0).to(tl.float32)
            w = (q * s[:, None] + o[:, None]).to(dtype)
        else:
            g_cols = (k0 + rk) // GROUP
            s = tl.load(
                s_ptr + g_cols[None, :] * stride_w + rn[:, None], mask=n_mask[:, None], other=0
            )
            o = tl.load(
                o_ptr + g_cols[None, :] * stride_w + rn[:, None], mask=n_mask[:, None], other=0
            )
            w = (q * s.to(tl.float32) + o.to(tl.float32)).to(dtype)
        if SWAP_AB:
            xt = tl.load(
                x_ptr + rm[None, :] * stride_xm + _x_pos(k0 + rk, X_PLANES)[:, None] * stride_xk,
                mask=m_mask[None, :], other=0.0,
            )  # fmt: skip
            acc = tl.dot(w, xt, acc)
        else:
            x = tl.load(
                x_ptr + rm[:, None] * stride_xm + _x_pos(k0 + rk, X_PLANES)[None, :] * stride_xk,
                mask=m_mask[:, None], other=0.0,
            )  # fmt: skip
            acc = tl.dot(x, tl.trans(w), acc)
    if SWAP_AB:
        out_offs = rm[None, :] * stride_om + rn[:, None]
        mask = m_mask[None, :] & n_mask[:, None]
        bias_b = rn[:, None]
    else:
        out_offs = rm[:, None] * stride_om + rn[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        bias_b = rn[None, :]
    _finish_tile(
        acc, out_ptr, ws_ptr, cnt_ptr + pid, bias_ptr, out_offs, mask, bias_b, N, pid_k,
        tl.num_programs(1), stride_split, HAS_BIAS, SPLIT, SELF_REDUCE,
    )  # fmt: skip


@triton.jit
def _w4a16_gemm_planes_kernel(
    x_ptr, qw_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, k_per_split, stride_w,
    stride_xm, stride_xk, stride_om, stride_split, nibble_mask,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SELF_REDUCE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
    SWAP_AB: tl.constexpr, X_IN_REGS: tl.constexpr, X_PLANES: tl.constexpr = False,
):  # fmt: skip
    # Small-M tensor-core path. out^T [BLOCK_N, BLOCK_M] = sum over the 8 nibble planes i of
    # W_i [BLOCK_N, BLOCK_K/8] @ x_i^T [BLOCK_K/8, BLOCK_M], where plane i holds k = 8r + i:
    # each plane unpacks in place like the GEMV (one LOP3 + FADD per code, 16**-j folded into
    # the scale) and feeds wgmma from registers. x comes plane-major (`to_planes`: per
    # PLANE_CHUNK, written so by its producer when the graph pass could fuse it there, else
    # per BLOCK_K by one small copy per call in the launcher) or, with X_IN_REGS ("gemm_planes_xreg"),
    # in its own layout, split into planes in registers: no copy launch, but x passes
    # through registers instead of straight into shared memory. On the H100 neither wins every
    # shape (M=16 bf16: xreg 17.9 vs 19.7 us on 4096x4096, 68.2 vs 63.1 us on 28672x4096), so
    # both are candidates. Needs BLOCK_K / 8 >= 16 (dot K >= 16).
    # SWAP_AB=False ("gemm_planes_direct") computes out = x_i @ W_i^T instead: the dequantized
    # plane becomes the shared-memory B operand (one store, no reload into the register
    # operand layout), at the price of M >= 64 for wgmma (mma.sync below that).
    # M tiles vary fastest over the grid: at large M the programs sharing one weight tile run
    # back to back, so each weight word leaves DRAM once however many M tiles read it.
    ROWS: tl.constexpr = BLOCK_K // 8
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, ROWS)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    dtype = x_ptr.dtype.element_ty
    k_start = pid_k * k_per_split
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = k_start + k_per_split
    w_row0 = qw_ptr + rr[None, :] * stride_w + rn[:, None]  # [BLOCK_N, ROWS]
    w_ptrs = w_row0 + (k_start // 8) * stride_w
    if PREFETCH:
        words_next = tl.load(w_ptrs, mask=n_mask[:, None], other=0)
    for k0 in range(k_start, k_end, BLOCK_K):
        if PREFETCH:
            words = words_next
            # the last iteration re-reads its own tile instead of reading past the split
            k_next = tl.minimum(k0 + BLOCK_K, k_end - BLOCK_K)
            words_next = tl.load(w_row0 + (k_next // 8) * stride_w, mask=n_mask[:, None], other=0)
        else:
            words = tl.load(w_ptrs, mask=n_mask[:, None], other=0)
            w_ptrs += (BLOCK_K // 8) * stride_w
        high = words >> 16
        if BLOCK_K <= GROUP:
            g = k0 // GROUP
            s = tl.load(s_ptr + g * stride_w + rn, mask=n_mask, other=0).to(tl.float32)[:, None]
            o = tl.load(o_ptr + g * stride_w + rn, mask=n_mask, other=0).to(tl.float32)[:, None]
        else:  # scales vary by word row
            g_rows = (k0 + 8 * rr) // GROUP
            s = tl.load(
                s_ptr + g_rows[None, :] * stride_w + rn[:, None], mask=n_mask[:, None], other=0
            )
            o = tl.load(
                o_ptr + g_rows[None, :] * stride_w + rn[:, None], mask=n_mask[:, None], other=0
            )
            s = s.to(tl.float32)
            o = o.to(tl.float32)
        if X_IN_REGS:
            # One contiguous [BLOCK_M, BLOCK_K] load of x (16-byte vectors: a thread holds the
            # 8 consecutive k of a word row), split into the 8 planes in registers: plane i
            # holds k = 8r + i, i = 4 b2 + 2 b1 + b0 over the trailing (b2, b1, b0) dims.
            x = tl.load(
                x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :] * stride_xk,
                mask=m_mask[:, None], other=0.0,
            )  # fmt: skip
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, ROWS, 2, 2, 2)))
            x_0m4, x_2m4 = tl.split(x_even)
            x_1m4, x_3m4 = tl.split(x_odd)
        else:
            # x arrives plane-major: per BLOCK_K chunk from the launcher's copy, per
            # PLANE_CHUNK from its producer (X_PLANES; the same at BLOCK_K = 128). Each
            # plane's activations are then runs of contiguous k's, loaded straight into shared
            # memory; at BLOCK_K = 256 pre-permuted x is gathered by index (two runs per plane).
            X_GATHER: tl.constexpr = X_PLANES and BLOCK_K != _CHUNK
            X_PLANE_STEP: tl.constexpr = _CHUNK // 8 if X_GATHER else ROWS
            x_offs = _x_pos(k0 + 8 * rr, True) if X_GATHER else k0 + rr
            x_base = x_ptr + rm[None, :] * stride_xm + x_offs[:, None] * stride_xk
        for i in tl.static_range(8):
            mask = nibble_mask << (4 * (i % 4))
            s_i = s * (1.0 / (1 << (4 * (i % 4))))  # exact: a power of two
            if i < 4:
                w = _codes_in_place(words, mask) * s_i + o
            else:
                w = _codes_in_place(high, mask) * s_i + o
            if not X_IN_REGS:
                xt = tl.load(x_base + i * X_PLANE_STEP * stride_xk, mask=m_mask[None, :], other=0.0)
            elif i % 4 == 0:
                plane_lo, plane_hi = tl.split(x_0m4)
            elif i % 4 == 1:
                plane_lo, plane_hi = tl.split(x_1m4)
            elif i % 4 == 2:
                plane_lo, plane_hi = tl.split(x_2m4)
            else:
                plane_lo, plane_hi = tl.split(x_3m4)
            if X_IN_REGS:
                xt = tl.trans(plane_lo if i < 4 else plane_hi)  # [ROWS, BLOCK_M]
            if SWAP_AB:
                acc = tl.dot(w.to(dtype), xt, acc)
            else:
                acc = tl.dot(tl.trans(xt), tl.trans(w.to(dtype)), acc)
    if SWAP_AB:
        out_offs = rm[None, :] * stride_om + rn[:, None]
        mask = m_mask[None, :] & n_mask[:, None]
        bias_b = rn[:, None]
    else:
        out_offs = rm[:, None] * stride_om + rn[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        bias_b = rn[None, :]
    _finish_tile(
        acc, out_ptr, ws_ptr, cnt_ptr + pid_n * tl.num_programs(0) + pid_m, bias_ptr,
        out_offs, mask, bias_b, N, pid_k, tl.num_programs(2), stride_split, HAS_BIAS, SPLIT,
        SELF_REDUCE,
    )  # fmt: skip


# --------------------------------------------------------------------------- lane MMA (M <= 64)
# mma.sync m16n8k16 with the weights as the A operand, issued per lane through inline PTX, so
# each thread unpacks exactly the codes of its own A fragment (no layout conversion, no shared
# memory). A warp owns 32 or 64 output columns (two or four 16-row A tiles) and up to 64 rows
# of x (M_TILES 8-column B tiles, all fed by each unpacked A fragment). Per 32 k's, lane
# (r, q) = (lane // 4, lane % 4) loads word row k/8 + q of its columns n0 + r + 8i (i = 0..3:
# 32-byte runs per 8 lanes, whole sectors), and the k order inside the mma is permuted to fit
# the packed words: a word's nibble pairs (0,4), (1,5), (2,6), (3,7) become A registers a0, a2
# of the first mma and a0, a2 of the second, so the lane's B registers hold x at the same k's,
# k0 + 8q + {0,4}, {1,5}, {2,6}, {3,7} (any k permutation shared by A and B leaves the product
# unchanged). Accumulators and x fragments are tuples of [LANES] tensors (one register each).
_LANE_MMA_M_TILES = (1, 2, 4, 8)


def _lane_mma_asm(m_tiles: int, bf16: bool) -> str:
    """PTX for one 32-k step of one 16-column tile: unpack the lane's two words (columns
    n and n + 8) into A fragments, scale them (w = code * s + o, one fp16x2 FMA per two
    codes) and accumulate `m_tiles` mma.sync m16n8k16 pairs. Operands: outputs $0.. (4 fp32
    per B tile), then the accumulators in, w_lo, w_hi, s_lo, s_hi, o_lo, o_hi (scale and
    offset pairs splat into both halves) and 4 x pair registers per B tile."""
    t = "bf16x2" if bf16 else "f16x2"
    ty = "bf16" if bf16 else "f16"
    bias = 0x43004300 if bf16 else 0x64006400
    nacc = 4 * m_tiles
    w_lo, w_hi, s_lo, s_hi, o_lo, o_hi = (f"${2 * nacc + i}" for i in range(6))
    x0 = 2 * nacc + 6
    lines = [".reg .b32 qbias, qsh, a<4>, b<4>;", f"mov.b32 qbias, {bias};"]
    for word, s, o, frag in ((w_lo, s_lo, o_lo, "a"), (w_hi, s_hi, o_hi, "b")):
        for p in range(4):  # nibbles (p, p + 4) -> one register of two codes
            src = word
            if p:
                lines.append(f"shr.u32 qsh, {word}, {4 * p};")
                src = "qsh"
            lines.append(f"lop3.b32 {frag}{p}, {src}, 0x000F000F, qbias, 0xEA;")
            lines.append(f"sub.{t} {frag}{p}, {frag}{p}, qbias;")
            lines.append(f"fma.rn.{t} {frag}{p}, {frag}{p}, {s}, {o};")
    for mt in range(m_tiles):
        d = ", ".join(f"${4 * mt + j}" for j in range(4))
        c = ", ".join(f"${nacc + 4 * mt + j}" for j in range(4))
        xb = [f"${x0 + 4 * mt + j}" for j in range(4)]
        lines.append(
            f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {{{d}}}, {{a0, b0, a1, b1}}, "
            f"{{{xb[0]}, {xb[1]}}}, {{{c}}};"
        )
        lines.append(
            f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {{{d}}}, {{a2, b2, a3, b3}}, "
            f"{{{xb[2]}, {xb[3]}}}, {{{d}}};"
        )
    return "{\n" + "\n".join(lines) + "\n}"


def _lane_mma_constraints(m_tiles: int) -> str:
    """4 fp32 outputs and accumulators per B tile, 6 packed weight/scale/offset registers,
    4 x registers per B tile."""
    return ",".join(["=f"] * 4 * m_tiles + ["f"] * 4 * m_tiles + ["r"] * (6 + 4 * m_tiles))


# one asm string per (B tiles, dtype) and one constraint string per B tiles; the kernel picks
# by constexpr (Triton cannot index a table with one)
_LANE_MMA_F16_1 = tl.constexpr(_lane_mma_asm(1, False))
_LANE_MMA_F16_2 = tl.constexpr(_lane_mma_asm(2, False))
_LANE_MMA_F16_4 = tl.constexpr(_lane_mma_asm(4, False))
_LANE_MMA_F16_8 = tl.constexpr(_lane_mma_asm(8, False))
_LANE_MMA_BF16_1 = tl.constexpr(_lane_mma_asm(1, True))
_LANE_MMA_BF16_2 = tl.constexpr(_lane_mma_asm(2, True))
_LANE_MMA_BF16_4 = tl.constexpr(_lane_mma_asm(4, True))
_LANE_MMA_BF16_8 = tl.constexpr(_lane_mma_asm(8, True))
_LANE_MMA_CON_1 = tl.constexpr(_lane_mma_constraints(1))
_LANE_MMA_CON_2 = tl.constexpr(_lane_mma_constraints(2))
_LANE_MMA_CON_4 = tl.constexpr(_lane_mma_constraints(4))
_LANE_MMA_CON_8 = tl.constexpr(_lane_mma_constraints(8))


@triton.jit
def _pack2(lo, hi):
    """Two 16-bit floats -> one b32 register (lo in the low half), as mma operands hold them."""
    return tl.inline_asm_elementwise(
        "mov.b32 $0, {$1, $2};", "=r,h,h", [lo, hi], dtype=tl.int32, is_pure=True, pack=1
    )


@triton.jit
def _prefetch_l2(ptr):
    """Ask L2 for the line at each `ptr` (no register written, no wait): a later load of it
    then comes from L2 instead of HBM."""
    return tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptr], dtype=tl.int32,
        is_pure=False, pack=1,
    )  # fmt: skip


@triton.jit
def _pair(v, ASM: tl.constexpr):
    """A [T, 2] pair of 16-bit x values -> the lane's b32 register (ASM) or float32 values."""
    lo, hi = tl.split(v)
    if ASM:
        return _pack2(lo, hi)
    else:
        return lo.to(tl.float32), hi.to(tl.float32)


@triton.jit
def _lane_x(x_row, k, stride_xk, X_PLANES: tl.constexpr):
    """The lane's x values for 32 k's, [T, 8] at k .. k + 7 (k includes the lane's 8q).
    Natural order: one 16-byte load; plane-major (X_PLANES), the 8 values are 16 apart."""
    pos = _x_pos(k[:, None] + tl.arange(0, 8)[None, :], X_PLANES)
    return tl.load(x_row[:, None] + pos * stride_xk)


@triton.jit
def _lane_pairs(v, ASM: tl.constexpr):
    """[T, 8] x values (`_lane_x`) -> the lane's B registers: x at k + {0,4}, {1,5}, {2,6},
    {3,7}, split in registers."""
    # [T, 8] -> [T, 2 (k // 4), 2, 2 (k % 2)]: splitting the last axis, then the next, leaves
    # the pairs (k, k + 4) of one parity as the final [T, 2] halves
    even, odd = tl.split(tl.reshape(v, (v.shape[0], 2, 2, 2)))
    p0, p2 = tl.split(even)
    p1, p3 = tl.split(odd)
    return _pair(p0, ASM), _pair(p1, ASM), _pair(p2, ASM), _pair(p3, ASM)


@triton.jit
def _emulated_codes(word, p, s, o):
    """Interpreter: nibbles (p, p + 4) of each lane's word, dequantized, as a float32 pair."""
    lo = ((word >> (4 * p)) & 0xF).to(tl.float32) * s + o
    hi = ((word >> (16 + 4 * p)) & 0xF).to(tl.float32) * s + o
    return lo, hi


@triton.jit
def _interleave_k(pair_lo_k, pair_hi_k, NW: tl.constexpr):
    """[NW*32] lane pairs for k = 2q, 2q+1 and 2q+8, 2q+9 -> [NW, 8 (lane // 4), 16 (k)]."""
    first = tl.reshape(tl.join(pair_lo_k[0], pair_lo_k[1]), (NW, 8, 8))
    second = tl.reshape(tl.join(pair_hi_k[0], pair_hi_k[1]), (NW, 8, 8))
    return tl.reshape(tl.permute(tl.join(first, second), (0, 1, 3, 2)), (NW, 8, 16))


@triton.jit
def _emulated_mma(c0, c1, c2, c3, a0, a1, a2, a3, b0, b1, NW: tl.constexpr):
    """Interpreter: what mma.sync m16n8k16 (row.col, fp32 accumulate) returns to each lane,
    from the lanes' fragments (a*, b* float32 pairs): lane 4r + q holds rows r and r + 8,
    columns 2q and 2q + 1 of the 16x8 result."""
    a_top = _interleave_k(a0, a2, NW)  # rows r
    a_bot = _interleave_k(a1, a3, NW)  # rows r + 8
    b_t = _interleave_k(b0, b1, NW)  # [NW, 8 columns, 16 k]
    return _emulated_mma_tile(c0, c1, c2, c3, a_top, a_bot, b_t, NW)


@triton.jit
def _emulated_mma_tile(c0, c1, c2, c3, a_top, a_bot, b, NW: tl.constexpr):
    """Interpreter: rows r (a_top) and r + 8 (a_bot) [NW, 8, K] times the 8 columns b [NW, 8,
    K], added to each lane's accumulators as mma.sync hands them out (lane 4r + q: rows r and
    r + 8, columns 2q and 2q + 1)."""
    top = tl.sum(a_top[:, :, None, :] * b[:, None, :, :], axis=3)  # [NW, 8 rows, 8 cols]
    bot = tl.sum(a_bot[:, :, None, :] * b[:, None, :, :], axis=3)
    t_even, t_odd = tl.split(tl.reshape(top, (NW, 8, 4, 2)))
    b_even, b_odd = tl.split(tl.reshape(bot, (NW, 8, 4, 2)))
    lanes: tl.constexpr = NW * 32
    return (
        c0 + tl.reshape(t_even, (lanes,)), c1 + tl.reshape(t_odd, (lanes,)),
        c2 + tl.reshape(b_even, (lanes,)), c3 + tl.reshape(b_odd, (lanes,)),
    )  # fmt: skip


@triton.jit
def _lane_mma(args, M_TILES: tl.constexpr, BF16: tl.constexpr):
    """The PTX step of `_lane_mma_asm` for M_TILES B tiles: args are its input operands."""
    if M_TILES == 1:
        return tl.inline_asm_elementwise(
            _LANE_MMA_BF16_1 if BF16 else _LANE_MMA_F16_1, _LANE_MMA_CON_1, args,
            dtype=(tl.float32,) * 4, is_pure=True, pack=1,
        )  # fmt: skip
    elif M_TILES == 2:
        return tl.inline_asm_elementwise(
            _LANE_MMA_BF16_2 if BF16 else _LANE_MMA_F16_2, _LANE_MMA_CON_2, args,
            dtype=(tl.float32,) * 8, is_pure=True, pack=1,
        )  # fmt: skip
    elif M_TILES == 4:
        return tl.inline_asm_elementwise(
            _LANE_MMA_BF16_4 if BF16 else _LANE_MMA_F16_4, _LANE_MMA_CON_4, args,
            dtype=(tl.float32,) * 16, is_pure=True, pack=1,
        )  # fmt: skip
    else:
        return tl.inline_asm_elementwise(
            _LANE_MMA_BF16_8 if BF16 else _LANE_MMA_F16_8, _LANE_MMA_CON_8, args,
            dtype=(tl.float32,) * 32, is_pure=True, pack=1,
        )  # fmt: skip


@triton.jit
def _lane_tile_step(
    acc, w_lo, w_hi, s_lo, s_hi, o_lo, o_hi, xs,
    M_TILES: tl.constexpr, BF16: tl.constexpr, ASM: tl.constexpr, NW: tl.constexpr,
):  # fmt: skip
    """32 k's of one 16-column tile: acc[4b .. 4b + 3] += W x_b^T fragment for each B tile b
    (rows 8b .. 8b + 7 of x, whose registers are xs[4b .. 4b + 3]). s/o: the scale and offset
    of the lane's two columns."""
    if ASM:
        return _lane_mma(acc + (w_lo, w_hi, s_lo, s_hi, o_lo, o_hi) + xs, M_TILES, BF16)
    else:
        # ra: the lane's column n (A rows r), rb: column n + 8 (rows r + 8), per nibble pair
        ra0 = _emulated_codes(w_lo, 0, s_lo, o_lo)
        ra1 = _emulated_codes(w_lo, 1, s_lo, o_lo)
        ra2 = _emulated_codes(w_lo, 2, s_lo, o_lo)
        ra3 = _emulated_codes(w_lo, 3, s_lo, o_lo)
        rb0 = _emulated_codes(w_hi, 0, s_hi, o_hi)
        rb1 = _emulated_codes(w_hi, 1, s_hi, o_hi)
        rb2 = _emulated_codes(w_hi, 2, s_hi, o_hi)
        rb3 = _emulated_codes(w_hi, 3, s_hi, o_hi)
        out = ()
        for b in tl.static_range(M_TILES):
            c = _emulated_mma(
                acc[4 * b], acc[4 * b + 1], acc[4 * b + 2], acc[4 * b + 3],
                ra0, rb0, ra1, rb1, xs[4 * b], xs[4 * b + 1], NW,
            )  # fmt: skip
            c = _emulated_mma(
                c[0], c[1], c[2], c[3], ra2, rb2, ra3, rb3, xs[4 * b + 2], xs[4 * b + 3], NW
            )
            out = out + c
        return out


@triton.jit
def _split4(v):
    """[T, 4] -> its four [T] columns, in order (registers of one thread: no data movement)."""
    a, b = tl.split(tl.reshape(v, (v.shape[0], 2, 2)))
    e0, e2 = tl.split(a)
    e1, e3 = tl.split(b)
    return e0, e1, e2, e3


@triton.jit
def _split8(v):
    """[T, 8] -> its eight [T] columns, in order."""
    a, b = tl.split(tl.reshape(v, (v.shape[0], 2, 2, 2)))
    a0, a2 = tl.split(a)
    a1, a3 = tl.split(b)
    e0, e4 = tl.split(a0)
    e2, e6 = tl.split(a2)
    e1, e5 = tl.split(a1)
    e3, e7 = tl.split(a3)
    return e0, e1, e2, e3, e4, e5, e6, e7


@triton.jit
def _lane_scale(v, ASM: tl.constexpr):
    """Scales or offsets: each splat into both halves of a b32 (ASM) or as float32."""
    if ASM:
        return _pack2(v, v)
    else:
        return v.to(tl.float32)


@triton.jit
def _stack(vals):
    """A tuple of 2**j [T] tensors -> [T, 2**j], in an order the caller recovers by stacking
    index tensors the same way (only the epilogue: its layout carries no lane meaning)."""
    out = vals
    for _level in tl.static_range(8):  # up to 2**8 tensors; past log2(len) levels are no-ops
        if len(out) > 1:
            pairs = ()
            for i in tl.static_range(len(out) // 2):
                pairs = pairs + (tl.join(out[2 * i], out[2 * i + 1]),)
            out = pairs
    return tl.reshape(out[0], (vals[0].shape[0], len(vals)))


@triton.jit
def _lane_results(vals, q, n_lane, M_TILES: tl.constexpr):
    """The lane kernels' accumulators (a tuple of [LANES], tile-major) -> [LANES, E] values
    with their output row m and column n: accumulator e = 4 (M_TILES t + b) + j (tile t, B
    tile b) holds (m, n) = (8 b + 2q + j % 2, n_lane + 2t + j // 2), the mma's C fragment,
    whose rows are columns of out."""
    idx = ()
    for e_ in tl.static_range(len(vals)):
        idx = idx + (q * 0 + e_,)
    e = _stack(idx)
    j = e % 4
    m = 8 * ((e // 4) % M_TILES) + 2 * q[:, None] + j % 2
    n = n_lane[:, None] + 2 * (e // (4 * M_TILES)) + j // 2
    return _stack(vals), m, n


@triton.jit
def _lane_block_loads(
    qw_ptr, s_ptr, o_ptr, x_rows, k0, q, cols, col_mask, stride_w, stride_xk,
    GROUP: tl.constexpr, BLOCK_K: tl.constexpr, M_TILES: tl.constexpr, X_PLANES: tl.constexpr,
    W4A8: tl.constexpr = False, PART: tl.constexpr = 0,
):  # fmt: skip
    """Every load of one BLOCK_K of the lane-MMA loop, raw: per 32-k step its words
    [LANES, COLS], the scale and offset rows (one per step when BLOCK_K spans groups, else
    one) and x ([LANES, 8] per (32-k step, B tile), step-major). W4A8: s_ptr / o_ptr hold
    uint8 s2 and z, which become the fp16 scale s2 and offset -z * s2 (exact integers).
    PART 1: the weight loads only (x left empty), 2: x only, 0: both."""
    words = ()
    scales = ()
    offsets = ()
    for st in tl.static_range(BLOCK_K // 32 if PART != 2 else 0):
        kk = k0 + 32 * st
        if st == 0 or BLOCK_K > GROUP:
            g_row = (kk // GROUP) * stride_w
            sv = tl.load(s_ptr + g_row + cols, mask=col_mask, other=0)
            ov = tl.load(o_ptr + g_row + cols, mask=col_mask, other=0)
            if W4A8:
                ov = (-(ov.to(tl.int32) * sv.to(tl.int32))).to(tl.float16)
                sv = sv.to(tl.float16)
            scales = scales + (sv,)
            offsets = offsets + (ov,)
        words = words + (
            tl.load(qw_ptr + (kk // 8 + q)[:, None] * stride_w + cols, mask=col_mask, other=0),
        )
    xs = ()
    for st in tl.static_range(BLOCK_K // 32 if PART != 1 else 0):
        for b in tl.static_range(M_TILES):
            xs = xs + (_lane_x(x_rows[b], k0 + 32 * st + 8 * q, stride_xk, X_PLANES),)
    return words, scales, offsets, xs


@triton.jit
def _w4a16_mma_kernel(
    x_ptr, qw_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, k_per_split, stride_w,
    stride_xm, stride_xk, stride_om, stride_split,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SELF_REDUCE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, M_TILES: tl.constexpr, N_TILES: tl.constexpr,
    X_PLANES: tl.constexpr = False, ASM: tl.constexpr = True, PREFETCH: tl.constexpr = False,
    W4A8: tl.constexpr = False, xs_ptr=None, s1_ptr=None, REDUCE_UNROLL: tl.constexpr = 1,
    PDL: tl.constexpr = False,
):  # fmt: skip
    # W4A8 (FP8 activations, `lowering/w4a8.py`'s "mma_f16"): x is the e4m3 xq as fp16 and
    # the weight (q - z) * s2 from uint8 s2 and z (integers in -127..127, exact in fp16), so
    # every product is exact and the fp32 accumulator spans K; the epilogue multiplies by
    # x_scale[m] * s1[n]. (Hopper has no e4m3 mma.sync: ptxas would convert to f16 anyway.)
    # Floor: the GEMV's (weight bytes); ~3.0 issued instructions per weight at 16 rows
    # (`sass_report.py`), each unpacked A fragment feeding M_TILES B tiles of 8 rows. On the
    # H200 it runs at 49% of that floor at 16 rows, and without PREFETCH its time grew
    # almost linearly with the B tiles: latency-bound (its loads feed inline asm, which
    # num_stages does not pipeline), not issue- or bandwidth-bound (`docs/performance.md`).
    # A warp owns 16 * N_TILES columns: lane (r, q) the 2 * N_TILES consecutive
    # columns from n_lane (one 16- or 32-byte load per word row); tile t's A rows r and r + 8
    # are its columns n_lane + 2t and n_lane + 2t + 1. Every x value a lane loads serves all
    # its tiles, so more tiles per warp mean fewer x loads per weight. Every tensor in the
    # loop is [LANES] = one element per thread: element t is lane t % 32 of warp t // 32
    # (Triton's layout for a 1-D tensor of 32 * num_warps), which the PTX relies on.
    COLS: tl.constexpr = 2 * N_TILES
    LANES: tl.constexpr = 4 * BLOCK_N // COLS  # 4 lanes (q) share each column
    NW: tl.constexpr = LANES // 32
    BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    # M past BLOCK_M runs as row blocks: program = column block * row blocks + row block, so
    # the row blocks of one column block run together and read its weights while in L2.
    row_blocks = tl.cdiv(M, 8 * M_TILES)
    pid_n = tl.program_id(0) // row_blocks
    row0 = (tl.program_id(0) % row_blocks) * (8 * M_TILES)
    pid_k = tl.program_id(1)
    lane = tl.arange(0, LANES)
    r = (lane % 32) // 4
    q = lane % 4
    n_lane = pid_n * BLOCK_N + (lane // 32) * (16 * N_TILES) + COLS * r
    cols = n_lane[:, None] + tl.arange(0, COLS)[None, :]  # [LANES, COLS]
    col_mask = cols < N
    # Rows past M read row M - 1 instead of a masked load (which zeroes its registers first:
    # 2 extra instructions per 16-byte load); their results land in rows the store masks.
    x_rows = ()
    for b in tl.static_range(M_TILES):
        x_rows = x_rows + (x_ptr + tl.minimum(row0 + r + 8 * b, M - 1) * stride_xm,)
    z = tl.zeros((LANES,), dtype=tl.float32)
    acc0 = ()  # tile t: acc<t>[4b + j], the C fragment of B tile b
    for _e in tl.static_range(4 * M_TILES):
        acc0 = acc0 + (z,)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    k_start = pid_k * k_per_split
    k_end = k_start + k_per_split
    # PREFETCH: every load of the next BLOCK_K is issued before this one's MMAs. (Prefetching
    # only its words and scales, x loaded in time, needed fewer registers but was slower at
    # every M on the H200: `benchmarks/results/h200/prefetch_level2/`.)
    # PDL (launched with programmatic dependent launch, `_LANE_PDL`): the programs may start
    # while the kernel before is still running. Nothing it writes may be read, and nothing it
    # reads written, before griddepcontrol.wait: only the weights (constants) are, the first
    # BLOCK_K of them with PREFETCH (without it, their lines are only asked of L2). x, the
    # partials, the counters and out come after.
    if PREFETCH:
        if PDL:
            w_first = _lane_block_loads(
                qw_ptr, s_ptr, o_ptr, x_rows, k_start, q, cols, col_mask, stride_w, stride_xk,
                GROUP, BLOCK_K, M_TILES, X_PLANES, W4A8, 1,
            )  # fmt: skip
            if ASM:  # (the interpreter runs grids one after another: nothing to wait for)
                gdc_wait()
            x_first = _lane_block_loads(
                qw_ptr, s_ptr, o_ptr, x_rows, k_start, q, cols, col_mask, stride_w, stride_xk,
                GROUP, BLOCK_K, M_TILES, X_PLANES, W4A8, 2,
            )  # fmt: skip
            nxt = (w_first[0], w_first[1], w_first[2], x_first[3])
        else:
            nxt = _lane_block_loads(
                qw_ptr, s_ptr, o_ptr, x_rows, k_start, q, cols, col_mask, stride_w, stride_xk,
                GROUP, BLOCK_K, M_TILES, X_PLANES, W4A8,
            )  # fmt: skip
    elif PDL and ASM:  # without registers to spare: the first BLOCK_K's lines asked of L2
        n_safe = tl.minimum(n_lane, N - 1)
        g_row = (k_start // GROUP) * stride_w
        _prefetch_l2(s_ptr + g_row + n_safe)
        _prefetch_l2(o_ptr + g_row + n_safe)
        for st in tl.static_range(BLOCK_K // 32):
            _prefetch_l2(qw_ptr + (k_start // 8 + 4 * st + q) * stride_w + n_safe)
        gdc_wait()
    for k0 in range(k_start, k_end, BLOCK_K):
        if PREFETCH:
            cur = nxt
            # the last iteration re-reads its own block instead of reading past the split
            nxt = _lane_block_loads(
                qw_ptr, s_ptr, o_ptr, x_rows, tl.minimum(k0 + BLOCK_K, k_end - BLOCK_K), q,
                cols, col_mask, stride_w, stride_xk, GROUP, BLOCK_K, M_TILES, X_PLANES, W4A8,
            )  # fmt: skip
        else:
            cur = _lane_block_loads(
                qw_ptr, s_ptr, o_ptr, x_rows, k0, q, cols, col_mask, stride_w, stride_xk,
                GROUP, BLOCK_K, M_TILES, X_PLANES, W4A8,
            )  # fmt: skip
        words_k, scales_k, offsets_k, x_k = cur
        for st in tl.static_range(BLOCK_K // 32):
            if st == 0 or BLOCK_K > GROUP:
                sv = _lane_scale(scales_k[st if BLOCK_K > GROUP else 0], ASM)
                ov = _lane_scale(offsets_k[st if BLOCK_K > GROUP else 0], ASM)
                if N_TILES == 2:
                    s0, s1, s2, s3 = _split4(sv)
                    o0, o1, o2, o3 = _split4(ov)
                else:
                    s0, s1, s2, s3, s4, s5, s6, s7 = _split8(sv)
                    o0, o1, o2, o3, o4, o5, o6, o7 = _split8(ov)
            if N_TILES == 2:
                w0, w1, w2, w3 = _split4(words_k[st])
            else:
                w0, w1, w2, w3, w4, w5, w6, w7 = _split8(words_k[st])
            xs = ()  # B tile b: x rows 8b + r at the lane's k's
            for b in tl.static_range(M_TILES):
                xs = xs + _lane_pairs(x_k[M_TILES * st + b], ASM)
            acc0 = _lane_tile_step(acc0, w0, w1, s0, s1, o0, o1, xs, M_TILES, BF16, ASM, NW)
            acc1 = _lane_tile_step(acc1, w2, w3, s2, s3, o2, o3, xs, M_TILES, BF16, ASM, NW)
            if N_TILES == 4:
                acc2 = _lane_tile_step(acc2, w4, w5, s4, s5, o4, o5, xs, M_TILES, BF16, ASM, NW)
                acc3 = _lane_tile_step(acc3, w6, w7, s6, s7, o6, o7, xs, M_TILES, BF16, ASM, NW)
    if PDL and ASM:  # the next kernel may place its programs (it waits for this grid's end)
        gdc_launch_dependents()
    vals = acc0 + acc1
    if N_TILES == 4:
        vals = vals + acc2 + acc3
    acc, m, n = _lane_results(vals, q, n_lane, M_TILES)
    m = m + row0
    if W4A8:  # (linear: a split's partial is scaled before the split-K sum)
        acc = acc * tl.load(xs_ptr + m, mask=m < M, other=0.0)
        acc = acc * tl.load(s1_ptr + n, mask=n < N, other=0.0)
    _finish_tile(
        acc, out_ptr, ws_ptr, cnt_ptr + tl.program_id(0), bias_ptr, m * stride_om + n,
        (m < M) & (n < N), n, N, pid_k, tl.num_programs(1), stride_split, HAS_BIAS, SPLIT,
        SELF_REDUCE, REDUCE_UNROLL,
    )  # fmt: skip


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


@triton.jit
def _dequantize_kernel(
    qw_ptr, s_ptr, o_ptr, w_ptr, N, stride_w,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, X_PLANES: tl.constexpr = False,
):  # fmt: skip
    # words [ROWS, BLOCK_N] -> weight^T [8 * ROWS, BLOCK_N] (k-major, N-contiguous), which is
    # what `x @ w` with w = [K, N] reads; with X_PLANES its rows follow x's plane-major order.
    # Memory-bound: reads K*N/2 bytes, writes 2*K*N.
    rr = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    words = tl.load(qw_ptr + rr[:, None] * stride_w + rn[None, :], mask=n_mask[None, :], other=0)
    g = (8 * rr) // GROUP
    s = tl.load(s_ptr + g[:, None] * stride_w + rn[None, :], mask=n_mask[None, :], other=0).to(
        tl.float32
    )
    o = tl.load(o_ptr + g[:, None] * stride_w + rn[None, :], mask=n_mask[None, :], other=0).to(
        tl.float32
    )
    for i in tl.static_range(8):
        w = _codes(words, 4 * i) * s + o
        tl.store(
            w_ptr + _x_pos(8 * rr + i, X_PLANES)[:, None] * N + rn[None, :],
            w.to(w_ptr.dtype.element_ty),
            mask=n_mask[None, :],
        )


# --------------------------------------------------------------------------- configs
def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def valid_config(cfg: KernelConfig, k: int, group: int) -> bool:
    """A config fits when its tiles are powers of two and each split's K range is a whole
    number of tiles aligned to groups (Triton needs power-of-two ranges; the interpreter
    does not check, so this must)."""
    if cfg.prefetch not in (0, 1):
        return False
    if cfg.reduce and not (cfg.kernel == "mma" and cfg.split_k > 1 and cfg.reduce in _LANE_SUMS):
        return False  # (a choice only the lane kernel's split-K sum offers)
    if cfg.kernel == "dequant_mm":
        return _pow2(cfg.block_n) and _pow2(cfg.block_k) and (k // 8) % cfg.block_k == 0
    if cfg.kernel in _WGMMA_KINDS:  # 16 W rows a warp; x rows: wgmma's N side
        return (
            cfg.num_warps in (4, 8) and cfg.block_n == 16 * cfg.num_warps
            and cfg.block_m in (8, 16, 32, 64, 128, 256)
            # one group per K tile, or two (`_wgmma_sub`: unpacked one group at a time)
            and ((cfg.block_k in (64, 128) and group % cfg.block_k == 0)
                 or (cfg.block_k in (128, 256) and cfg.block_k == 2 * group))
            # the accumulator (BLOCK_M / 2 a thread) and two register tiles of W must fit
            and cfg.block_m + cfg.block_k // _wgmma_sub(cfg, group) <= 320
            and 2 <= cfg.num_stages <= 6 and not cfg.prefetch and not cfg.reduce
            # a register cap (Triton's maxnreg; uncapped, the producer warp's partitions take
            # up to 255 registers a thread and wgmma_rs at 16 x rows 118, where 80-88 keep
            # its wgmmas asynchronous but were no faster, session 38, and 96 makes ptxas
            # serialize them):
            # at least the accumulator, BLOCK_M / 2 a thread, and 64 more; the producer warp
            # pads to a warpgroup, and all must fit the 64K registers (192 at 8 + 4 warps
            # does not load)
            and (not cfg.max_registers
                 or (cfg.block_m // 2 + 64 <= cfg.max_registers <= 255
                     and cfg.max_registers % 8 == 0
                     and (cfg.num_warps + 4 * (cfg.kernel == "wgmma_rs_ws")) * 32
                     * cfg.max_registers <= 65536))
            and k % cfg.split_k == 0 and (k // cfg.split_k) % cfg.block_k == 0
            and _wgmma_smem_bytes(cfg, sub=_wgmma_sub(cfg, group)) <= _SMEM_BYTES
        )  # fmt: skip
    if cfg.kernel == "mma":  # 32 or 64 columns per warp, 8 to 64 rows, whole 32-k steps
        tiles_per_warp = cfg.block_n // (16 * cfg.num_warps)
        return (
            cfg.block_n % (16 * cfg.num_warps) == 0 and tiles_per_warp in (2, 4)
            and cfg.block_m // 8 in _LANE_MMA_M_TILES and cfg.block_m % 8 == 0
            # 64 rows x 4 tiles would hold 128 accumulators per thread
            and cfg.block_m * tiles_per_warp <= 128
            and _pow2(cfg.block_k)
            and cfg.block_k >= 32 and k % cfg.split_k == 0 and (k // cfg.split_k) % cfg.block_k == 0
            and group % 32 == 0 and (group % cfg.block_k == 0 or cfg.block_k % group == 0)
        )  # fmt: skip
    if not (_pow2(cfg.block_n) and _pow2(cfg.block_k) and _pow2(cfg.block_m)) or k % cfg.split_k:
        return False
    if (k // cfg.split_k) % cfg.block_k:
        return False
    min_k = 128 if cfg.kernel in _PLANES_KINDS else 32 if cfg.kernel == "gemv" else 16
    if cfg.kernel in ("gemm", "gemm_swap") and _gemm_smem_bytes(cfg, group) > _SMEM_BYTES:
        return False
    return cfg.block_k >= min_k and (group % cfg.block_k == 0 or cfg.block_k % group == 0)


_PLANES_KINDS = ("gemm_planes", "gemm_planes_xreg", "gemm_planes_direct")
_WGMMA_KINDS = ("wgmma_rs", "wgmma_rs_ws")  # the Gluon kernels of `w4a16_wgmma.py`
_SMEM_BYTES = 232448  # an H100 block's shared-memory limit (227 KiB)


def _wgmma_smem_bytes(cfg: KernelConfig, elem: int = 2, sub: int = 1) -> int:
    """The wgmma_rs kernels' shared memory: their TMA ring (x, words, scale and offset rows,
    a barrier per stage). `elem`: x's and the rows' bytes (W4A8: 1); `sub`: scale rows a
    stage holds (`_wgmma_sub`); a stage's rows take at least 128 bytes
    (`w4a16_wgmma._row_slots`)."""
    bm, bn, bk, stages = cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_stages
    return stages * (bm * bk * elem + bk // 8 * bn * 4 + 2 * max(sub * bn * elem, 128) + 8)


def _wgmma_sub(cfg: KernelConfig, group: int) -> int:
    """Groups a wgmma_rs K tile spans: 2 when BLOCK_K is twice the group (one TMA stage, two
    sub-tiles unpacked and multiplied one after the other: `w4a16_wgmma`'s SUB), else 1."""
    return 2 if cfg.block_k == 2 * group else 1


def _wgmma_rs_configs(
    mb: int,
    n: int,
    group: int,
    kinds: list[tuple[str, int]],
    max_rows: int = 256,
    two_groups: bool = False,
) -> list[KernelConfig]:
    """The wgmma_rs candidates of an M bucket (W4A16's, and W4A8's int8 mode): BLOCK_M the
    bucket up to `max_rows` (x's rows are wgmma's N side), BLOCK_K 128 up to 64 rows where
    the group allows, 64 x 4 or 128 x 8 warps, useful splits of 1, 2 or 4; per (kind, register
    cap) of `kinds`. `two_groups`: also wgmma_rs K tiles of two groups (`_SUBTILES`)."""
    bm = min(mb, max_rows)
    bk = 128 if bm <= 64 and group % 128 == 0 else 64
    out = []
    for bn, warps in ((64, 4), (128, 8)):
        for kind, regs in kinds:
            for sk in (1, 2, 4):
                if _useful_split(triton.cdiv(n, bn) * triton.cdiv(mb, bm), sk):
                    out.append(KernelConfig(kind, bm, bn, bk, sk, warps, 4, max_registers=regs))
                    if two_groups and kind == "wgmma_rs" and bm <= 64 and bk == group:
                        for stages in (2, 3):
                            out.append(
                                KernelConfig(kind, bm, bn, 2 * bk, sk, warps, stages,
                                             max_registers=regs)
                            )  # fmt: skip
    return out


# wgmma_rs K tiles of two groups up to 64 x rows (one TMA stage, two sub-tiles unpacked one
# after the other, `w4a16_wgmma`'s SUB): per 128 k half the TMA copies, CTA barriers and
# barrier waits (Triton 3.6, 16 x 64: the K loop's 295 instructions per 128 k -> 221, bar.sync
# 6 -> 3). At 16 x rows the kernel issues on 66% of cycles (session 37's ncu), so the
# overhead is worth cutting there. Timed (session 40, H200, `results/session40/sub/`), best
# two-group tile against best one-group: 28672x4096 M = 16 30.4 -> 26.9 us, M = 64 43.2 ->
# 42.3; 8192x28672 level at M = 16 and 64. Each win was wgmma_rs (the producer-warp kernel
# with them was 3-12% slower than without), so W4A16's wgmma_rs candidates only (W4A8's:
# `w4a8._SUBTILES`). On the H100 (session 42) the tuner picked a two-group tile (16 x 64, 3
# stages) for 28672x4096 M = 16: 31.2 -> 27.3 us in `bench_w4a16.py` (2.57x -> 2.94x cuBLAS).
_SUBTILES = True


def _wgmma_device() -> bool:
    """Whether to offer the wgmma_rs kernels: a Hopper GPU (wgmma, TMA), not the interpreter."""
    if _interpreting() or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability() == (9, 0)


def _gemm_smem_bytes(cfg: KernelConfig, group: int) -> int:
    """Shared memory of the natural-order GEMM's pipelined loads: (stages - 1) buffers of the x
    tile, the [BLOCK_K, BLOCK_N] int32 word tile (each word once per code) and, when BLOCK_K
    spans several groups, per-element scale and offset tiles. Matches Triton's figure for the
    config that exceeded it on the H100 (BM16 BN128 BK128, 3 stages, group 64: 303104 bytes
    reported, 270336 estimated, both over the limit)."""
    per_stage = cfg.block_m * cfg.block_k * 2 + cfg.block_k * cfg.block_n * 4
    if cfg.block_k > group:
        per_stage += 2 * cfg.block_k * cfg.block_n * 2
    return (cfg.num_stages - 1) * per_stage


# "gemm_planes_direct" passes the interpreter tests but has not run on a GPU yet: it joins the
# candidates once the GPU kernel tests have passed with it. Lane-MMA configs of 32 and 64 rows
# (4 and 8 B tiles) joined that way: the W4A16 kernel tests, hypothesis included, passed on the H200
# (210 tests, `results/h200/prefetch/`), as did every config of its probe (within 2.8e-4 of
# dequantize + matmul).
_DIRECT_PLANES_VALIDATED = False

# Split K only while the grid is under ~4 waves of an H100 (132 SMs): more splits past that
# add workspace traffic without adding parallelism.
_SPLIT_K_PROGRAM_TARGET = 4 * 132


def _useful_split(programs: int, split: int) -> bool:
    return split == 1 or programs * split // 2 < _SPLIT_K_PROGRAM_TARGET


def candidate_configs(m: int, n: int, k: int, group: int) -> list[KernelConfig]:
    """The configs autotuning tries for one (M bucket, N, K, group): small and hand-pruned."""
    mb = m_bucket(m)
    if mb >= 2048:
        # Prompts: dequantize + cuBLAS won every key at M = 256 and 1024 on the H100, and the
        # fused kernels only fall further behind as M grows (they unpack each weight once per
        # M tile). One candidate keeps a long prompt's first call from tuning ~30 configs per
        # shape (on the H200 an 8000-token prompt, with them, warmed up in 70.6 s against
        # the bf16 model's 33.2 s).
        return [_dequant_mm_config(k)]
    out: list[KernelConfig] = []
    splits = (1, 2, 4, 8, 16) if mb <= 64 else (1, 2, 4) if mb <= 256 else (1,)
    if mb <= 4:
        # BLOCK_N = 128 * num_warps (x c) keeps every word row of a column in one thread, so
        # the per-tile reduction over rows stays in registers (no barrier in the loop).
        # BLOCK_K = 32 halves the registers (more warps in flight per SM) for ~8% more
        # instructions per weight.
        for bn, bk, warps in ((128, 64, 1), (256, 64, 2), (512, 64, 4), (1024, 64, 8),
                              (256, 128, 2), (512, 128, 4), (128, 128, 1),
                              (256, 32, 2), (512, 32, 4), (1024, 32, 8)):  # fmt: skip
            for sk in (*splits, 32):
                if _useful_split(triton.cdiv(n, bn) * mb, sk):
                    for pf in (False, True):
                        out.append(KernelConfig("gemv", 1, bn, bk, sk, warps, 1, pf))
    bms = (16,) if mb <= 16 else (32,) if mb <= 32 else (64,) if mb <= 64 else (64, 128)
    for kind in ("gemm", "gemm_swap"):
        for bm in bms:
            for bn, bk, warps, stages in ((64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3),
                                          (128, 128, 8, 3), (256, 64, 8, 3), (128, 32, 4, 4),
                                          (256, 128, 8, 2)):  # fmt: skip
                for sk in splits:
                    if _useful_split(triton.cdiv(n, bn) * triton.cdiv(mb, bm), sk):
                        out.append(KernelConfig(kind, bm, bn, bk, sk, warps, stages))
    if mb <= 64:
        for bn, bk, warps in ((64, 128, 4), (128, 128, 4), (256, 128, 8), (128, 256, 8)):
            for sk in splits:
                if _useful_split(triton.cdiv(n, bn) * triton.cdiv(mb, bms[0]), sk):
                    for pf in (False, True):
                        out.append(KernelConfig("gemm_planes", bms[0], bn, bk, sk, warps, 2, pf))
                        out.append(
                            KernelConfig("gemm_planes_xreg", bms[0], bn, bk, sk, warps, 2, pf)
                        )
                        if bms[0] >= 64 and _DIRECT_PLANES_VALIDATED:  # wgmma's M
                            out.append(
                                KernelConfig("gemm_planes_direct", bms[0], bn, bk, sk, warps, 2, pf)
                            )
    if mb <= 64:
        # (warps, tiles per warp, BLOCK_K): the H100 probe's leaders at M = 1 and 16, and the
        # H200's at 32 and 64 (`benchmarks/probe_w4a16_mma.py`); 2 tiles won every M >= 16
        # shape. Each with and without the prefetch: on the H200 it cut 32 and 64 rows by up
        # to 25% (more registers, fewer warps) and left 16 rows unchanged.
        shapes = (
            ((2, 2, 128), (4, 2, 128), (8, 2, 128), (4, 2, 256), (4, 4, 128)) if mb <= 16
            else ((2, 2, 128), (4, 2, 128), (2, 2, 64), (4, 2, 64))
        )  # fmt: skip
        for warps, tiles, bk in shapes:
            bn = 16 * tiles * warps
            for sk in (*splits, 32):
                if _useful_split(triton.cdiv(n, bn), sk):
                    for pf in (False, True):
                        out.append(KernelConfig("mma", max(8, mb), bn, bk, sk, warps, 1, pf))
                    # the split-K sum with 8 partials in flight, on 2 tiles of 128 K per warp
                    # (each is one more binary to compile). On the H100 it won 11 of the 14
                    # shipped M = 1 keys (8192x28672: 50.9 -> 47.4 us) and 8 of 14 at M = 16
                    # (4096x14336: 27.9 -> 21.8 us; `results/session21/`)
                    if mb <= 16 and sk > 1 and tiles == 2 and bk == 128:
                        for pf in (False, True) if mb > 8 else (False,):
                            out.append(
                                KernelConfig("mma", max(8, mb), bn, bk, sk, warps, 1, pf, "unroll8")
                            )
    if mb >= 16 and _wgmma_device():
        # Gluon wgmma_rs (W unpacked into wgmma's register operand, x rows its N side): on the
        # H100 (fp16, thirty-sixth session) 28672x4096 / 8192x28672 took 32.2 / 62.4 us at
        # M = 16, 46.2 / 89.8 at 64, 118.2 / 204.6 at 256 and 432.8 / 778.2 at 1024, against
        # 36.5 / 63.3, 55.3 / 102.9, 175.6 / 307.4 and 464.3 / 938.5 for the picks before it.
        # The producer-warp variant (_ws) won at M >= 256 and lost below (one Gluon compile
        # each on first use: at most 12 per key, 24 with two-group tiles).
        # Below 128 x rows the producer warp needs a register cap (its partitions would take
        # 255 registers a thread): capped at 96 it matched or beat wgmma_rs on 8192x28672
        # (M = 16: 58.7 vs 62.1 us) and lost on 28672x4096 (35.3 vs 32.0; session 37).
        out += _wgmma_rs_configs(
            mb, n, group, [("wgmma_rs", 0), ("wgmma_rs_ws", 0 if mb >= 128 else 96)],
            two_groups=_SUBTILES,
        )  # fmt: skip
    if mb >= 128:
        out.append(_dequant_mm_config(k))
        # Planes at large M: W from registers as wgmma's A (BLOCK_N rows), x^T as its
        # shared-memory B (N = BLOCK_M). On the H100 the two shapes kept here came second to
        # dequant_mm (28672x4096: 232 vs 215 us at M=256, 754 vs 424 us at M=1024); three
        # more (BLOCK_M 64, BLOCK_N 64/256) were slower still.
        for bm in (128, 256):
            if bm <= mb:
                out.append(KernelConfig("gemm_planes", bm, 128, 128, 1, 8, 2))
    return [c for c in out if valid_config(c, k, group)]


def _dequant_mm_config(k: int) -> KernelConfig:
    return KernelConfig("dequant_mm", 0, 256, _dequant_rows(k), 1, 4, 1)


def _dequant_rows(k: int) -> int:
    """Word rows per dequantize program: the largest power of two <= 16 dividing K / 8."""
    return next(r for r in (16, 8, 4, 2, 1) if (k // 8) % r == 0)


def default_config(m: int, n: int, k: int, group: int) -> KernelConfig:
    """Used without tuning (QCOMPILE_AUTOTUNE=0, CUDA-graph capture): valid for every shape."""
    mb = m_bucket(m)
    bk = next(b for b in (128, 64, 32, 16) if k % b == 0 and (group % b == 0 or b % group == 0))
    if mb <= 4 and bk >= 64:
        bk = 64
        sk = next(s for s in (8, 4, 2, 1) if (k // s) % bk == 0) if n <= 8192 else 1
        return KernelConfig("gemv", 1, 512, bk, sk, 4, 1)
    if mb <= 16 and group % 32 == 0 and k % 32 == 0:
        # lane MMA: 128 columns per program, split K until ~4 programs per SM or 16 splits
        # (bk >= 32 here: 32 divides both K and the group)
        sk = 1
        while (
            sk < 16 and triton.cdiv(n, 128) * sk * 2 <= _SPLIT_K_PROGRAM_TARGET
            and (k // (2 * sk)) % bk == 0 and k % (2 * sk) == 0
        ):  # fmt: skip
            sk *= 2
        return KernelConfig("mma", 8 if mb <= 8 else 16, 128, bk, sk, 4, 1)
    if mb >= 256:  # the large-M winner of every tuned key (above)
        return _dequant_mm_config(k)
    bm = 16 if mb <= 16 else 32 if mb <= 32 else 64
    return KernelConfig("gemm", bm, 64 if mb <= 64 else 128, min(bk, 64), 1, 4, 3)


# --------------------------------------------------------------------------- launcher
def _interpreting() -> bool:
    """Triton's CPU interpreter runs Python, not PTX: kernels take their inline-asm-free path."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


# One tile counter per split-K output tile, per device: zero between launches (the last
# program of each tile re-arms its counter). Allocated once, outside CUDA-graph capture and
# pools (while tracing: `reserve_tile_counters`), and never freed (graphs keep its address). Kernels on two streams at once would share it; a
# model runs its linears on one stream.
_COUNTERS = 8192
_counters: dict[torch.device, torch.Tensor] = {}


def _tile_counters(device: torch.device) -> torch.Tensor | None:
    """The device's counters, or None under capture before they exist (then split-K uses
    the two-launch reduction: allocating inside a capture would tie them to one graph)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    found = _counters.get(device)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if found is None and not capturing:
        found = _counters[device] = torch.zeros(_COUNTERS, dtype=torch.int32, device=device)
    return found


def reserve_tile_counters(device: torch.device) -> None:
    """Allocate `device`'s tile counters now, while a graph is traced (the ops' fake
    implementations call this). Left to a kernel's first launch, that launch can be the
    warm-up run of a CUDA-graph tree (`mode="reduce-overhead"`), whose allocations land in
    the tree's private pool: the counters then outlive it untracked, and the next recording
    fails ("Detected 1 tensor(s) in the cudagraph pool not tracked as outputs", seen on the
    H100 with generate() compiling only decode steps)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # a real tensor, not the fake mode's
        _tile_counters(device)


def _split_tiles(cfg: KernelConfig, m: int, n: int) -> int:
    """Output tiles of a split-K launch, each with its own counter."""
    rows = m if cfg.kernel == "gemv" else triton.cdiv(m, cfg.block_m)
    return rows * triton.cdiv(n, cfg.block_n)


# The lane kernel's one-launch split-K sum reads the partials one at a time (its registers
# are needed at 16+ rows) unless the config says `reduce="unroll<u>"` (u partials' loads in
# flight; a tuning candidate at 8 rows). Untimed for W4A16: W4A8's lane kernel gained 52.3 ->
# 47.4 us at M = 1 with 8 in flight (`results/session19/small/`).
_LANE_SUMS = ("unroll4", "unroll8")  # KernelConfig.reduce values of the lane kernel


# The lane kernel launched with programmatic dependent launch (PDL): its programs are placed
# while the kernel before it drains and load their first weights before waiting for it
# (griddepcontrol.wait), and it lets the kernel after it do the same once its loop is done.
# A decode step is ~215 kernels at 16 layers, and each boundary costs the drain, the
# launch and the first loads' latency: its CUDA events took 2.8 ms against 1.9 ms of
# kernels (bf16, 8000 tokens, H100, `results/session31/e2e/`; the events also hold host
# time). Alone it is neutral (+-1%, `results/session32/pdl/`); with Inductor's kernels under
# PDL too (`backend._INDUCTOR_PDL`), 16 layers' decode step is ~9% shorter (`backend.py`).
_LANE_PDL = True
# (The wgmma_rs kernels under PDL, and summing their split K in the same launch, showed no
# gain on the H100, session 37: a 16-layer decode step's forward took 2.48 / 2.59 ms under PDL
# and 2.59 / 2.56 with the sum too, against 2.35 / 2.37 as shipped, A/B/B/A (the host's share
# also rose in those runs, 0.91-1.05 against 0.76-0.78 ms, so no loss is proven either); the
# sum alone moved single kernels by -6% to +4%. Removed after commit a47c7ab.)


def _pdl(cfg: KernelConfig) -> bool:
    """Whether `cfg`'s kernel is launched with programmatic dependent launch."""
    return _LANE_PDL and cfg.kernel == "mma"


def _lane_reduce_unroll(cfg: KernelConfig) -> int:
    """How many split-K partials' loads the lane kernel's sum keeps in flight for `cfg`."""
    return int(cfg.reduce.removeprefix("unroll")) if cfg.reduce.startswith("unroll") else 1


def launch(
    cfg: KernelConfig,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    out: torch.Tensor | None = None,
    self_reduce: bool = True,
    x_planes: bool = False,
    w4a8: tuple[torch.Tensor, torch.Tensor] | None = None,
    reduce_unroll: int | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """Run one config: x [M, K] (any strides; plane-major per PLANE_CHUNK when `x_planes`)
    -> out [M, N] in x's dtype (or `out`'s).

    `w4a8` = (x_scale [M], s1 [N]): the lane kernel on W4A8's FP8 path (x: e4m3 xq as fp16;
    scales, offsets: uint8 s2 and z), out = (x @ ((q - z) s2)^T) * x_scale * s1 (+ bias).

    qweight, scales and offsets: N-contiguous rows sharing one row stride >= N (contiguous, or
    column slices of wider co-located tensors; the op checks). Split-K reduces in the same
    launch unless `self_reduce` is False or no tile counters are available; the lane kernel's
    sum then has `reduce_unroll` partials' loads in flight (None: `_lane_reduce_unroll`).
    `pdl` (lane kernel): launched with programmatic dependent launch (`_pdl`)."""
    m, k = x.shape
    n = qweight.shape[1]
    stride_w = qweight.stride(0)
    if out is None:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    elif not out.is_contiguous():  # the split-K reduction writes out as flat [M * N] memory
        raise ValueError("launch: out must be contiguous")
    if m == 0 or n == 0:
        return out  # nothing to compute (the lane-MMA kernel would read row M - 1 = -1)
    if cfg.kernel == "dequant_mm":
        w = torch.empty((k, n), device=x.device, dtype=x.dtype)
        grid = (triton.cdiv(n, cfg.block_n), (k // 8) // cfg.block_k)
        _dequantize_kernel[grid](
            qweight, scales, offsets, w, n, stride_w,
            GROUP=group_size, BLOCK_N=cfg.block_n, ROWS=cfg.block_k, X_PLANES=x_planes,
            num_warps=cfg.num_warps,
        )  # fmt: skip
        return torch.addmm(bias, x, w, out=out) if bias is not None else torch.mm(x, w, out=out)
    split = cfg.split_k
    ws = out if split == 1 else torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    counters = None
    if (
        split > 1
        and self_reduce
        and cfg.kernel not in _WGMMA_KINDS  # (it sums in `_splitk_reduce_kernel`)
        and _split_tiles(cfg, m, n) <= _COUNTERS
    ):
        counters = _tile_counters(x.device)
    bias_arg = bias if bias is not None else out  # never read when HAS_BIAS is False
    common = dict(
        GROUP=group_size, HAS_BIAS=bias is not None, SPLIT=split > 1,
        SELF_REDUCE=counters is not None,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    args = (
        x, qweight, scales, offsets, bias_arg, out, ws, counters if counters is not None else ws,
        m, n, k, k // split, stride_w, x.stride(0), x.stride(1), out.stride(0), m * n,
    )  # fmt: skip
    if w4a8 is not None and (cfg.kernel != "mma" or x.dtype != torch.float16 or x_planes):
        raise ValueError("launch: W4A8 runs the lane kernel only, on fp16 x in natural order")
    if pdl and cfg.kernel != "mma":
        raise ValueError(f"launch: pdl is for the lane kernel, not {cfg.kernel}")
    if cfg.kernel in _WGMMA_KINDS:
        from qcompile.lowering import w4a16_wgmma

        if not w4a16_wgmma.fits(qweight, scales, offsets):  # (TMA cannot read them in place)
            return launch(_dequant_mm_config(k), x, qweight, scales, offsets, bias, group_size,
                          out=out, x_planes=x_planes)  # fmt: skip
        if x_planes:  # (the kernel reads x in natural order: a copy)
            x = from_planes(x, PLANE_CHUNK)
        w4a16_wgmma.launch(cfg, x, qweight, scales, offsets, bias, group_size, out,
                           ws=ws if split > 1 else None)  # fmt: skip
    elif cfg.kernel == "mma":
        if reduce_unroll is None:
            reduce_unroll = _lane_reduce_unroll(cfg)
        extra = {}
        if w4a8 is not None:
            extra = dict(W4A8=True, xs_ptr=w4a8[0], s1_ptr=w4a8[1])
        if counters is not None and reduce_unroll > 1:
            extra["REDUCE_UNROLL"] = reduce_unroll
        if pdl:
            extra["PDL"] = True
            if not _interpreting():
                extra["launch_pdl"] = True
        row_blocks = triton.cdiv(m, cfg.block_m)
        _w4a16_mma_kernel[(triton.cdiv(n, cfg.block_n) * row_blocks, split)](
            *args, M_TILES=cfg.block_m // 8, N_TILES=cfg.block_n // (16 * cfg.num_warps),
            X_PLANES=x_planes, ASM=not _interpreting(), PREFETCH=bool(cfg.prefetch), **extra,
            **common,
        )  # fmt: skip
    elif cfg.kernel == "gemv":
        grid = (triton.cdiv(n, cfg.block_n), split, m)
        _w4a16_gemv_kernel[grid](*args, 0xF, PREFETCH=cfg.prefetch, X_PLANES=x_planes, **common)
    elif cfg.kernel in _PLANES_KINDS:
        grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
        # x already plane-major: "xreg" configs read it as it is, like "gemm_planes"
        x_in_regs = cfg.kernel == "gemm_planes_xreg" and not x_planes
        if not x_in_regs and not x_planes:
            args = (to_planes(x, cfg.block_k), *args[1:13], k, 1, *args[15:])
        _w4a16_gemm_planes_kernel[grid](
            *args, 0xF, BLOCK_M=cfg.block_m, PREFETCH=cfg.prefetch,
            SWAP_AB=cfg.kernel != "gemm_planes_direct", X_IN_REGS=x_in_regs, X_PLANES=x_planes,
            **common,
        )  # fmt: skip
    else:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
        swap = cfg.kernel == "gemm_swap"
        _w4a16_gemm_kernel[grid](
            *args, BLOCK_M=cfg.block_m, GROUP_M=8, SWAP_AB=swap, X_PLANES=x_planes, **common
        )
    if split > 1 and counters is None:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
            ws, bias_arg, out, m * n, n, split, HAS_BIAS=bias is not None, BLOCK=block
        )
    return out


# The kernels index x, out and the split-K workspace with 32-bit offsets (row * row stride +
# column). Past 2**31 elements (a 128k-vocabulary lm_head over 16k+ tokens) the ops launch
# row chunks that stay below it, each into its slice of out.
_INDEX_LIMIT = 2**31


def row_chunks(m: int, *row_spans: int) -> list[tuple[int, int]]:
    """[m0, m1) row ranges of at most (2**31 - 1) // max(row_spans) rows each; a row span is
    the elements one row of an operand covers (x's row stride, N times the split-K factor)."""
    per = max(1, (_INDEX_LIMIT - 1) // max(*row_spans, 1))
    return [(m0, min(m, m0 + per)) for m0 in range(0, max(m, 1), per)]


def _row_spans(x: torch.Tensor, n: int, split: int) -> tuple[int, int, int]:
    m, k = x.shape
    return (x.stride(0), k * x.stride(1), n * split)


def first_rows(x: torch.Tensor, n: int, split: int) -> slice | None:
    """The rows of x ([M, K]) that a config's first launch covers, None for all of them (every
    realistic shape). The tuner times a config on these: a whole x past 2**31 elements of out
    would overflow the kernel's 32-bit offsets."""
    spans = _row_spans(x, n, split)
    if len(x) * max(spans) < _INDEX_LIMIT:
        return None
    return slice(0, row_chunks(len(x), *spans)[0][1])


def in_row_chunks(launch_rows, x: torch.Tensor, n: int, split: int, dtype) -> torch.Tensor:
    """`launch_rows(rows, out)` once with rows = out = None (every realistic shape: no slicing
    on the hot path), or per `row_chunks` of x ([M, K]) into slices of one [M, N] out."""
    m = len(x)
    spans = _row_spans(x, n, split)
    if m * max(spans) < _INDEX_LIMIT:
        return launch_rows(None, None)
    out = torch.empty((m, n), device=x.device, dtype=dtype)
    for m0, m1 in row_chunks(m, *spans):
        launch_rows(slice(m0, m1), out[m0:m1])
    return out


def rows_of(t: torch.Tensor, rows: slice | None) -> torch.Tensor:
    return t if rows is None else t[rows]


def w4a16_linear_cuda(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    x_planes: bool = False,
) -> torch.Tensor:
    """x [M, K] -> [M, N] with the tuned config of this (M bucket, N, K, group, dtype). The
    configs are shared by both x orders: the kernels read the same weights either way."""
    m, k = x.shape
    n = qweight.shape[1]
    if qweight.shape[0] * 8 != k:  # the op checks everything; direct callers get this much
        raise ValueError(
            f"w4a16_linear_cuda: qweight {tuple(qweight.shape)} is not [K/8, N] for K={k}"
        )
    key = TuneKey(FAMILY, m_bucket(m), n, k, group_size, str(x.dtype).removeprefix("torch."))
    cfg = autotuner(x.device.index or 0).get(
        key,
        lambda: candidate_configs(m, n, k, group_size),
        lambda c: time_us(
            lambda: launch(
                c,
                rows_of(x, first_rows(x, n, c.split_k)),
                qweight,
                scales,
                offsets,
                bias,
                group_size,
                x_planes=x_planes,
                pdl=_pdl(c),
            )
        ),
        lambda: default_config(m, n, k, group_size),
        valid=lambda c: valid_config(c, k, group_size),
    )

    def launch_rows(rows: slice | None, out: torch.Tensor | None) -> torch.Tensor:
        if x_planes and out is not None:
            raise ValueError(
                f"w4a16_linear_cuda: x [{m}, {k}] passes 2**31 elements and plane-major rows "
                "cannot be chunked; pass x in natural order (x_planes=False)"
            )
        w = (qweight, scales, offsets, bias, group_size)
        return launch(cfg, rows_of(x, rows), *w, out=out, x_planes=x_planes, pdl=_pdl(cfg))

    return in_row_chunks(launch_rows, x, n, cfg.split_k, x.dtype)
