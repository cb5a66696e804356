"""W4A16 "wgmma" kernel (Hopper, M >= 32): a Gluon GEMM that unpacks each int4 weight tile
into shared memory while the tensor cores run the previous tile.

Gluon is Triton's dialect with explicit layouts, shared memory, TMA and asynchronous wgmma;
plain `tl.dot` kernels cannot say "unpack tile i while the MMA of tile i - 1 runs", and
Triton's pipeliner does not stage loads that feed arithmetic before the dot. Per K tile:
- TMA brings x [BLOCK_M, BLOCK_K], the words [BLOCK_K / 8, BLOCK_N] and the group's scale and
  offset rows into a ring of `num_stages` buffers (one mbarrier each);
- every warp unpacks its share of the words in registers (a code c becomes the 16-bit float
  MAGIC + c by OR-ing it into MAGIC's mantissa, minus MAGIC: exact, and no int-to-float
  conversions), then c * scale + offset;
- after the previous wgmma has finished, the fp16 / bf16 tile goes to shared memory
  (K-contiguous: each thread stores 16-byte runs) and this tile's wgmma is issued
  asynchronously, x and W^T both from shared memory.
Split K writes fp32 partials (`w4a16.launch` sums them). Gluon does not run in Triton's
interpreter: the CPU tests compile it for sm_90 (with Triton 3.6 and the installed one; two
Gluon names differ between them, see `_tma_load`) and check its unpacking arithmetic in torch
(`unpack_tile_reference`); its numbers are checked by gpu tests (so far on Triton 3.6).
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from qcompile.lowering.autotune import KernelConfig

# One producer warp issues the TMA (`gl.warp_specialize`), so the consumer warps' loop loses
# the TMA issue and the barriers around it (sm_90, offline: see `benchmarks/sass_report.py`).
# Compiles; untimed and not yet run on a GPU, so off.
_WS = False
# Registers per thread for every warp of a WS launch (the producer warp gives most of its
# share to the consumers); 0: Triton's default.
_WS_MAXNREG = 0

# TMA global -> shared: `async_copy_global_to_shared` up to Triton 3.6, `async_load` later
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
# a CTA-wide barrier: `thread_barrier` up to Triton 3.6, `barrier` later
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


@gluon.constexpr_function
def _mma_warps(block_m, num_warps):
    warps = [4, 1]
    while warps[0] * warps[1] != num_warps:
        if block_m > 16 * warps[0]:
            warps[0] *= 2
        else:
            warps[1] *= 2
    return warps


@gluon.constexpr_function
def _instr_n(block_m, block_n, num_warps):
    n_reps = triton.cdiv(num_warps, triton.cdiv(block_m, 16))
    n = 256
    while n > max(block_n // n_reps, 8) or block_n % n:
        n -= 8
    return n


@gluon.jit
def _issue_tile(x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem, ready, t, k_first,
                off_m, off_n, BLOCK_K: gl.constexpr, GROUP: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """TMA for K tile t (from k_first) into stage t % STAGES: x, the words, scale and offset."""
    s = t % STAGES
    bar = ready.index(s)
    nbytes: gl.constexpr = (
        x_desc.block_type.nbytes + w_desc.block_type.nbytes + 2 * s_desc.block_type.nbytes
    )
    mbarrier.expect(bar, nbytes)
    k = k_first + t * BLOCK_K
    _tma_load(x_desc, [off_m, k], bar, x_smem.index(s))
    _tma_load(w_desc, [k // 8, off_n], bar, w_smem.index(s))
    _tma_load(s_desc, [k // GROUP, off_n], bar, s_smem.index(s))
    _tma_load(o_desc, [k // GROUP, off_n], bar, o_smem.index(s))


@gluon.jit
def _wgmma_produce(x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem, ready, empty,
                   k_first, off_m, off_n, num_k, BLOCK_K: gl.constexpr, GROUP: gl.constexpr,
                   STAGES: gl.constexpr):  # fmt: skip
    """WS: the producer warp. It fills stage t % STAGES once the consumers have freed it."""
    for t in range(num_k):
        mbarrier.wait(empty.index(t % STAGES), ((t // STAGES) & 1) ^ 1)
        _issue_tile(x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem, ready, t,
                    k_first, off_m, off_n, BLOCK_K, GROUP, STAGES)  # fmt: skip


@gluon.jit
def _wgmma_consume(x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem, b_smem, ready,
                   empty, k_first, off_m, off_n, num_k, bias_ptr, out_ptr, M, N,
                   HAS_BIAS: gl.constexpr, SPLIT: gl.constexpr, BLOCK_M: gl.constexpr,
                   BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP: gl.constexpr,
                   STAGES: gl.constexpr, WS: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """The K loop: unpack tile i while tile i - 1's wgmma runs, then issue tile i's. Without
    WS these warps also issue the TMA for tile i + STAGES - 1; with WS they hand tile i - 1's
    stage back to the producer warp, and store the result themselves (Triton 3.6 cannot return a
    tensor from a warp-specialized region). Without WS: returns the fp32 accumulator."""
    dtype: gl.constexpr = x_desc.dtype
    # 1024 (fp16) or 128 (bf16): the float whose last mantissa bits a 4-bit code fills
    MAGIC_BITS: gl.constexpr = 0x6400 if dtype == gl.float16 else 0x4300
    MAGIC: gl.constexpr = 1024.0 if dtype == gl.float16 else 128.0
    # Thread (word group, n) unpacks 4 words = 32 consecutive k of one column: the permute and
    # reshape to [BLOCK_N, BLOCK_K] move no data. (The words are read as stored: Triton 3.6
    # loaded a permuted view of this unswizzled buffer as if it were not permuted.)
    L3: gl.constexpr = gl.BlockedLayout([4, 1, 8], [2, 16, 1], [1, num_warps, 1], [2, 0, 1])
    WL: gl.constexpr = gl.SliceLayout(2, L3)
    SL: gl.constexpr = gl.SliceLayout(0, WL)
    shifts = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(0, L3))) * 4
    shifts = gl.expand_dims(gl.expand_dims(shifts, 0), 0)
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=_mma_warps(BLOCK_M, num_warps),
        instr_shape=[16, _instr_n(BLOCK_M, BLOCK_N, num_warps), 16],
    )  # fmt: skip
    # (the loop carries the async accumulator: the wait inside hands back a plain tensor)
    acc = warpgroup_mma_init(gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.float32, layout=mma_layout))
    if not WS:
        for t in gl.static_range(STAGES - 1):
            if t < num_k:
                _issue_tile(x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem,
                            ready, t, k_first, off_m, off_n, BLOCK_K, GROUP, STAGES)  # fmt: skip
    for i in range(num_k):
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        words = w_smem.index(s).load(WL)  # [WORDS, BLOCK_N]
        sv = gl.expand_dims(gl.expand_dims(s_smem.index(s).reshape([BLOCK_N]).load(SL), 0), 2)
        ov = gl.expand_dims(gl.expand_dims(o_smem.index(s).reshape([BLOCK_N]).load(SL), 0), 2)
        codes = ((gl.expand_dims(words, 2) >> shifts) & 0xF) | MAGIC_BITS
        w = (codes.to(gl.int16).to(dtype, bitcast=True) - MAGIC) * sv + ov
        w = gl.reshape(gl.permute(w, (1, 0, 2)), [BLOCK_N, BLOCK_K])
        # the previous tile's wgmma is done in every warpgroup: its stage and b_smem are free
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        _cta_barrier()
        if WS:  # (fenced: the stage's shared reads before the TMA that overwrites it)
            fence_async_shared()
            mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), pred=i > 0)
        elif i + STAGES - 1 < num_k:
            _issue_tile(x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem, ready,
                        i + STAGES - 1, k_first, off_m, off_n, BLOCK_K, GROUP, STAGES)  # fmt: skip
        b_smem.store(w)
        fence_async_shared()
        _cta_barrier()
        acc = warpgroup_mma(x_smem.index(s), b_smem.permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    if WS:
        _wgmma_epilogue(acc, bias_ptr, out_ptr, M, N, off_m, off_n, HAS_BIAS, SPLIT, BLOCK_M,
                        BLOCK_N)  # fmt: skip
    else:
        return acc


@gluon.jit
def _wgmma_epilogue(acc, bias_ptr, out_ptr, M, N, off_m, off_n, HAS_BIAS: gl.constexpr,
                    SPLIT: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):  # fmt: skip
    """out (x's dtype, + bias) or, split, this split's fp32 partial."""
    mma_layout: gl.constexpr = acc.type.layout
    offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_layout))
    offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_layout))
    mask = (gl.expand_dims(offs_m, 1) < M) & (gl.expand_dims(offs_n, 0) < N)
    # SPLIT: fp32 partials at out + split * M * N (the launcher sums them and adds the bias)
    offs = gl.program_id(2) * M * N + gl.expand_dims(offs_m, 1) * N + gl.expand_dims(offs_n, 0)
    if SPLIT > 1:
        gl.store(out_ptr + offs, acc, mask=mask)
    else:
        if HAS_BIAS:
            bias = gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)
            acc = acc + gl.expand_dims(bias, 0)
        gl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def _w4a16_wgmma_kernel(
    x_desc, w_desc, s_desc, o_desc, bias_ptr, out_ptr, M, N, K,
    GROUP: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT: gl.constexpr, STAGES: gl.constexpr,
    num_warps: gl.constexpr, WS: gl.constexpr = False,
):  # fmt: skip
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[1]
    WORDS: gl.constexpr = BLOCK_K // 8
    dtype: gl.constexpr = x_desc.dtype
    # m fastest: the programs that share a W tile run together (its second read hits L2)
    off_m = gl.program_id(0) * BLOCK_M
    off_n = gl.program_id(1) * BLOCK_N
    k_first = gl.program_id(2) * (K // SPLIT)
    num_k = (K // SPLIT) // BLOCK_K

    x_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, WORDS, BLOCK_N], w_desc.layout)
    s_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N], s_desc.layout)
    o_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N], o_desc.layout)
    b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], dtype)
    b_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_K], b_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    if WS:  # one producer warp issues the TMA (24 registers); these warps consume
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(empty.index(i), count=1)
        gl.warp_specialize(
            [(_wgmma_consume, (x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem,
                               b_smem, ready, empty, k_first, off_m, off_n, num_k, bias_ptr,
                               out_ptr, M, N, HAS_BIAS, SPLIT, BLOCK_M, BLOCK_N, BLOCK_K, GROUP,
                               STAGES, True, num_warps)),
             (_wgmma_produce, (x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem,
                               ready, empty, k_first, off_m, off_n, num_k, BLOCK_K, GROUP,
                               STAGES))],
            [1], [24],
        )  # fmt: skip
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(empty.index(i))
    else:  # (`empty` unused: ready stands in for it)
        acc = _wgmma_consume(x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem,
                             b_smem, ready, ready, k_first, off_m, off_n, num_k, bias_ptr,
                             out_ptr, M, N, HAS_BIAS, SPLIT, BLOCK_M, BLOCK_N, BLOCK_K, GROUP,
                             STAGES, False, num_warps)  # fmt: skip
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))

    if not WS:
        _wgmma_epilogue(acc, bias_ptr, out_ptr, M, N, off_m, off_n, HAS_BIAS, SPLIT, BLOCK_M,
                        BLOCK_N)  # fmt: skip


# "wgmma_rs": W from registers. Per pair of codes (k = 2t, 2t + 1 of byte t of a word, t the
# lane's quad index in wgmma's A operand layout), a 16-bit float pair: PRMT puts byte t under
# both halves' magic exponents, the mask keeps the low nibble (1024 + c) and the high nibble
# (64 + c: 64's ulp is 1/16, so the nibble's place is worth 1), then (pair - magic) * s + o.
# bf16 has no such exponent for the high nibble: the word shifted by 4 supplies it.
_RS_ASM_FP16 = gl.constexpr("""{ .reg .b32 m, r;
mov.b32 m, 0x54006400;
prmt.b32 r, $1, m, $3;
and.b32 r, r, 0xFFF0FF0F;
sub.f16x2 r, r, m;
fma.rn.f16x2 $0, r, $5, $6; }""")
_RS_ASM_BF16 = gl.constexpr("""{ .reg .b32 m, r, h;
mov.b32 m, 0x43004300;
shr.b32 h, $1, 4;
prmt.b32 r, $1, h, $3;
lop3.b32 r, r, 0x000F000F, m, 0xEA;
sub.rn.bf16x2 r, r, m;
fma.rn.bf16x2 $0, r, $5, $6; }""")


@gluon.constexpr_function
def _rs_unpack_layout(words, block_n, num_warps):
    """[WORDS, BLOCK_N, 8] (word, n, nibble) such that permute (1, 0, 2) and a reshape to
    [BLOCK_N, BLOCK_K] give wgmma's register A layout (k_width 2): lane 4g + t of warp w holds
    rows 16w + g (+ 8) and, per 16 k, nibbles 2t, 2t + 1 of the block's two words."""
    reg = [[0, 0, 1], [0, 8, 0]] + [[1 << b, 0, 0] for b in range(words.bit_length() - 1)]
    lane = [[0, 0, 2], [0, 0, 4], [0, 1, 0], [0, 2, 0], [0, 4, 0]]
    warp = [[0, 16 << b, 0] for b in range(num_warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [words, block_n, 8])


@gluon.jit
def _rs_unpack(w_stage, s_stage, o_stage, sel, ASM: gl.constexpr, P3: gl.constexpr,
               a_layout: gl.constexpr):  # fmt: skip
    """One stage's words, scale and offset rows -> W's [BLOCK_N, BLOCK_K] tile in wgmma's
    register operand layout."""
    WORDS: gl.constexpr = w_stage.shape[0]
    BLOCK_N: gl.constexpr = w_stage.shape[1]
    WL: gl.constexpr = gl.SliceLayout(2, P3)
    SL: gl.constexpr = gl.SliceLayout(0, WL)
    words = gl.expand_dims(w_stage.load(WL), 2)  # [WORDS, BLOCK_N, 1]
    sv = gl.expand_dims(gl.expand_dims(s_stage.reshape([BLOCK_N]).load(SL), 0), 2)
    ov = gl.expand_dims(gl.expand_dims(o_stage.reshape([BLOCK_N]).load(SL), 0), 2)
    a = gl.inline_asm_elementwise(
        ASM, "=r,r,r,r,r,r,r", [words, sel, sv, ov], dtype=sv.dtype, is_pure=True, pack=2
    )
    a = gl.reshape(gl.permute(a, (1, 0, 2)), [BLOCK_N, 8 * WORDS])
    return gl.convert_layout(a, a_layout, assert_trivial=True)


@gluon.jit
def _rs_consume(x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem, ready, empty,
                k_first, off_m, off_n, num_k, bias_ptr, out_ptr, M, N, HAS_BIAS: gl.constexpr,
                SPLIT: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                BLOCK_K: gl.constexpr, GROUP: gl.constexpr, STAGES: gl.constexpr,
                WS: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """The K loop and the store. Without WS these warps also issue the TMA; with WS they
    hand each stage back to the producer warp through `empty`."""
    dtype: gl.constexpr = x_desc.dtype
    P3: gl.constexpr = _rs_unpack_layout(BLOCK_K // 8, BLOCK_N, num_warps)
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_M, 16]
    )
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=2)
    # PRMT selectors: byte t = nibble // 2 of the word (fp16: under the magic bytes)
    quad = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(0, P3))) // 2
    FP16: gl.constexpr = dtype == gl.float16
    ASM: gl.constexpr = _RS_ASM_FP16 if FP16 else _RS_ASM_BF16
    sel = gl.expand_dims(gl.expand_dims((0x7050 if FP16 else 0x400) + quad * 0x101, 0), 0)
    acc = gl.zeros((BLOCK_N, BLOCK_M), dtype=gl.float32, layout=mma_layout)
    if not WS:
        for t in gl.static_range(STAGES):
            if t < num_k:
                _issue_tile(x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem,
                            ready, t, k_first, off_m, off_n, BLOCK_K, GROUP, STAGES)  # fmt: skip
    mbarrier.wait(ready.index(0), 0)
    a = _rs_unpack(w_smem.index(0), s_smem.index(0), o_smem.index(0), sel, ASM, P3, a_layout)
    for i in range(num_k):
        s = i % STAGES
        acc = warpgroup_mma(a, x_smem.index(s).permute((1, 0)), acc, is_async=True)
        if not WS:
            # Both warpgroups waited for tile i - 1's wgmma last iteration: its stage is free.
            _cta_barrier()
            if (i > 0) & (i - 1 + STAGES < num_k):
                _issue_tile(x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem,
                            ready, i - 1 + STAGES, k_first, off_m, off_n, BLOCK_K, GROUP,
                            STAGES)  # fmt: skip
        # Tile i + 1 unpacks while tile i's wgmma runs. Its registers must differ from those
        # the wgmma reads: ptxas keeps them apart only between the wgmma and a wait that
        # covers it, so the wait is for 0 outstanding (waiting for 1 let it reuse them).
        if i + 1 < num_k:
            s1 = (i + 1) % STAGES
            mbarrier.wait(ready.index(s1), ((i + 1) // STAGES) & 1)
            a = _rs_unpack(w_smem.index(s1), s_smem.index(s1), o_smem.index(s1), sel, ASM, P3,
                           a_layout)  # fmt: skip
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        if WS:  # (every warp is done with stage s: its words and x)
            _cta_barrier()
            mbarrier.arrive(empty.index(s))

    offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma_layout))
    offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma_layout))
    mask = (gl.expand_dims(offs_n, 1) < N) & (gl.expand_dims(offs_m, 0) < M)
    offs = gl.program_id(2) * M * N + gl.expand_dims(offs_m, 0) * N + gl.expand_dims(offs_n, 1)
    if SPLIT > 1:
        gl.store(out_ptr + offs, acc, mask=mask)
    else:
        if HAS_BIAS:
            bias = gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)
            acc = acc + gl.expand_dims(bias, 1)
        gl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def _w4a16_wgmma_rs_kernel(
    x_desc, w_desc, s_desc, o_desc, bias_ptr, out_ptr, M, N, K,
    GROUP: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT: gl.constexpr, STAGES: gl.constexpr,
    num_warps: gl.constexpr, WS: gl.constexpr = False,
):  # fmt: skip
    """out^T [BLOCK_N, BLOCK_M] = W x^T: W unpacked straight into wgmma's register operand
    (16 rows a warp), x's TMA tile the shared-memory operand; no shared-memory round trip.
    WS: one producer warp issues the TMA."""
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[1]
    WORDS: gl.constexpr = BLOCK_K // 8
    dtype: gl.constexpr = x_desc.dtype
    off_m = gl.program_id(0) * BLOCK_M
    off_n = gl.program_id(1) * BLOCK_N
    k_first = gl.program_id(2) * (K // SPLIT)
    num_k = (K // SPLIT) // BLOCK_K

    x_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, WORDS, BLOCK_N], w_desc.layout)
    s_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N], s_desc.layout)
    o_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N], o_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    if WS:
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(empty.index(i), count=1)
        gl.warp_specialize(
            [(_rs_consume, (x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem,
                            ready, empty, k_first, off_m, off_n, num_k, bias_ptr, out_ptr, M, N,
                            HAS_BIAS, SPLIT, BLOCK_M, BLOCK_N, BLOCK_K, GROUP, STAGES, True,
                            num_warps)),
             (_wgmma_produce, (x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem,
                               ready, empty, k_first, off_m, off_n, num_k, BLOCK_K, GROUP,
                               STAGES))],
            [1], [24],
        )  # fmt: skip
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(empty.index(i))
    else:  # (`empty` unused: ready stands in for it)
        _rs_consume(x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem, ready, ready,
                    k_first, off_m, off_n, num_k, bias_ptr, out_ptr, M, N, HAS_BIAS, SPLIT,
                    BLOCK_M, BLOCK_N, BLOCK_K, GROUP, STAGES, False, num_warps)  # fmt: skip
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))


