"""W4A16 "wgmma_rs" kernels (Hopper, M >= 16): a Gluon GEMM that unpacks each int4 weight tile
straight into wgmma's register operand while the tensor cores run the previous tile.

Gluon is Triton's dialect with explicit layouts, shared memory, TMA and asynchronous wgmma.
The kernel computes out^T = W x^T: the dequantized W is wgmma's A operand, held in registers in
the layout the instruction reads (16 rows a warp), and x's TMA tile is the shared-memory B
operand, so x's rows are the instruction's N side (8 to 256) and nothing goes back to shared
memory. Per K tile:
- TMA brings x [BLOCK_M, BLOCK_K], the words [BLOCK_K / 8, BLOCK_N] and the group's scale and
  offset rows into a ring of `num_stages` buffers (one mbarrier each), issued by the compute
  warps ("wgmma_rs") or by one producer warp ("wgmma_rs_ws", `gl.warp_specialize`);
- lane 4g + t of a warp needs, of each word of its rows, byte t (k = 2t and 2t + 1 of the word's
  8): one PRMT places it under two 16-bit floats' exponents, a mask keeps one nibble in each,
  and (pair - magic) * scale + offset finishes two weights in two more packed instructions;
- (`PAIRS`, up to 128 x rows: `_pairs`) a lane loads its words two rows at a time, rows
  2g and 2g + 1 of its warp's 16 (adjacent in shared memory: one LDS.64 for two LDS.32),
  relabelled as the rows g and g + 8 the operand layout gives it; the epilogue maps the
  accumulator's rows back (2-12% faster in 24 of 29 probe configs on the H100, session 38);
- tile i + 1 unpacks while tile i's wgmma runs;
- (SUB = 2, `w4a16._SUBTILES`: BLOCK_K twice the group) a TMA stage holds two groups, whose
  sub-tiles unpack and multiply one after the other: the same wgmmas in the same order as
  half the BLOCK_K, with half the copies, barriers and waits.
The K loop is unrolled twice, so two register tiles of W alternate (one loop step copied the
next tile into the registers the wgmma reads). Split K writes fp32 partials, which
`w4a16.launch` sums. (The last program of a tile summing them, and programmatic dependent
launch with the weights requested before griddepcontrol.wait, showed no gain in a 16-layer
decode step on the H100, session 37; commit a47c7ab holds both.)
W4A8 (`W4A8`, int8 activations, `lowering/w4a8.py`'s "wgmma_rs", up to 128 x rows): the same
pipeline on int8 x and the int8 (q - z) * s2 (`_RS8_ASM`), IGMMA with an int32 accumulator.
Gluon does not run in Triton's interpreter: the CPU tests compile it for sm_90 (with Triton 3.6
and the installed one; two Gluon names differ between them, see `_tma_load`) and check its
unpacking bit for bit in torch (`unpack_pairs_reference`); its numbers are checked by gpu tests
(so far on Triton 3.6).
The thirty-fifth session's "wgmma" kernel (W^T unpacked into shared memory, commit b21d7f3)
lost to this one at every shape and M it was shipped for (`results/session36/`).
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from qcompile.lowering.autotune import KernelConfig
from qcompile.lowering.w4a16 import _wgmma_sub

# TMA global -> shared: `async_copy_global_to_shared` up to Triton 3.6, `async_load` later
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
# a CTA-wide barrier: `thread_barrier` up to Triton 3.6, `barrier` later
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


@gluon.constexpr_function
def _row_slots(row_bytes):
    """Scale (offset) row slots a stage takes: TMA writes shared memory at 128-byte aligned
    addresses, so a row shorter than that (W4A8's uint8 rows at BLOCK_N = 64) is followed by
    unused ones (64-byte stages gave "misaligned address" on the H100)."""
    return max(1, 128 // row_bytes)


@gluon.jit
def _row_stage(rows_smem, s, STAGES: gl.constexpr):
    """Stage s's scale (offset) row: slot s * `_row_slots`."""
    return rows_smem.index(s * (rows_smem.shape[0] // STAGES))


@gluon.jit
def _issue_tile(x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem, ready, t, k_first,
                off_m, off_n, BLOCK_K: gl.constexpr, GROUP: gl.constexpr,
                STAGES: gl.constexpr):  # fmt: skip
    """TMA for K tile t (from k_first) into stage t % STAGES: x, the words, scale and offset."""
    s = t % STAGES
    bar = ready.index(s)
    k = k_first + t * BLOCK_K
    nbytes: gl.constexpr = (
        x_desc.block_type.nbytes + w_desc.block_type.nbytes + 2 * s_desc.block_type.nbytes
    )
    mbarrier.expect(bar, nbytes)
    _tma_load(x_desc, [off_m, k], bar, x_smem.index(s))
    _tma_load(w_desc, [k // 8, off_n], bar, w_smem.index(s))
    _tma_load(s_desc, [k // GROUP, off_n], bar, _row_stage(s_smem, s, STAGES))
    _tma_load(o_desc, [k // GROUP, off_n], bar, _row_stage(o_smem, s, STAGES))


@gluon.jit
def _wgmma_produce(x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem, ready, empty,
                   k_first, off_m, off_n, num_k, BLOCK_K: gl.constexpr, GROUP: gl.constexpr,
                   STAGES: gl.constexpr):  # fmt: skip
    """WS: the producer warp. It fills stage t % STAGES once the consumers have freed it (the
    first STAGES pass at once)."""
    for t in range(num_k):
        mbarrier.wait(empty.index(t % STAGES), ((t // STAGES) & 1) ^ 1)
        _issue_tile(x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem, ready, t,
                    k_first, off_m, off_n, BLOCK_K, GROUP, STAGES)  # fmt: skip


# Per pair of codes (k = 2t, 2t + 1: byte t of a word, t the lane's quad index in wgmma's A
# operand layout), a pair of 16-bit floats. fp16: PRMT puts byte t under both halves' magic
# exponents, the mask keeps the low nibble in the low half (1024 + c) and the high nibble in
# the high half (64 + c: 64's ulp is 1/16, so the nibble's place is worth 1). bf16 has no such
# exponent for the high nibble: the word shifted right by 4 supplies it (128 + c in both
# halves). Then (pair - magic) * scale + offset, exact up to the FMA's one rounding.
# `unpack_pairs_reference` builds the same bits from these constants.
_RS_MAGIC = {"fp16": 0x54006400, "bf16": 0x43004300}
_RS_MASK = {"fp16": 0xFFF0FF0F, "bf16": 0x000F000F}


def _rs_selector(dtype: str, t: int) -> int:
    """PRMT's selector for byte t: fp16 picks (byte t, magic byte 5, byte t, magic byte 7) of
    (word, magic); bf16 (byte t, -, byte t of word >> 4, -)."""
    return 0x7050 + 0x101 * t if dtype == "fp16" else 0x400 + 0x101 * t


_RS_SEL0_FP16 = gl.constexpr(_rs_selector("fp16", 0))  # (+ 0x101 * t)
_RS_SEL0_BF16 = gl.constexpr(_rs_selector("bf16", 0))
_RS_ASM_FP16 = gl.constexpr(f"""{{ .reg .b32 m, r;
mov.b32 m, {_RS_MAGIC["fp16"]:#x};
prmt.b32 r, $1, m, $3;
and.b32 r, r, {_RS_MASK["fp16"]:#x};
sub.f16x2 r, r, m;
fma.rn.f16x2 $0, r, $5, $6; }}""")
_RS_ASM_BF16 = gl.constexpr(f"""{{ .reg .b32 m, r, h;
mov.b32 m, {_RS_MAGIC["bf16"]:#x};
shr.b32 h, $1, 4;
prmt.b32 r, $1, h, $3;
lop3.b32 r, r, {_RS_MASK["bf16"]:#x}, m, 0xEA;
sub.rn.bf16x2 r, r, m;
fma.rn.bf16x2 $0, r, $5, $6; }}""")


@gluon.constexpr_function
def _rs_unpack_layout(words, block_n, num_warps):
    """[WORDS, BLOCK_N, 8] (word, n, nibble) such that permute (1, 0, 2) and a reshape to
    [BLOCK_N, BLOCK_K] give wgmma's register A layout (k_width 2): lane 4g + t of warp w holds
    rows 16w + g (+ 8) and, per 16 k, nibbles 2t, 2t + 1 of the block's two words."""
    reg = [[0, 0, 1], [0, 8, 0]] + [[1 << b, 0, 0] for b in range(words.bit_length() - 1)]
    lane = [[0, 0, 2], [0, 0, 4], [0, 1, 0], [0, 2, 0], [0, 4, 0]]
    warp = [[0, 16 << b, 0] for b in range(num_warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [words, block_n, 8])


@gluon.constexpr_function
def _rs8_unpack_layout(words, block_n, num_warps):
    """W4A8: [WORDS, BLOCK_N, 8] (word, n, byte) such that permute (1, 0, 2) and a reshape to
    [BLOCK_N, BLOCK_K] give wgmma's 8-bit register A layout (k_width 4): lane 4g + t holds
    rows 16w + g (+ 8) and, per 32 k, k = 4t..4t + 3 and 16 + 4t..: of the 4 words of a row
    in those 32 k, word t // 2 (and 2 + t // 2), its even (t even) or odd nibbles, i.e. x's k
    in even / odd order per 8 (`to_even_odd(x, 8)`); 4 bytes a register (pack 4)."""
    reg = [[0, 0, 1], [0, 0, 2], [0, 8, 0], [2, 0, 0]]
    reg += [[4 << b, 0, 0] for b in range(words.bit_length() - 3)]
    lane = [[0, 0, 4], [1, 0, 0], [0, 1, 0], [0, 2, 0], [0, 4, 0]]
    warp = [[0, 16 << b, 0] for b in range(num_warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [words, block_n, 8])


# W4A8: a word's even (shift 0) or odd (shift 4) nibbles as 4 bytes, times s2 (q * s2 <= 240:
# no carries between bytes), minus z * s2 byte by byte without borrows between them
# (Hacker's Delight: ((a | H) - (b & ~H)) ^ (~(a ^ b) & H), H the bytes' top bits): the int8
# (q - z) * s2, which QoQ keeps in -127..127. `unpack_int8_reference` does the same in torch.
_RS8_H = 0x80808080
_RS8_ASM = gl.constexpr(f"""{{ .reg .b32 a, t, u;
shr.b32 a, $1, $2;
and.b32 a, a, 0x0F0F0F0F;
mul.lo.u32 a, a, $3;
or.b32 t, a, {_RS8_H:#x};
and.b32 u, $4, {~_RS8_H & 0xFFFFFFFF:#x};
sub.u32 t, t, u;
xor.b32 u, a, $4;
not.b32 u, u;
and.b32 u, u, {_RS8_H:#x};
xor.b32 $0, t, u; }}""")


@gluon.constexpr_function
def _rs_pair_layouts(words, block_n, num_warps, w4a8):
    """PAIRS: the words [WORDS, BLOCK_N] and a scale row [BLOCK_N] as loaded, lane 4g + t
    reading rows 2g and 2g + 1 of its warp's 16 (adjacent: one 64-bit load per word). A
    lane's words are `_rs_unpack_layout`'s (all of its rows') or, W4A8, `_rs8_unpack_layout`'s
    (lane bit 1, t // 2, is a word bit there)."""
    warp = [[16 << b] for b in range(num_warps.bit_length() - 1)]
    lane = [[0], [0], [2], [4], [8]]
    row = gl.DistributedLinearLayout([[1]], lane, warp, [], [block_n])
    if w4a8:
        reg = [[0, 1]] + [[2 << b, 0] for b in range(words.bit_length() - 2)]
        lanes = [[0, 0], [1, 0]] + [[0, r[0]] for r in lane[2:]]
    else:
        reg = [[0, 1]] + [[1 << b, 0] for b in range(words.bit_length() - 1)]
        lanes = [[0, r[0]] for r in lane]
    both = gl.DistributedLinearLayout(reg, lanes, [[0, w[0]] for w in warp], [], [words, block_n])
    return both, row


@gluon.jit
def _pairs_to_rows(t, WORDS: gl.constexpr, N: gl.constexpr):
    """Relabel the last dimension (N) of a PAIRS-loaded tensor ([WORDS, N], or [N] when
    WORDS is 0): row 16a + 2g + b is called 16a + 8b + g, the row wgmma's operand layout gives
    its lane (no data moves)."""
    if WORDS == 0:
        r = t.reshape([N // 16, 8, 2]).permute((0, 2, 1)).reshape([N])
    else:
        r = t.reshape([WORDS, N // 16, 8, 2]).permute((0, 1, 3, 2)).reshape([WORDS, N])
    return r


@gluon.jit
def _flat(row, BLOCK_N: gl.constexpr):
    """A scale (offset) row as [BLOCK_N]: a stage's [1, BLOCK_N] reshaped, a `_sub_row` as is."""
    if len(row.shape) == 2:
        row = row.reshape([BLOCK_N])
    return row


@gluon.jit
def _sub_row(rows, r: gl.constexpr):
    """Row r of a stage's [SUB, BLOCK_N] scale (offset) rows, as a [BLOCK_N] view (a subslice
    of the flattened rows: Gluon cannot reshape a subslice, so the flattening comes first)."""
    SUB: gl.constexpr = rows.shape[0]
    BLOCK_N: gl.constexpr = rows.shape[1]
    return rows.reshape([SUB * BLOCK_N]).slice(r * BLOCK_N, BLOCK_N)


@gluon.jit
def _sub_tile(w_smem, s_smem, o_smem, s, r: gl.constexpr, STAGES: gl.constexpr,
              SUB: gl.constexpr):  # fmt: skip
    """Stage s's words, scale and offset rows of its sub-tile r (SUB > 1: `_SUBTILES`; else
    the whole stage)."""
    w = w_smem.index(s)
    sc = _row_stage(s_smem, s, STAGES)
    of = _row_stage(o_smem, s, STAGES)
    if SUB > 1:
        WORDS: gl.constexpr = w.shape[0] // SUB
        w = w.slice(r * WORDS, WORDS, dim=0)
        sc = _sub_row(sc, r)
        of = _sub_row(of, r)
    return w, sc, of


@gluon.jit
def _load_rows(w_stage, s_stage, o_stage, P3: gl.constexpr, PAIRS: gl.constexpr,
               W4A8: gl.constexpr):  # fmt: skip
    """One stage's words [WORDS, BLOCK_N] and scale / offset rows [BLOCK_N] in the slices of
    the unpacking layout P3 (PAIRS: loaded two rows at a time and relabelled,
    `_pairs_to_rows`)."""
    WORDS: gl.constexpr = w_stage.shape[0]
    BLOCK_N: gl.constexpr = w_stage.shape[1]
    WL: gl.constexpr = gl.SliceLayout(2, P3)
    SL: gl.constexpr = gl.SliceLayout(0, WL)
    if PAIRS:
        BOTH: gl.constexpr = _rs_pair_layouts(WORDS, BLOCK_N, gl.num_warps(), W4A8)
        w2 = _pairs_to_rows(w_stage.load(BOTH[0]), WORDS, BLOCK_N)
        s1 = _pairs_to_rows(_flat(s_stage, BLOCK_N).load(BOTH[1]), 0, BLOCK_N)
        o1 = _pairs_to_rows(_flat(o_stage, BLOCK_N).load(BOTH[1]), 0, BLOCK_N)
        w2 = gl.convert_layout(w2, WL, assert_trivial=True)
        s1 = gl.convert_layout(s1, SL, assert_trivial=True)
        o1 = gl.convert_layout(o1, SL, assert_trivial=True)
    else:
        w2 = w_stage.load(WL)
        s1 = _flat(s_stage, BLOCK_N).load(SL)
        o1 = _flat(o_stage, BLOCK_N).load(SL)
    return w2, s1, o1


@gluon.jit
def _rs8_unpack(w_stage, s_stage, z_stage, shift, ASM: gl.constexpr, P3: gl.constexpr,
                a_layout: gl.constexpr, PAIRS: gl.constexpr):  # fmt: skip
    """W4A8: one stage's words and uint8 s2 / z rows -> the int8 (q - z) * s2 tile
    [BLOCK_N, BLOCK_K] in wgmma's 8-bit register operand layout (`shift`: per byte of a word,
    0 for its even nibbles, 4 for its odd ones)."""
    WORDS: gl.constexpr = w_stage.shape[0]
    BLOCK_N: gl.constexpr = w_stage.shape[1]
    w2, s2, z = _load_rows(w_stage, s_stage, z_stage, P3, PAIRS, True)
    words = gl.expand_dims(w2, 2)  # [WORDS, BLOCK_N, 1]
    s2 = s2.to(gl.int32)
    zs2 = z.to(gl.int32) * s2 * 0x01010101  # (4 bytes)
    s2 = gl.expand_dims(gl.expand_dims(s2, 0), 2)
    zs2 = gl.expand_dims(gl.expand_dims(zs2, 0), 2)
    # The inputs go to the operand's layout before the asm: permuting its int8 result instead
    # left LLVM splitting each packed register into bytes and packing them again.
    full = gl.full([WORDS, BLOCK_N, 8], 0, gl.int32, P3)
    words = _to_operand(words + full, a_layout)
    shift = _to_operand(shift + full, a_layout)
    s2 = _to_operand(s2 + full, a_layout)
    zs2 = _to_operand(zs2 + full, a_layout)
    # int32 results (the 4 of a register's group are one asm call, CSE'd): the tile crosses
    # the loop's back edge as packed words; `_as_int8` turns them into the operand's bytes
    # right at the wgmma (int8 values across the back edge went through 16-bit registers,
    # split and packed again)
    return gl.inline_asm_elementwise(
        ASM, "=r,r,r,r,r", [words, shift, s2, zs2], dtype=gl.int32, is_pure=True, pack=1
    )


@gluon.jit
def _as_int8(a):
    """The packed int32 operand tile (4 equal values a group) as the int8 operand."""
    return gl.inline_asm_elementwise(
        "mov.b32 $0, $1;", "=r,r,r,r,r", [a], dtype=gl.int8, is_pure=True, pack=4
    )


@gluon.jit
def _to_operand(t, a_layout: gl.constexpr):
    """[WORDS, BLOCK_N, 8] (word, n, k in word) -> [BLOCK_N, BLOCK_K] in `a_layout` (no data
    moves)."""
    W: gl.constexpr = t.shape[0]
    N: gl.constexpr = t.shape[1]
    t = gl.reshape(gl.permute(t, (1, 0, 2)), [N, 8 * W])
    return gl.convert_layout(t, a_layout, assert_trivial=True)


@gluon.jit
def _rs16_unpack(w_stage, s_stage, o_stage, sel, ASM: gl.constexpr, P3: gl.constexpr,
                 a_layout: gl.constexpr, PAIRS: gl.constexpr):  # fmt: skip
    """One stage's words, scale and offset rows -> W's [BLOCK_N, BLOCK_K] tile in wgmma's
    register operand layout (PAIRS: with W's rows relabelled, `_pairs_to_rows`)."""
    w2, s1, o1 = _load_rows(w_stage, s_stage, o_stage, P3, PAIRS, False)
    words = gl.expand_dims(w2, 2)  # [WORDS, BLOCK_N, 1]
    sv = gl.expand_dims(gl.expand_dims(s1, 0), 2)
    ov = gl.expand_dims(gl.expand_dims(o1, 0), 2)
    a = gl.inline_asm_elementwise(
        ASM, "=r,r,r,r,r,r,r", [words, sel, sv, ov], dtype=sv.dtype, is_pure=True, pack=2
    )
    return _to_operand(a, a_layout)


@gluon.jit
def _rs_unpack(w_stage, s_stage, o_stage, sel, ASM: gl.constexpr, P3: gl.constexpr,
               a_layout: gl.constexpr, PAIRS: gl.constexpr, W4A8: gl.constexpr):  # fmt: skip
    """W's tile for the next wgmma: `_rs8_unpack` (W4A8) or `_rs16_unpack`."""
    if W4A8:
        a = _rs8_unpack(w_stage, s_stage, o_stage, sel, ASM, P3, a_layout, PAIRS)
    else:
        a = _rs16_unpack(w_stage, s_stage, o_stage, sel, ASM, P3, a_layout, PAIRS)
    return a


@gluon.jit
def _rs_step(acc, a, prev, i, num_k, x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem,
             o_smem, ready, empty, k_first, off_m, off_n, sel, ASM: gl.constexpr,
             P3: gl.constexpr, a_layout: gl.constexpr, BLOCK_K: gl.constexpr,
             GROUP: gl.constexpr, STAGES: gl.constexpr, WS: gl.constexpr, PAIRS: gl.constexpr,
             W4A8: gl.constexpr, PIPE: gl.constexpr, SUB: gl.constexpr,
             SUBI: gl.constexpr):  # fmt: skip
    """Sub-tile i's wgmma on its unpacked W `a`, and sub-tile i + 1's unpacking meanwhile.
    Returns the accumulator, sub-tile i + 1's W (the last one's again after the last) and `a`.
    A K tile (one TMA stage, BLOCK_K) holds SUB sub-tiles of one group each (SUB > 1:
    `_SUBTILES`); SUBI is i mod SUB. PIPE (`_PIPE`): sub-tile i's wgmma is left in flight past
    the step (the next one queues behind it); `prev`, sub-tile i - 1's W, is kept alive until
    the wait that retires its wgmma."""
    KS: gl.constexpr = BLOCK_K // SUB
    t = i // SUB  # (its K tile)
    s = t % STAGES
    xs = x_smem.index(s)
    if SUB > 1:
        xs = xs.slice(SUBI * KS, KS, dim=1)
    if W4A8:
        acc = warpgroup_mma(_as_int8(a), xs.permute((1, 0)), acc, is_async=True)
    else:
        acc = warpgroup_mma(a, xs.permute((1, 0)), acc, is_async=True)
    if PIPE:
        # sub-tile i - 1's wgmma is done: its W registers are free, and at a K tile's first
        # sub-tile, the tile before's stage
        acc, prev = warpgroup_mma_wait(num_outstanding=1, deps=(acc, prev))
        if SUBI == 0:
            _cta_barrier()
            if WS:
                if t > 0:
                    mbarrier.arrive(empty.index((t - 1) % STAGES))
            elif (t > 0) & (t - 1 + STAGES < num_k):
                _issue_tile(x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem,
                            ready, t - 1 + STAGES, k_first, off_m, off_n, BLOCK_K, GROUP,
                            STAGES)  # fmt: skip
    elif (not WS) & (SUBI == 0):
        # Both warpgroups waited for tile t - 1's last wgmma last step: its stage is free.
        _cta_barrier()
        if (t > 0) & (t - 1 + STAGES < num_k):
            _issue_tile(x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem, ready,
                        t - 1 + STAGES, k_first, off_m, off_n, BLOCK_K, GROUP, STAGES)  # fmt: skip
    # Sub-tile i + 1 unpacks while sub-tile i's wgmma runs. Its registers must differ from
    # those the wgmma reads: ptxas keeps them apart only between the wgmma and a wait that
    # covers it, so without PIPE the wait is for 0 outstanding (waiting for 1 let it reuse
    # them: wrong results); PIPE instead names `a` in the next step's wait (its `deps`).
    # (No branch past the last sub-tile: the last step unpacks the last K tile's first
    # sub-tile again, unused; an "a unchanged" path made ptxas copy the tiles.)
    NSUB: gl.constexpr = (SUBI + 1) % SUB
    t1 = gl.minimum(i + 1, num_k * SUB - 1) // SUB
    s1 = t1 % STAGES
    if NSUB == 0:  # the next sub-tile opens a K tile: wait for its stage
        mbarrier.wait(ready.index(s1), (t1 // STAGES) & 1)
    w_next, s_next, o_next = _sub_tile(w_smem, s_smem, o_smem, s1, NSUB, STAGES, SUB)
    b = _rs_unpack(w_next, s_next, o_next, sel, ASM, P3, a_layout, PAIRS, W4A8)
    if not PIPE:
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        if WS & (SUBI == SUB - 1):  # (every warp is done with stage s: its words and x)
            _cta_barrier()
            mbarrier.arrive(empty.index(s))
    return acc, b, a


@gluon.jit
def _rs_consume(x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem, ready, empty,
                k_first, off_m, off_n, num_k, bias_ptr, out_ptr, ws_ptr, M, N,
                HAS_BIAS: gl.constexpr, SPLIT: gl.constexpr, BLOCK_M: gl.constexpr,
                BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP: gl.constexpr,
                STAGES: gl.constexpr, WS: gl.constexpr, PAIRS: gl.constexpr,
                W4A8: gl.constexpr, xs_ptr, s1_ptr, RAW: gl.constexpr, PIPE: gl.constexpr,
                num_warps: gl.constexpr):  # fmt: skip
    """The K loop and the store. Without WS these warps also issue the TMA; with WS they
    hand each stage back to the producer warp through `empty`. W4A8: int8 x and W, int32
    accumulator, then x_scale[m] * s1[n] (split K: the raw int32 partials)."""
    dtype: gl.constexpr = x_desc.dtype
    SUB: gl.constexpr = s_desc.block_type.shape[0]  # (group rows a K tile holds: `_SUBTILES`)
    KS: gl.constexpr = BLOCK_K // SUB
    K_INSTR: gl.constexpr = 32 if W4A8 else 16  # (an 8-bit wgmma takes 32 k, a 16-bit one 16)
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_M, K_INSTR]
    )
    a_layout: gl.constexpr = gl.DotOperandLayout(
        operand_index=0, parent=mma_layout, k_width=K_INSTR // 8
    )
    if W4A8:
        P3: gl.constexpr = _rs8_unpack_layout(KS // 8, BLOCK_N, num_warps)
        # per byte j of a word's 8 (j // 4: its even or odd nibbles): the shift
        half = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(0, P3))) // 4
        sel = gl.expand_dims(gl.expand_dims(half * 4, 0), 0)
        ASM: gl.constexpr = _RS8_ASM
        acc = gl.zeros((BLOCK_N, BLOCK_M), dtype=gl.int32, layout=mma_layout)
    else:
        P3: gl.constexpr = _rs_unpack_layout(KS // 8, BLOCK_N, num_warps)
        # PRMT selectors: byte t = nibble // 2 of the word (fp16: under the magic bytes)
        quad = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(0, P3))) // 2
        FP16: gl.constexpr = dtype == gl.float16
        ASM: gl.constexpr = _RS_ASM_FP16 if FP16 else _RS_ASM_BF16
        SEL0: gl.constexpr = _RS_SEL0_FP16 if FP16 else _RS_SEL0_BF16
        sel = gl.expand_dims(gl.expand_dims(SEL0 + quad * 0x101, 0), 0)
        acc = gl.zeros((BLOCK_N, BLOCK_M), dtype=gl.float32, layout=mma_layout)
    if not WS:  # the first STAGES tiles (fresh stages)
        for t in gl.static_range(STAGES):
            if t < num_k:
                _issue_tile(x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem,
                            ready, t, k_first, off_m, off_n, BLOCK_K, GROUP, STAGES)  # fmt: skip
    mbarrier.wait(ready.index(0), 0)
    w_first, s_first, o_first = _sub_tile(w_smem, s_smem, o_smem, 0, 0, STAGES, SUB)
    a = _rs_unpack(w_first, s_first, o_first, sel, ASM, P3, a_layout, PAIRS, W4A8)
    # Unrolled twice: two register tiles alternate, so the next one is not copied into the
    # registers the wgmma reads (16 moves per 64-k tile). On the H100 this took 28672x4096
    # M = 64 from 50.4 to 43.4 us and 8192x28672 M = 16 from 66.4 to 62.1 (session 37).
    # (SUB = 2: the two steps are a K tile's two sub-tiles.)
    num_sub = num_k * SUB
    p = a  # (PIPE: the W tile of the wgmma before; none yet)
    for j in range(num_sub // 2):
        acc, b, p = _rs_step(acc, a, p, 2 * j, num_k, x_desc, w_desc, s_desc, o_desc, x_smem,
                             w_smem, s_smem, o_smem, ready, empty, k_first, off_m, off_n, sel,
                             ASM, P3, a_layout, BLOCK_K, GROUP, STAGES, WS, PAIRS, W4A8,
                             PIPE, SUB, 0)  # fmt: skip
        acc, a, p = _rs_step(acc, b, p, 2 * j + 1, num_k, x_desc, w_desc, s_desc, o_desc,
                             x_smem, w_smem, s_smem, o_smem, ready, empty, k_first, off_m, off_n,
                             sel, ASM, P3, a_layout, BLOCK_K, GROUP, STAGES, WS, PAIRS, W4A8,
                             PIPE, SUB, 1 % SUB)  # fmt: skip
    if num_sub % 2:  # (SUB = 1 only)
        acc, a, p = _rs_step(acc, a, p, num_sub - 1, num_k, x_desc, w_desc, s_desc, o_desc,
                             x_smem, w_smem, s_smem, o_smem, ready, empty, k_first, off_m, off_n,
                             sel, ASM, P3, a_layout, BLOCK_K, GROUP, STAGES, WS, PAIRS, W4A8,
                             PIPE, SUB, 0)  # fmt: skip
    if PIPE:  # the last tile's wgmma
        acc, p = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p))

    rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma_layout))
    if PAIRS:  # accumulator row 16a + 8b + g holds W's row 16a + 2g + b
        rows = rows // 16 * 16 + rows % 8 * 2 + rows // 8 % 2
    offs_n = off_n + rows
    offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma_layout))
    mask = (gl.expand_dims(offs_n, 1) < N) & (gl.expand_dims(offs_m, 0) < M)
    offs = gl.expand_dims(offs_m, 0) * N + gl.expand_dims(offs_n, 1)
    if (SPLIT > 1) | RAW:  # this split's fp32 (W4A8: int32) partial at ws + split * M * N
        gl.store(ws_ptr + gl.program_id(2) * M * N + offs, acc, mask=mask)
    else:
        if W4A8:  # x_scale[m] * s1[n], in fp32
            xs = gl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
            s1 = gl.load(s1_ptr + offs_n, mask=offs_n < N, other=0.0)
            acc = acc.to(gl.float32) * gl.expand_dims(xs, 0) * gl.expand_dims(s1, 1)
        if HAS_BIAS:
            bias = gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)
            acc = acc + gl.expand_dims(bias, 1)
        gl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def _w4a16_wgmma_rs_kernel(
    x_desc, w_desc, s_desc, o_desc, bias_ptr, out_ptr, ws_ptr, M, N, K,
    GROUP: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT: gl.constexpr, STAGES: gl.constexpr,
    num_warps: gl.constexpr, WS: gl.constexpr = False, PAIRS: gl.constexpr = False,
    W4A8: gl.constexpr = False, xs_ptr=None, s1_ptr=None, RAW: gl.constexpr = False,
    PIPE: gl.constexpr = False,
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
    SLOTS: gl.constexpr = STAGES * _row_slots(s_desc.block_type.nbytes)
    SUB: gl.constexpr = s_desc.block_type.shape[0]
    s_smem = gl.allocate_shared_memory(s_desc.dtype, [SLOTS, SUB, BLOCK_N], s_desc.layout)
    o_smem = gl.allocate_shared_memory(o_desc.dtype, [SLOTS, SUB, BLOCK_N], o_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    if WS:
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(empty.index(i), count=1)
        gl.warp_specialize(
            [(_rs_consume, (x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem,
                            ready, empty, k_first, off_m, off_n, num_k, bias_ptr, out_ptr,
                            ws_ptr, M, N, HAS_BIAS, SPLIT, BLOCK_M, BLOCK_N, BLOCK_K, GROUP,
                            STAGES, True, PAIRS, W4A8, xs_ptr, s1_ptr, RAW, PIPE, num_warps)),
             (_wgmma_produce, (x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem,
                               ready, empty, k_first, off_m, off_n, num_k, BLOCK_K, GROUP,
                               STAGES))],
            [1], [24],
        )  # fmt: skip
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(empty.index(i))
    else:  # (`empty` unused: ready stands in for it)
        _rs_consume(x_desc, w_desc, s_desc, o_desc, x_smem, w_smem, s_smem, o_smem, ready, ready,
                    k_first, off_m, off_n, num_k, bias_ptr, out_ptr, ws_ptr, M, N, HAS_BIAS,
                    SPLIT, BLOCK_M, BLOCK_N, BLOCK_K, GROUP, STAGES, False, PAIRS, W4A8,
                    xs_ptr, s1_ptr, RAW, PIPE, num_warps)  # fmt: skip
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
    """The descriptors' shared layouts (x's swizzled tile; unswizzled words and scale rows;
    W4A8, x int8: uint8 s2 and z rows), made once: building them took 18 of the launch's 28 us
    of Python (CPU machine)."""
    gdt = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16, torch.int8: gl.int8}[dtype]
    return (
        gl.NVMMASharedLayout.get_default_for([bm, bk], gdt),
        gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2),
        gl.NVMMASharedLayout(
            swizzle_byte_width=0, element_bitwidth=8 if dtype == torch.int8 else 16, rank=2
        ),
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
    ws: torch.Tensor | None = None,
    w4a8: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """out [M, N] (x's dtype, + bias) for x [M, K]. Split K: fp32 partials into ws
    [split, M, N], which the caller sums (and adds the bias).

    `w4a8` = (x_scale [M] fp32, s1 [N] fp32): W4A8, x int8 in even / odd order per 8 k
    (`to_even_odd(xq, 8)`), scales / offsets the uint8 s2 / z; out = (xq @ ((q - z) s2)^T)
    * x_scale * s1 (+ bias), or, split or given `ws` (int32 [split, M, N]), the raw int32
    partials there for the caller to sum and rescale."""
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
    sub = _wgmma_sub(cfg, group)  # (group rows a K tile holds)
    s_desc = TensorDescriptor(scales, [rows, n], [_row_stride(scales), 1], [sub, bn], flat16)
    o_desc = TensorDescriptor(offsets, [rows, n], [_row_stride(offsets), 1], [sub, bn], flat16)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), cfg.split_k)
    split = cfg.split_k > 1
    extra = {}
    if w4a8 is not None:
        if x.dtype != torch.int8 or scales.dtype != torch.uint8:
            raise ValueError("w4a16_wgmma.launch: W4A8 takes int8 x and uint8 s2 / z rows")
        extra = dict(W4A8=True, xs_ptr=w4a8[0], s1_ptr=w4a8[1], RAW=ws is not None)
        split = split or ws is not None
    _w4a16_wgmma_rs_kernel[grid](
        x_desc, w_desc, s_desc, o_desc, bias if bias is not None else out, out,
        ws if split else out, m, n, k, GROUP=group, HAS_BIAS=bias is not None and not split,
        SPLIT=cfg.split_k, STAGES=cfg.num_stages, num_warps=cfg.num_warps,
        WS=cfg.kernel == "wgmma_rs_ws", PAIRS=_pairs(cfg, w4a8 is not None),
        PIPE=_pipe(cfg, w4a8 is not None),
        **extra,
        **({"maxnreg": cfg.max_registers} if cfg.max_registers else {}),
    )  # fmt: skip


# Each tile's wgmma left in flight while the next one is issued (`warpgroup_mma_wait(1)`, the
# in-flight tile's W registers kept alive through the wait's `deps`), instead of waiting for
# it to finish before the next issue: the tensor cores need not drain between K tiles, which
# matters where they bound the kernel (M >= 256, where the H100 ran the kernel at 55-58% of
# its SM throughput; `results/session36/ncu_rs/`). A stage is handed back one step later.
# Timed (session 40, H200, `results/session40/pipe/`): the producer-warp kernel at 256 x rows
# 6-10% faster (e.g. 28672x4096 M = 256 119.6 -> 108.0 us, 8192x28672 M = 1024 794.5 ->
# 748.6); wgmma_rs, 16 x rows and W4A8 level or up to 10% slower. None: there only (`_pipe`);
# True / False: every wgmma kernel or none (tests and probes).
_PIPE: bool | None = None


def _pipe(cfg: KernelConfig, w4a8: bool) -> bool:
    """Whether the kernel leaves each wgmma in flight (`PIPE`): see `_PIPE`."""
    if _PIPE is not None:
        return _PIPE
    return cfg.kernel == "wgmma_rs_ws" and cfg.block_m >= 256 and not w4a8


# W4A8's words loaded in pairs too (the same relabelling on its 8-bit operand layout). On the
# H100 (session 39, `results/session39/w4a8v/`) pairs were faster in 45 of 48 producer-warp
# configs (up to 7%) and level or faster in most wgmma_rs ones (a few split-2 configs lost
# up to 11%), and each shape's best config used them. The gpu tests switch it off to compare.
_W4A8_PAIRS = True


def _pairs(cfg: KernelConfig, w4a8: bool) -> bool:
    """Whether the kernel loads W's rows in pairs (`PAIRS`): up to 128 x rows (W4A8: with
    `_W4A8_PAIRS`). At 256 (128 accumulator registers a thread) the rows' relabelling spilled
    56-120 bytes (Triton 3.6), for +-3% on the H100 (session 38)."""
    return cfg.block_m <= 128 and (_W4A8_PAIRS or not w4a8)


def _prmt(a: torch.Tensor, b: torch.Tensor, sel: int) -> torch.Tensor:
    """PTX prmt.b32 (default mode) on int64 tensors holding 32-bit values."""
    pool = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    return sum(pool[(sel >> (4 * i)) & 7] << (8 * i) for i in range(4))


def unpack_pairs_reference(words: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor):
    """The kernel's unpacking in torch, bit for bit: words [WORDS, N] int32 and one scale /
    offset row [N] (fp16 or bf16) -> W's [N, 8 * WORDS] tile (k = 8 * word + nibble)."""
    dtype = scales.dtype
    name = "fp16" if dtype == torch.float16 else "bf16"
    w = words.to(torch.int64) & 0xFFFFFFFF
    magic = _RS_MAGIC[name]
    halves = []
    for t in range(4):
        if name == "fp16":
            r = _prmt(w, torch.full_like(w, magic), _rs_selector(name, t)) & _RS_MASK[name]
        else:
            r = (_prmt(w, w >> 4, _rs_selector(name, t)) & _RS_MASK[name]) | magic
        for half in (r & 0xFFFF, r >> 16):  # k = 8 * word + 2t, then + 1
            halves.append(half.to(torch.int16).view(dtype))
    pairs = torch.stack(halves, -1)  # [WORDS, N, 8], in k order
    m = torch.tensor([magic & 0xFFFF, magic >> 16], dtype=torch.int32).to(torch.int16).view(dtype)
    codes = (pairs.view(*pairs.shape[:-1], 4, 2) - m).view(pairs.shape)  # exact
    # the FMA: one rounding of c * s + o
    tile = codes.double() * scales.double()[None, :, None] + offsets.double()[None, :, None]
    return tile.to(dtype).permute(1, 0, 2).reshape(words.shape[1], -1)


def unpack_int8_reference(words: torch.Tensor, s2: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """W4A8's unpacking in torch, bit for bit (`_RS8_ASM`): words [WORDS, N] int32, one uint8
    s2 / z row [N] -> the int8 (q - z) * s2 tile [N, 8 * WORDS] in the kernel's k order: per
    word its even nibbles, then its odd ones (`to_even_odd(w, 8)` of the natural order)."""
    mask = 0xFFFFFFFF
    w = words.to(torch.int64) & mask
    s = s2.to(torch.int64)[None, :]
    b = (z.to(torch.int64)[None, :] * s * 0x01010101) & mask
    halves = []
    for shift in (0, 4):
        a = (((w >> shift) & 0x0F0F0F0F) * s) & mask
        t = ((a | _RS8_H) - (b & (~_RS8_H & mask))) & mask
        d = t ^ (~(a ^ b) & _RS8_H)
        halves.append(torch.stack([(d >> (8 * i)) & 0xFF for i in range(4)], -1))
    codes = torch.stack(halves, -2).reshape(w.shape[0], w.shape[1], 8)  # [WORDS, N, 8]
    codes = codes.permute(1, 0, 2).reshape(w.shape[1], 8 * w.shape[0])
    return codes.to(torch.uint8).view(torch.int8)