def _row_stride(t: torch.Tensor) -> int:
    """The row stride TMA is given. A single row (per-channel scales, whose stride torch may
    report as 1) is never stepped over, so the row's length rounded up to 16 bytes serves."""
    if t.shape[0] > 1:
        return t.stride(0)
    per16 = 16 // t.element_size()
    return -(-t.shape[1] // per16) * per16


def _aligned(t: torch.Tensor) -> bool:
    """TMA: a 16-byte aligned base and row stride, the last dimension contiguous."""
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (_row_stride(t) * size) % 16 == 0


def fits(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> bool:
    """Whether TMA can read the packed weight in place (x is copied if it cannot)."""
    return _aligned(qweight) and _aligned(scales) and _aligned(offsets)


@functools.cache
def _layouts(bm: int, bk: int, dtype: torch.dtype):
    """The descriptors' shared layouts (x's swizzled tile; unswizzled words and scale rows),
    made once: building them took 18 of the launch's 28 us of Python (CPU machine)."""
    gdt = gl.float16 if dtype == torch.float16 else gl.bfloat16
    return (
        gl.NVMMASharedLayout.get_default_for([bm, bk], gdt),
        gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2),
        gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2),
    )


def launch(
    cfg: KernelConfig,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
    group: int,
    out: torch.Tensor,
) -> None:
    """out [M, N] (x's dtype, split 1) or fp32 partials [split, M, N] (no bias) for x [M, K]."""
    m, k = x.shape
    n = qweight.shape[1]
    if not _aligned(x):
        x = x.contiguous()
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    x_layout, flat32, flat16 = _layouts(bm, bk, x.dtype)
    x_desc = TensorDescriptor(x, [m, k], [_row_stride(x), 1], [bm, bk], x_layout)
    w_desc = TensorDescriptor(
        qweight, [k // 8, n], [_row_stride(qweight), 1], [bk // 8, bn], flat32
    )
    rows = scales.shape[0]
    s_desc = TensorDescriptor(scales, [rows, n], [_row_stride(scales), 1], [1, bn], flat16)
    o_desc = TensorDescriptor(offsets, [rows, n], [_row_stride(offsets), 1], [1, bn], flat16)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), cfg.split_k)
    if cfg.kernel in ("wgmma_rs", "wgmma_rs_ws"):
        _w4a16_wgmma_rs_kernel[grid](
            x_desc, w_desc, s_desc, o_desc, bias if bias is not None else out, out, m, n, k,
            GROUP=group, HAS_BIAS=bias is not None, SPLIT=cfg.split_k, STAGES=cfg.num_stages,
            num_warps=cfg.num_warps, WS=cfg.kernel == "wgmma_rs_ws",
        )  # fmt: skip
        return
    _w4a16_wgmma_kernel[grid](
        x_desc, w_desc, s_desc, o_desc, bias if bias is not None else out, out, m, n, k,
        GROUP=group, HAS_BIAS=bias is not None, SPLIT=cfg.split_k, STAGES=cfg.num_stages,
        num_warps=cfg.num_warps, WS=_WS, **({"maxnreg": _WS_MAXNREG} if _WS and _WS_MAXNREG else {}),
    )  # fmt: skip


def unpack_tile_reference(words: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor):
    """The kernel's unpacking in torch, step for step: words [WORDS, N] int32 and one scale /
    offset row [N] -> the [N, 8 * WORDS] tile it stores (k = 8 * word + nibble)."""
    dtype = scales.dtype
    magic_bits, magic = (0x6400, 1024.0) if dtype == torch.float16 else (0x4300, 128.0)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    codes = ((words[:, :, None] >> shifts) & 0xF) | magic_bits  # [WORDS, N, 8]
    c = codes.to(torch.int16).view(dtype) - torch.tensor(magic, dtype=dtype)
    w = c * scales[None, :, None] + offsets[None, :, None]
    return w.permute(1, 0, 2).reshape(words.shape[1], -1)
