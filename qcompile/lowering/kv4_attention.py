"""KV4 Triton kernels: attention reading packed int4 K/V directly, and quantize-on-write.

Cache layout: see `qcompile.quant.kv4` (codes [B, Hkv, S, D/2] uint8, fp16 scales/offsets
[B, Hkv, S, D/G]). No fp16 K or V is ever written to memory.

* `_kv4_attention_kernel`: flash-attention over the int4 cache, GQA-aware: one program owns
  one KV head and a tile of BLOCK_M query *rows*, a row being (query position, query head of
  that KV head's group), so every K/V tile is read once for all the query heads that share it.
  Two launch strategies (`KernelConfig.kernel`):
  - "decode" (Sq * Hq/Hkv rows fit one tile; flash-decoding): the sequence is split over
    `split_k` programs per (batch, KV head), each writes an fp32 partial output and its
    log-sum-exp, and `_kv4_split_reduce_kernel` combines them. Memory-bound: roofline =
    B * Hkv * L * (D + 8 * D / G) bytes (int4 K and V plus fp16 scales/offsets, L = cached
    tokens) / HBM bandwidth, vs B * Hkv * L * 4 * D bytes for fp16 K/V: 3.76x fewer at
    D=128, G=128. The split keeps enough programs in flight to reach that bandwidth at B=1.
  - "prefill" (flash-attention, causal tiles skipped): grid over row tiles; compute-bound
    for long prompts (two dots per tile, like FlashAttention-2, plus int4 unpacking).
  Per tile, per group of G channels: the K codes are dotted with the query *as codes* and
  the scale/offset applied per (row, key) afterwards, since per group
      q . k = scale * (q . codes) + offset * sum(q),
  so K is never dequantized element by element. For V the fp16 scale folds into P instead:
      sum_s p_s v_s = sum_s (p_s * scale_s) codes_s + sum_s p_s offset_s   (per group),
  with p * scale in fp16 after dividing the group's scales by a power of two at least their
  tile maximum (so small scales times small p do not flush to zero), multiplied back after
  the dot. What is left per element is the unpacking: mask or shift, OR, FSUB (exact
  int -> float, see `_unpack_codes`) and a conversion to fp16 per code.
* `_kv4_split_reduce_kernel`: out = sum_i w_i o_i / sum_i w_i, w_i = 2**(lse_i - max lse).
* `_kv4_cache_write_kernel`: one launch quantizes the new K and V tokens (min-max per group,
  rounding exactly as `qcompile.quant.kv4.quantize_kv4`) and stores codes, scales and
  offsets at their cache positions. Memory-bound: reads 2 * B * Hkv * Sn * D 16-bit values.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from qcompile.lowering.autotune import KernelConfig, TuneKey, autotuner, m_bucket, time_us
from qcompile.lowering.w4a16 import _COUNTERS, _interpreting, _tile_counters

DECODE_FAMILY = "kv4_decode"
PREFILL_FAMILY = "kv4_prefill"
_LOG2E = 1.4426950408889634
_MIN_SCALE = tl.constexpr(2.0**-24)  # qcompile.quant.kv4.MIN_SCALE
_NEG_INF = tl.constexpr(float("-inf"))


# Exact int -> float of a nibble without a conversion instruction: OR the code into the
# mantissa of 2**23 and subtract 2**23 (as in lowering/w4a16.py). Also sidesteps the Triton
# interpreter, whose int -> bf16 cast stores the integer as raw bf16 bits.
_MAGIC_BITS = tl.constexpr(0x4B000000)
_MAGIC = tl.constexpr(8388608.0)


@triton.jit
def _unpack_codes(packed, NG: tl.constexpr, ROWS: tl.constexpr, G: tl.constexpr):
    """[NG, ROWS, G/2] uint8 -> [NG, ROWS, G] float32 codes in channel order (even = low)."""
    words = packed.to(tl.int32)
    low = ((words & 0xF) | _MAGIC_BITS).to(tl.float32, bitcast=True) - _MAGIC
    high = ((words >> 4) | _MAGIC_BITS).to(tl.float32, bitcast=True) - _MAGIC
    return tl.reshape(tl.join(low, high), (NG, ROWS, G))


# --------------------------------------------------------------------------- attention
@triton.jit
def _softmax_tile(scores, visible, mask_ptrs, m_i, l_i, MASK_KIND: tl.constexpr):
    """One key tile of the online softmax: scores [BLOCK_M, BLOCK_N] (log2 domain), the
    explicit mask (MASK_KIND 0 none, 1 bool as uint8, 2 additive float, read at mask_ptrs
    where visible) -> (p, alpha = rescale of the running sums, new running max, new l_i)."""
    if MASK_KIND == 1:
        keep = tl.load(mask_ptrs, mask=visible, other=0)
        visible = visible & (keep != 0)
    if MASK_KIND == 2:
        bias = tl.load(mask_ptrs, mask=visible, other=0.0)
        scores += bias.to(tl.float32) * 1.4426950408889634
    scores = tl.where(visible, scores, _NEG_INF)
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == _NEG_INF, 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _cache_slab(kc_ptr, vc_ptr, b, hkv, stride_cb, stride_ch, WIDE: tl.constexpr):
    """(K's codes, V's codes, offset) of one (batch, KV head) slab. WIDE (a cache of 2**31
    bytes or more: B * S >= 4M tokens with 8 KV heads of 128 channels, B = 128 at S = 32k,
    where b * stride_cb in 32 bits wraps): the pointers advance by a 64-bit offset and the
    offset is 0. Otherwise the pointers stay and the offset is 32-bit, as before the wide
    form existed: the wide form, although its loop was the same length offline, ran 5-6%
    slower on the H100 at every decode shape (`results/session27/slab_ab/`)."""
    if WIDE:
        slab = b.to(tl.int64) * stride_cb + hkv * stride_ch
        return kc_ptr + slab, vc_ptr + slab, 0
    else:
        return kc_ptr, vc_ptr, b * stride_cb + hkv * stride_ch


@triton.jit
def _program_tile(pid_bh, pid_m, pid_split, num_splits, lens_ptr, stride_lens, Sq, S,
                  HKV: tl.constexpr, GQA: tl.constexpr, HAS_LENS: tl.constexpr,
                  IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """What one attention program owns: (batch, KV head, the [BLOCK_M] rows' query position,
    query head and validity, the sequence length, and its [start, end) of keys). Row
    r = i * GQA + j is query position i of query head hkv * GQA + j; the split covers
    ceil(keys / splits) rounded up to BLOCK_N, ending at the tile's last causally visible key."""
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos = rows // GQA
    head = hkv * GQA + rows % GQA
    row_ok = pos < Sq

    seq_len = S
    if HAS_LENS:
        seq_len = tl.load(lens_ptr + b * stride_lens).to(tl.int32)
    kv_end = seq_len
    if IS_CAUSAL:  # the tile's last query sits at position seq_len - Sq + pos_max
        pos_max = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GQA, Sq - 1)
        kv_end = tl.minimum(seq_len, seq_len - Sq + pos_max + 1)
    per_split = tl.cdiv(tl.cdiv(kv_end, num_splits), BLOCK_N) * BLOCK_N
    start = pid_split * per_split
    end = tl.minimum(start + per_split, kv_end)
    return b, hkv, pos, head, row_ok, seq_len, start, end


@triton.jit
def _kv4_attention_kernel(
    q_ptr, kc_ptr, ks_ptr, ko_ptr, vc_ptr, vs_ptr, vo_ptr, lens_ptr, mask_ptr, out_ptr, lse_ptr,
    Sq, S, rows_total, qk_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_cb, stride_ch, stride_sb, stride_sh, stride_lens,
    stride_mb, stride_mh, stride_mq, stride_ms,
    HKV: tl.constexpr, GQA: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
    HAS_LENS: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WIDE: tl.constexpr = False,
):  # fmt: skip
    # Rows: r = i * GQA + j is query position i of query head hkv * GQA + j. Output (and the
    # fp32 partials, one [rows_total, D] slab per split) is [B, Hq, Sq, D] contiguous.
    # MASK_KIND: 0 none, 1 bool (as uint8, nonzero = attend), 2 additive float.
    NG: tl.constexpr = D // G
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    b, hkv, pos, head, row_ok, seq_len, start, end = _program_tile(
        pid_bh, pid_m, pid_split, num_splits, lens_ptr, stride_lens, Sq, S, HKV, GQA, HAS_LENS,
        IS_CAUSAL, BLOCK_M, BLOCK_N,
    )  # fmt: skip

    grp = tl.arange(0, NG)[:, None, None]  # [NG, 1, 1]
    ch = tl.arange(0, G)[None, None, :]  # [1, 1, G]: channel grp * G + ch
    q_ptrs = (q_ptr + b * stride_qb + head[None, :, None] * stride_qh
              + pos[None, :, None] * stride_qs + (grp * G + ch) * stride_qd)  # fmt: skip
    q = tl.load(q_ptrs, mask=row_ok[None, :, None], other=0.0)  # [NG, BLOCK_M, G]
    q_sum = tl.sum(q.to(tl.float32), axis=2, keep_dims=True)  # [NG, BLOCK_M, 1]

    m_i = tl.full((BLOCK_M,), _NEG_INF, tl.float32)  # running max, log2 domain
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((NG, BLOCK_M, G), tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    half = tl.arange(0, G // 2)[None, None, :]
    kc_ptr, vc_ptr, slab = _cache_slab(kc_ptr, vc_ptr, b, hkv, stride_cb, stride_ch, WIDE)
    code_base = slab + grp * (G // 2) + half  # [NG, 1, G/2]
    scale_base = b * stride_sb + hkv * stride_sh + grp  # [NG, 1, 1]
    mask_base = mask_ptr + b * stride_mb + head[:, None] * stride_mh + pos[:, None] * stride_mq
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < end
        # a token of a head is D/2 contiguous bytes: [NG, BLOCK_N, G/2] is one contiguous block
        code_offs = code_base + cols[None, :, None] * (D // 2)
        scale_offs = scale_base + cols[None, None, :] * NG  # [NG, 1, BLOCK_N]
        k_codes = _unpack_codes(
            tl.load(kc_ptr + code_offs, mask=col_ok[None, :, None], other=0), NG, BLOCK_N, G
        )
        k_scale = tl.load(ks_ptr + scale_offs, mask=col_ok[None, None, :], other=0.0)
        k_offset = tl.load(ko_ptr + scale_offs, mask=col_ok[None, None, :], other=0.0)
        qk = tl.dot(q, tl.permute(k_codes.to(q.dtype), (0, 2, 1)))  # [NG, BLOCK_M, BLOCK_N]
        qk = qk * k_scale.to(tl.float32) + q_sum * k_offset.to(tl.float32)
        scores = tl.sum(qk, axis=0) * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
        visible = row_ok[:, None] & col_ok[None, :]
        if IS_CAUSAL:
            visible = visible & (cols[None, :] <= (pos + seq_len - Sq)[:, None])
        p, alpha, m_new, l_i = _softmax_tile(
            scores, visible, mask_base + cols[None, :] * stride_ms, m_i, l_i, MASK_KIND
        )

        v_codes = _unpack_codes(
            tl.load(vc_ptr + code_offs, mask=col_ok[None, :, None], other=0), NG, BLOCK_N, G
        )
        v_scale = tl.load(vs_ptr + scale_offs, mask=col_ok[None, None, :], other=0.0)
        v_offset = tl.load(vo_ptr + scale_offs, mask=col_ok[None, None, :], other=0.0)
        # P * scale in fp16 with each group's scales divided by a power of two 2**e >= their
        # tile maximum: the products stay in [0, 2) and never underflow where P alone would
        # not (as FlashAttention's fp16 P); 2**e is exact to multiply back.
        v_scale = v_scale.to(tl.float32)  # [NG, 1, BLOCK_N]
        top = tl.max(v_scale, axis=2, keep_dims=True)  # [NG, 1, 1]
        pow2 = tl.exp2(tl.ceil(tl.log2(tl.maximum(top, _MIN_SCALE))))
        p_scaled = (p[None, :, :] * (v_scale / pow2)).to(tl.float16)  # [NG, BLOCK_M, BLOCK_N]
        pv = tl.dot(p_scaled, v_codes.to(tl.float16))  # [NG, BLOCK_M, G]
        p_offset = tl.sum(p[None, :, :] * v_offset.to(tl.float32), axis=2, keep_dims=True)
        acc = acc * alpha[None, :, None] + pv * pow2 + p_offset
        m_i = m_new

    out_row = (b * HKV * GQA + head) * Sq + pos  # row of the [B, Hq, Sq] output
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[None, :, None]  # rows that saw no key: acc = 0 -> 0
    out_ptrs = (out_ptr + pid_split * rows_total * D
                + out_row[None, :, None] * D + grp * G + ch)  # fmt: skip
    if WRITE_PARTIAL:
        tl.store(out_ptrs, out, mask=row_ok[None, :, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), _NEG_INF)
        tl.store(lse_ptr + pid_split * rows_total + out_row, lse, mask=row_ok)
    else:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[None, :, None])


@triton.jit
def _nibble_planes(codes, BIAS_BITS: tl.constexpr, dtype: tl.constexpr, ASM: tl.constexpr,
                   PINNED: tl.constexpr = False, PLUS16: tl.constexpr = False,
                   CENTER: tl.constexpr = False, SWAP: tl.constexpr = False):  # fmt: skip
    """[N, D/2] uint8 -> (even, odd) channel planes [N, D/2] in dtype, the exact codes: each
    nibble ORed into the mantissa of a bias (fp16 1024: 0x6400, bf16 128: 0x4300) is
    bias + code with no conversion instruction, and subtracting the bias is exact. The bias
    must go before the dot: left in, the tensor cores' fp32 accumulation of ~1024-sized
    products lost ~1e-2 relative on the H100 (BLOCK_N 128-256, S=4100).

    ASM (on the GPU): per 4 bytes in one register, 2 PRMT spread bytes to 16-bit lanes, 4
    LOP3 (+2 shifts) and 4 packed subtractions write 8 codes as 4 fp16x2/bf16x2 registers,
    the form the tensor cores read; Triton's own i16 ops take ~3 instructions per code (sm_90,
    Triton 3.6). The interpreter converts through float32 instead (same values).

    PINNED marks the asm impure, so Triton cannot move a layout conversion of its result
    above it onto the uint8 codes: the MMA operand is then made from the unpacked tile (for
    V, STS + ldmatrix.trans) instead of being gathered byte by byte (sm_90, Triton 3.6: 128
    LDS.U8 + ~96 PRMT per 64-token V tile in one warp).

    PLUS16 returns 16 + code instead, exact and with no subtraction: the nibble shifted to the
    top of the mantissa of 16.0 (fp16 bits 6-9 of 0x4C00, bf16 bits 3-6 of 0x4180); per 4
    bytes 2 PRMT, 4 shifts, 4 LOP3 (BIAS_BITS then only tells fp16 from bf16).

    CENTER returns code - 8 in [-8, 7] (bias + 8 subtracted: BIAS_BITS + 8 is exactly that
    value in both formats, whose ulp there is 1), at no extra instruction.

    SWAP (fp16 only): each group of 4 plane positions holds bytes 0, 2, 1, 3 of its 4 (`_swap`
    gives a position's byte), which needs no byte spreading: per 4 bytes 1 shift, 4 LOP3 (the
    high nibble masked in place, 16 * code above the bias), 2 subtractions and 2 FMAs (x / 16
    - 64) for 8 codes, 9 instructions where the form above takes 12. The caller reads the
    query and writes the output at the swapped channels. The interpreter swaps the natural
    planes (same values, same positions)."""
    FP16: tl.constexpr = BIAS_BITS == 0x6400
    if ASM and PLUS16:
        MASK: tl.constexpr = 0x03C003C0 if FP16 else 0x00780078
        BIAS16: tl.constexpr = 0x4C004C00 if FP16 else 0x41804180
        LO: tl.constexpr = "shl.b32 a, {}, 6" if FP16 else "shl.b32 a, {}, 3"
        HI: tl.constexpr = "shl.b32 a, {}, 2" if FP16 else "shr.u32 a, {}, 1"
        even, odd = tl.inline_asm_elementwise(
            asm=f"""{{
            .reg .b32 t0, t1, a;
            prmt.b32 t0, $4, 0, 0x4140;
            prmt.b32 t1, $4, 0, 0x4342;
            {LO.format("t0")};
            lop3.b32 $0, a, {MASK}, {BIAS16}, 0xea;
            {LO.format("t1")};
            lop3.b32 $1, a, {MASK}, {BIAS16}, 0xea;
            {HI.format("t0")};
            lop3.b32 $2, a, {MASK}, {BIAS16}, 0xea;
            {HI.format("t1")};
            lop3.b32 $3, a, {MASK}, {BIAS16}, 0xea;
            }}""",
            constraints="=r,=r,=r,=r,r",
            args=[codes],
            dtype=(tl.float16, tl.float16) if FP16 else (tl.bfloat16, tl.bfloat16),
            is_pure=not PINNED,
            pack=4,
        )
    elif ASM and SWAP:
        tl.static_assert(
            FP16, "SWAP: fp16 planes only (bf16's 7-bit mantissa cannot hold 16 * code)"
        )
        LO_SUB: tl.constexpr = 0x6408 if CENTER else 0x6400  # 1024 (+ 8)
        HI_ADD: tl.constexpr = 0xD480 if CENTER else 0xD400  # -64 (- 8)
        even, odd = tl.inline_asm_elementwise(
            asm=f"""{{
            .reg .b32 t1, ts, tm, ta;
            mov.b32 ts, {LO_SUB * 0x10001};
            mov.b32 tm, 0x2C002C00;
            mov.b32 ta, {HI_ADD * 0x10001};
            shr.u32 t1, $4, 8;
            lop3.b32 $0, $4, 0x000F000F, 0x64006400, 0xea;
            lop3.b32 $1, t1, 0x000F000F, 0x64006400, 0xea;
            lop3.b32 $2, $4, 0x00F000F0, 0x64006400, 0xea;
            lop3.b32 $3, t1, 0x00F000F0, 0x64006400, 0xea;
            sub.f16x2 $0, $0, ts;
            sub.f16x2 $1, $1, ts;
            fma.rn.f16x2 $2, $2, tm, ta;
            fma.rn.f16x2 $3, $3, tm, ta;
            }}""",
            constraints="=r,=r,=r,=r,r",
            args=[codes],
            dtype=(tl.float16, tl.float16),
            is_pure=not PINNED,
            pack=4,
        )
    elif ASM:
        SUB_BITS: tl.constexpr = BIAS_BITS + CENTER * 8
        even, odd = tl.inline_asm_elementwise(
            asm=f"""{{
            .reg .b32 t0, t1, tb, ts;
            mov.b32 tb, {BIAS_BITS * 0x10001};
            mov.b32 ts, {SUB_BITS * 0x10001};
            prmt.b32 t0, $4, 0, 0x4140;
            prmt.b32 t1, $4, 0, 0x4342;
            lop3.b32 $0, t0, 0x000F000F, tb, 0xea;
            lop3.b32 $1, t1, 0x000F000F, tb, 0xea;
            shr.u32 t0, t0, 4;
            shr.u32 t1, t1, 4;
            lop3.b32 $2, t0, 0x000F000F, tb, 0xea;
            lop3.b32 $3, t1, 0x000F000F, tb, 0xea;
            sub.{"f16x2" if BIAS_BITS == 0x6400 else "bf16x2"} $0, $0, ts;
            sub.{"f16x2" if BIAS_BITS == 0x6400 else "bf16x2"} $1, $1, ts;
            sub.{"f16x2" if BIAS_BITS == 0x6400 else "bf16x2"} $2, $2, ts;
            sub.{"f16x2" if BIAS_BITS == 0x6400 else "bf16x2"} $3, $3, ts;
            }}""",
            constraints="=r,=r,=r,=r,r",
            args=[codes],
            dtype=(tl.float16, tl.float16) if BIAS_BITS == 0x6400 else (tl.bfloat16, tl.bfloat16),
            is_pure=not PINNED,
            pack=4,
        )
    else:
        c = codes.to(tl.int16)
        # via float32: the interpreter's int -> bf16 cast and bf16 subtraction are wrong
        even = ((c & 0xF) + 16 * PLUS16 - 8 * CENTER).to(tl.float32).to(dtype)
        odd = ((c >> 4) + 16 * PLUS16 - 8 * CENTER).to(tl.float32).to(dtype)
        if SWAP:  # positions (0, 1, 2, 3) of each 4 take bytes (0, 2, 1, 3): a 2 x 2 transpose
            n: tl.constexpr = codes.shape[0]
            h: tl.constexpr = codes.shape[1]
            even = tl.reshape(tl.permute(tl.reshape(even, (n, h // 4, 2, 2)), (0, 1, 3, 2)), (n, h))
            odd = tl.reshape(tl.permute(tl.reshape(odd, (n, h // 4, 2, 2)), (0, 1, 3, 2)), (n, h))
    return even, odd


@triton.jit
def _swap(c):
    """The byte of plane position c under `_nibble_planes` SWAP: 0, 2, 1, 3 in each 4."""
    m = c % 4
    return c + (m == 1).to(tl.int32) - (m == 2).to(tl.int32)


@triton.jit
def _combine_splits(part_ptr, lse_ptr, out_ptr, b, hkv, row0, Sq, rows_total, num_splits,
                    HKV: tl.constexpr, GQA: tl.constexpr, D: tl.constexpr,
                    BLOCK_M: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
    """out rows = sum_i w_i o_i / sum_i w_i over the splits' partials, w_i = 2**(lse_i - max
    lse), read from L2 in one online pass, 4 splits at a time (masked past the count) so
    their loads are in flight together. The program's BLOCK_M rows go ROWS at a time and
    chunks past Sq * GQA are skipped (a decode tile pads GQA = 4 rows to 16); each partial
    row is read whole, in the channel order it was stored in."""
    d = tl.arange(0, D)
    for r0 in tl.static_range(0, BLOCK_M, ROWS):
        if row0 + r0 < Sq * GQA:
            rows = row0 + r0 + tl.arange(0, ROWS)
            pos = rows // GQA
            row_ok = pos < Sq
            out_row = (b * HKV * GQA + hkv * GQA + rows % GQA) * Sq + pos
            top = tl.full((ROWS,), _NEG_INF, tl.float32)
            total = tl.zeros((ROWS,), tl.float32)
            acc = tl.zeros((ROWS, D), tl.float32)
            ptrs = part_ptr + out_row[:, None] * D + d[None, :]
            for sp0 in range(0, num_splits, 4):
                for j in tl.static_range(4):
                    live = row_ok & (out_row * 0 + sp0 + j < num_splits)  # a tensor
                    lse = tl.load(lse_ptr + (sp0 + j) * rows_total + out_row, mask=live,
                                  other=_NEG_INF, cache_modifier=".cg")  # fmt: skip
                    new_top = tl.maximum(top, lse)
                    safe = tl.where(new_top == _NEG_INF, 0.0, new_top)  # empty splits weigh 0
                    keep = tl.exp2(top - safe)
                    w = tl.exp2(lse - safe)
                    part = tl.load(ptrs + (sp0 + j) * rows_total * D, mask=live[:, None],
                                   other=0.0, cache_modifier=".cg")  # fmt: skip
                    acc = acc * keep[:, None] + part * w[:, None]
                    total = total * keep + w
                    top = new_top
            total = tl.where(total > 0, total, 1.0)
            tl.store(out_ptr + out_row[:, None] * D + d[None, :],
                     (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])  # fmt: skip


@triton.jit
def _channel_pairs(ptr, HALF: tl.constexpr):
    """A [2 * HALF] fp16 row (per-channel scales or offsets) as its (even, odd) channels in
    fp32: one contiguous load, split (stride-2 loads of 2-byte values compiled to ~140
    scattered LDG per tile on sm_90)."""
    row = tl.load(ptr + tl.arange(0, 2 * HALF)).to(tl.float32)
    return tl.split(tl.reshape(row, (HALF, 2)))


@triton.jit
def _residual_planes(kr_ptr, base, cols, col_ok, quantized_end, D: tl.constexpr):
    """Keys per channel: the 16-bit residual's keys of tokens `cols` (>= quantized_end, the
    last whole group's end) as (even, odd) channel planes [len(cols), D/2]."""
    rows = base + (cols - quantized_end)[:, None] * D
    k_r = tl.load(kr_ptr + rows + tl.arange(0, D)[None, :], mask=col_ok[:, None], other=0.0)
    return tl.split(tl.reshape(k_r, (cols.shape[0], D // 2, 2)))


@triton.jit
def _key_scores_per_channel(q_e, q_o, qh_e, qh_o, r, codes, scale_ptr, offset_ptr, c, qk_scale,
                            ASM: tl.constexpr, SCALE_QUERY: tl.constexpr):  # fmt: skip
    """Scores [BLOCK_M, BLOCK_N] (log2 domain) of one tile of keys stored per channel, all of
    one group: k_t = codes_t * s + o with s, o [D] fp16, so q . k_t = q . (codes_t * s) + q . o.
    Both dot operands are fp16 (11 bits whatever the query dtype) and bounded: the query rows
    are divided by r, a power of two >= their largest |q| (r [BLOCK_M], computed once), so
    |q / r * s| <= 65504 for any fp16 s. SCALE_QUERY (decode: fewer rows than keys) scales
    the query per tile, (q / r * s) . codes; otherwise (prefill row tiles) the key tile,
    (q / r) . (codes * s / 2), with qh = q / r in fp16 from before the loop. q . o in fp32."""
    s_e, s_o = _channel_pairs(scale_ptr, c.shape[0])
    o_e, o_o = _channel_pairs(offset_ptr, c.shape[0])
    k_lo, k_hi = _nibble_planes(codes, 0x6400, tl.float16, ASM)
    bias = tl.sum(q_e.to(tl.float32) * o_e[None, :], axis=1)
    bias += tl.sum(q_o.to(tl.float32) * o_o[None, :], axis=1)
    inv = (1.0 / r)[:, None]
    # (if/else with one return: Triton compiles the code after an early return in a
    # constexpr branch, bf16 qh and all)
    if SCALE_QUERY:
        qk = tl.dot((q_e.to(tl.float32) * inv * s_e[None, :]).to(tl.float16), tl.trans(k_lo))
        qk = tl.dot((q_o.to(tl.float32) * inv * s_o[None, :]).to(tl.float16), tl.trans(k_hi), qk)
        unit = r
    else:
        # codes * s <= 15 * s may pass 65504; codes * s / 2 cannot (K lies within fp16's range)
        k_e = (k_lo.to(tl.float32) * (0.5 * s_e)[None, :]).to(tl.float16)
        k_o = (k_hi.to(tl.float32) * (0.5 * s_o)[None, :]).to(tl.float16)
        qk = tl.dot(qh_o, tl.trans(k_o), tl.dot(qh_e, tl.trans(k_e)))
        unit = 2.0 * r
    return (qk * unit[:, None] + bias[:, None]) * qk_scale


@triton.jit
def _store_rows(out_ptr, out_ptrs, out_e, out_o, store_ok, out_row, row_ok, l_i, m_i, l_safe,
                lse_ptr, final_ptr, cnt_ptr, pid_bh, pid_split, num_splits, rows_total, b, hkv,
                row0, Sq, HKV: tl.constexpr, GQA: tl.constexpr, D: tl.constexpr,
                BLOCK_M: tl.constexpr, COMBINE_ROWS: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
                SELF_REDUCE: tl.constexpr):  # fmt: skip
    """A one-group decode program's epilogue, either orientation (store_ok: row_ok broadcast
    to out_ptrs): the final rows, or this split's fp32 partials and lse, and with SELF_REDUCE
    the last split of a (batch, KV head) to arrive combines them all into final_ptr."""
    if WRITE_PARTIAL:
        tl.store(out_ptrs, out_e, mask=store_ok)
        tl.store(out_ptrs + 1, out_o, mask=store_ok)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), _NEG_INF)
        tl.store(lse_ptr + pid_split * rows_total + out_row, lse, mask=row_ok)
        if SELF_REDUCE:
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + pid_bh, 1, sem="acq_rel", scope="gpu")
            if arrived == num_splits - 1:
                _combine_splits(out_ptr, lse_ptr, final_ptr, b, hkv, row0, Sq, rows_total,
                                num_splits, HKV, GQA, D, BLOCK_M, COMBINE_ROWS)  # fmt: skip
                tl.atomic_xchg(cnt_ptr + pid_bh, 0, sem="relaxed", scope="gpu")
    else:
        tl.store(out_ptrs, out_e.to(out_ptr.dtype.element_ty), mask=store_ok)
        tl.store(out_ptrs + 1, out_o.to(out_ptr.dtype.element_ty), mask=store_ok)


@triton.jit
def _token_scales(ks_ptr, ko_ptr, vs_ptr, vo_ptr, scale_base, cols, end):
    """K and V scales and offsets (one per token and head, fp16) of the tokens `cols`;
    zero past `end`."""
    ok = cols < end
    ks = tl.load(ks_ptr + scale_base + cols, mask=ok, other=0.0)
    ko = tl.load(ko_ptr + scale_base + cols, mask=ok, other=0.0)
    vs = tl.load(vs_ptr + scale_base + cols, mask=ok, other=0.0)
    vo = tl.load(vo_ptr + scale_base + cols, mask=ok, other=0.0)
    return ks, ko, vs, vo


@triton.jit
def _kv4_decode_kernel(
    q_ptr, kc_ptr, ks_ptr, ko_ptr, vc_ptr, vs_ptr, vo_ptr, lens_ptr, mask_ptr, out_ptr, lse_ptr,
    final_ptr, cnt_ptr, kr_ptr, Sq, S, rows_total, qk_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_cb, stride_ch, stride_sb, stride_sh, stride_lens,
    stride_mb, stride_mh, stride_mq, stride_ms, stride_kb, stride_kh, stride_rb, stride_rh,
    HKV: tl.constexpr, GQA: tl.constexpr, D: tl.constexpr, Q_BIAS_BITS: tl.constexpr,
    HAS_LENS: tl.constexpr, IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr, WRITE_PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, ASM: tl.constexpr, SELF_REDUCE: tl.constexpr,
    FOLD_UNIT: tl.constexpr = True, KEY_TOKENS: tl.constexpr = 0,
    SCALE_PREFETCH: tl.constexpr = False, STAGE_V: tl.constexpr = False,
    KEY_BIAS16: tl.constexpr = False, Q_ROWS: tl.constexpr = False,
    COMBINE_ROWS: tl.constexpr = 16, CENTER_V: tl.constexpr = False, WIDE: tl.constexpr = False,
):  # fmt: skip
    # Flash-decoding ("decode": split over the sequence) and flash-attention ("prefill": row
    # tiles over pid_m, causal tiles skipped) for one scale/offset per token and head (G = D),
    # everything 2-D: the
    # even and odd channels are separate planes (low and high nibbles of the cache bytes),
    # so the query splits into q_even / q_odd once and nothing is interleaved per tile.
    #   scores = scale * (q_e . lo + q_o . hi) + offset * sum q
    #   out_e  = sum_t p_t (scale_t lo_t + offset_t) = (P * scale, fp16, see below) @ lo
    # plus P @ offset; likewise out_o with hi.
    # Rows, masks, splits and outputs as `_kv4_attention_kernel` (pid_m = 0).
    # KEY_TOKENS = T > 0: K per channel over groups of T tokens (`_key_scores_per_channel`);
    # K's scales/offsets then have strides (stride_kb, stride_kh, D, 1), V's (stride_sb,
    # stride_sh, 1), and the keys past the last complete group are read from kr_ptr. With
    # SELF_REDUCE the last split of a (batch, KV head) to finish (a counter per pid_bh, as
    # the W4A16 split-K) combines every split's partial into final_ptr: one launch, not two.
    # SCALE_PREFETCH (per-token keys only): the next tile's scales and offsets are loaded one
    # iteration ahead. Triton pipelines the code tiles through shared memory (cp.async) but
    # leaves these [BLOCK_N] fp16 loads in the loop (offline TTGIR, Triton 3.6), where a
    # decode tile, reading them from HBM, would wait out their latency.
    # STAGE_V: V's unpacked planes reach `P @ V` through shared memory (`_nibble_planes`
    # PINNED): its MMA operand pairs consecutive tokens, which the cache keeps in different
    # rows, so without it Triton gathers the codes byte by byte (offline sm_90, Triton 3.6).
    # KEY_BIAS16 (per-token keys): k_lo / k_hi hold 16 + code, and the offset loses 16 * scale.
    # Q_ROWS: the query read as whole rows and split into planes in registers; read as two
    # stride-2 planes, its MMA operand is re-read from shared memory by a transposed ldmatrix
    # and moved into place on every tile (~100 MOV per 32-key tile; offline sm_90, Triton 3.6).
    HALF: tl.constexpr = D // 2
    pid_bh = tl.program_id(0)
    pid_split = tl.program_id(1)
    pid_m = tl.program_id(2)  # row tile: one for decode, Sq * GQA / BLOCK_M for prefill
    num_splits = tl.num_programs(1)
    b, hkv, pos, head, row_ok, seq_len, start, end = _program_tile(
        pid_bh, pid_m, pid_split, num_splits, lens_ptr, stride_lens, Sq, S, HKV, GQA, HAS_LENS,
        IS_CAUSAL, BLOCK_M, BLOCK_N,
    )  # fmt: skip

    c = tl.arange(0, HALF)
    q_rows = q_ptr + b * stride_qb + head[:, None] * stride_qh + pos[:, None] * stride_qs
    if Q_ROWS:
        q_full = tl.load(q_rows + tl.arange(0, D)[None, :] * stride_qd, mask=row_ok[:, None],
                         other=0.0)  # fmt: skip
        q_e, q_o = tl.split(tl.reshape(q_full, (BLOCK_M, HALF, 2)))
    else:
        q_e = tl.load(q_rows + (2 * c)[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
        q_o = tl.load(q_rows + (2 * c + 1)[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    q_sum = tl.sum(q_e.to(tl.float32), axis=1) + tl.sum(q_o.to(tl.float32), axis=1)

    m_i = tl.full((BLOCK_M,), _NEG_INF, tl.float32)  # running max, log2 domain
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc_e = tl.zeros((BLOCK_M, HALF), tl.float32)
    acc_o = tl.zeros((BLOCK_M, HALF), tl.float32)
    fix = tl.zeros((BLOCK_M,), tl.float32)
    acc_unit = tl.full((), 1.0, tl.float32)  # acc_e / acc_o hold multiples of this
    offs_n = tl.arange(0, BLOCK_N)
    kc_ptr, vc_ptr, slab = _cache_slab(kc_ptr, vc_ptr, b, hkv, stride_cb, stride_ch, WIDE)
    code_base = slab + c[None, :]
    scale_base = b * stride_sb + hkv * stride_sh
    mask_base = mask_ptr + b * stride_mb + head[:, None] * stride_mh + pos[:, None] * stride_mq
    # keys per channel: positions >= quantized_end are the residual's (a multiple of T, and
    # BLOCK_N divides T, so a tile lies wholly on one side and within one group)
    quantized_end = seq_len
    # keys per channel: decode tiles (fewer rows than keys) scale the query, prefill the keys
    SCALE_QUERY: tl.constexpr = BLOCK_M < BLOCK_N
    r = tl.full((BLOCK_M,), 1.0, tl.float32)  # per-row power of two >= max |q|
    qh_e, qh_o = q_e, q_o  # q / r in fp16 (prefill tiles over keys per channel)
    if KEY_TOKENS > 0:
        quantized_end = seq_len // KEY_TOKENS * KEY_TOKENS
        top = tl.maximum(tl.max(tl.abs(q_e.to(tl.float32)), axis=1),
                         tl.max(tl.abs(q_o.to(tl.float32)), axis=1))  # fmt: skip
        r = tl.exp2(tl.ceil(tl.log2(tl.maximum(top, 1e-30))))
        if not SCALE_QUERY:
            qh_e = (q_e.to(tl.float32) / r[:, None]).to(tl.float16)
            qh_o = (q_o.to(tl.float32) / r[:, None]).to(tl.float16)
    # (Triton's compiler, unlike its interpreter, wants loop-carried names bound before the
    # loop even when the branch that carries them is compiled out: hence the zeros.)
    ks_n = tl.zeros((BLOCK_N,), ks_ptr.dtype.element_ty)
    ko_n, vs_n, vo_n = ks_n, ks_n, ks_n
    if SCALE_PREFETCH and KEY_TOKENS == 0:
        ks_n, ko_n, vs_n, vo_n = _token_scales(
            ks_ptr, ko_ptr, vs_ptr, vo_ptr, scale_base, start + offs_n, end
        )  # fmt: skip
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < end
        code_offs = code_base + cols[:, None] * HALF  # one contiguous [BLOCK_N, D/2] block
        if SCALE_PREFETCH and KEY_TOKENS == 0:
            ks_t, ko_t, vs_t, vo_t = ks_n, ko_n, vs_n, vo_n
            ks_n, ko_n, vs_n, vo_n = _token_scales(
                ks_ptr, ko_ptr, vs_ptr, vo_ptr, scale_base, cols + BLOCK_N, end
            )  # fmt: skip
        if KEY_TOKENS == 0:
            k_lo, k_hi = _nibble_planes(
                tl.load(kc_ptr + code_offs, mask=col_ok[:, None], other=0),
                Q_BIAS_BITS,
                q_e.dtype,
                ASM,
                PLUS16=KEY_BIAS16,
            )
            qk = tl.dot(q_e, tl.trans(k_lo))
            qk = tl.dot(q_o, tl.trans(k_hi), qk)  # [BLOCK_M, BLOCK_N]
            if SCALE_PREFETCH:
                k_scale = ks_t.to(tl.float32)
                k_offset = ko_t.to(tl.float32)
            else:  # loaded here, as the timed kernel always did
                k_scale = tl.load(ks_ptr + scale_base + cols, mask=col_ok, other=0.0)
                k_offset = tl.load(ko_ptr + scale_base + cols, mask=col_ok, other=0.0)
                k_scale = k_scale.to(tl.float32)
                k_offset = k_offset.to(tl.float32)
            if KEY_BIAS16:  # q . (16 + codes) * s + (o - 16 s) * sum(q)
                k_offset = k_offset - 16.0 * k_scale
            scores = ((k_scale * qk_scale)[None, :] * qk
                      + (k_offset * qk_scale)[None, :] * q_sum[:, None])  # fmt: skip
        elif n0 < quantized_end:
            group = b * stride_kb + hkv * stride_kh + (n0 // KEY_TOKENS) * D
            scores = _key_scores_per_channel(
                q_e, q_o, qh_e, qh_o, r,
                tl.load(kc_ptr + code_offs, mask=col_ok[:, None], other=0),
                ks_ptr + group, ko_ptr + group, c, qk_scale, ASM, SCALE_QUERY,
            )  # fmt: skip
        else:
            k_e, k_o = _residual_planes(
                kr_ptr, b * stride_rb + hkv * stride_rh, cols, col_ok, quantized_end, D
            )  # fmt: skip
            qk = tl.dot(q_e, tl.trans(k_e.to(q_e.dtype)))
            scores = tl.dot(q_o, tl.trans(k_o.to(q_e.dtype)), qk) * qk_scale
        # Padding rows (pos >= Sq) have q = 0 and finite scores; they are never stored, so
        # only masks read per row need row_ok (their loads must stay in bounds).
        visible = col_ok[None, :]
        if IS_CAUSAL or MASK_KIND != 0:
            visible = visible & row_ok[:, None]
        if IS_CAUSAL:
            visible = visible & (cols[None, :] <= (pos + seq_len - Sq)[:, None])
        p, alpha, m_new, l_i = _softmax_tile(
            scores, visible, mask_base + cols[None, :] * stride_ms, m_i, l_i, MASK_KIND
        )

        v_lo, v_hi = _nibble_planes(
            tl.load(vc_ptr + code_offs, mask=col_ok[:, None], other=0),
            0x6400,
            tl.float16,
            ASM,
            STAGE_V,
            CENTER=CENTER_V,
        )
        if SCALE_PREFETCH and KEY_TOKENS == 0:
            v_scale = vs_t.to(tl.float32)
            v_offset = vo_t.to(tl.float32)
        else:
            v_scale = tl.load(vs_ptr + scale_base + cols, mask=col_ok, other=0.0).to(tl.float32)
            v_offset = tl.load(vo_ptr + scale_base + cols, mask=col_ok, other=0.0).to(tl.float32)
        if CENTER_V:  # v = scale * (code - 8) + (offset + 8 * scale)
            v_offset = v_offset + 8.0 * v_scale
        # P * scale in fp16 with the tile's scales divided by a power of two 2**e >= their
        # maximum, as `_kv4_attention_kernel` does per group.
        pow2 = tl.exp2(tl.ceil(tl.log2(tl.maximum(tl.max(v_scale, axis=0), _MIN_SCALE))))
        p_scaled = (p * (v_scale / pow2)[None, :]).to(tl.float16)
        # the per-row offset terms are the same for every channel: kept
        # in one [BLOCK_M] sum, added to both planes at the end
        fix = fix * alpha + tl.sum(p * v_offset[None, :], axis=1)
        # acc_e / acc_o are kept in units of the last tile's 2**e (acc_unit), so the dot
        # accumulates into them in place: rescaling by alpha and by the change of unit
        # (exact, powers of two) is one multiply per element, with no second accumulator.
        if FOLD_UNIT:
            rescale = (alpha * (acc_unit / pow2))[:, None]
            acc_e = tl.dot(p_scaled, v_lo, acc_e * rescale)
            acc_o = tl.dot(p_scaled, v_hi, acc_o * rescale)
            acc_unit = pow2
        else:
            acc_e = acc_e * alpha[:, None] + tl.dot(p_scaled, v_lo) * pow2
            acc_o = acc_o * alpha[:, None] + tl.dot(p_scaled, v_hi) * pow2
        m_i = m_new

    out_row = (b * HKV * GQA + head) * Sq + pos
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out_e = (acc_e * acc_unit + fix[:, None]) / l_safe[:, None]
    out_o = (acc_o * acc_unit + fix[:, None]) / l_safe[:, None]
    out_ptrs = out_ptr + pid_split * rows_total * D + out_row[:, None] * D + 2 * c[None, :]
    _store_rows(
        out_ptr, out_ptrs, out_e, out_o, row_ok[:, None], out_row, row_ok, l_i, m_i, l_safe,
        lse_ptr, final_ptr, cnt_ptr, pid_bh, pid_split, num_splits, rows_total, b, hkv,
        pid_m * BLOCK_M, Sq, HKV, GQA, D, BLOCK_M, COMBINE_ROWS, WRITE_PARTIAL, SELF_REDUCE,
    )  # fmt: skip


@triton.jit
def _t_attend(scores, cols, col_ok, code_offs, vc_ptr, vs_t, vo_t, m_i, l_i, acc_e, acc_o, fix,
              acc_unit, row_ok, mask_base, mask_keys, stride_ms, MASK_KIND: tl.constexpr,
              KEY_MASK: tl.constexpr, ASM: tl.constexpr, STAGE_V: tl.constexpr,
              CENTER_V: tl.constexpr, SWAP_PAIRS: tl.constexpr):  # fmt: skip
    """One decode_t key tile after its scores [BLOCK_N, ROWS] (log2 domain): the mask, the
    online softmax down the columns and O^T += V^T @ P^T; returns the running state."""
    visible = col_ok[:, None]
    if KEY_MASK:  # one mask row for every head: a [BLOCK_N] load, broadcast
        if MASK_KIND == 1:
            keep = tl.load(mask_keys + cols * stride_ms, mask=col_ok, other=0)
            visible = visible & (keep != 0)[:, None]
        if MASK_KIND == 2:
            bias = tl.load(mask_keys + cols * stride_ms, mask=col_ok, other=0.0)
            scores += (bias.to(tl.float32) * 1.4426950408889634)[:, None]
    else:
        if MASK_KIND != 0:
            visible = visible & row_ok[None, :]
        if MASK_KIND == 1:
            keep = tl.load(mask_base + cols[:, None] * stride_ms, mask=visible, other=0)
            visible = visible & (keep != 0)
        if MASK_KIND == 2:
            bias = tl.load(mask_base + cols[:, None] * stride_ms, mask=visible, other=0.0)
            scores += bias.to(tl.float32) * 1.4426950408889634
    scores = tl.where(visible, scores, _NEG_INF)
    m_new = tl.maximum(m_i, tl.max(scores, axis=0))
    m_safe = tl.where(m_new == _NEG_INF, 0.0, m_new)  # heads with nothing visible yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[None, :])
    l_i = l_i * alpha + tl.sum(p, axis=0)

    v_lo, v_hi = _nibble_planes(
        tl.load(vc_ptr + code_offs, mask=col_ok[:, None], other=0), 0x6400, tl.float16,
        ASM, STAGE_V, CENTER=CENTER_V, SWAP=SWAP_PAIRS,
    )  # fmt: skip
    v_scale = vs_t.to(tl.float32)
    v_offset = vo_t.to(tl.float32)
    if CENTER_V:  # v = scale * (code - 8) + (offset + 8 * scale)
        v_offset = v_offset + 8.0 * v_scale
    # P * scale in fp16 over a power of two >= the tile's largest scale, the accumulators
    # kept in units of it (as the decode kernel)
    pow2 = tl.exp2(tl.ceil(tl.log2(tl.maximum(tl.max(v_scale, axis=0), _MIN_SCALE))))
    p_scaled = (p * (v_scale / pow2)[:, None]).to(tl.float16)  # [BLOCK_N, ROWS]
    fix = fix * alpha + tl.sum(p * v_offset[:, None], axis=0)
    rescale = (alpha * (acc_unit / pow2))[None, :]
    acc_e = tl.dot(tl.trans(v_lo), p_scaled, acc_e * rescale)
    acc_o = tl.dot(tl.trans(v_hi), p_scaled, acc_o * rescale)
    return m_new, l_i, acc_e, acc_o, fix, pow2


@triton.jit
def _kv4_decode_t_kernel(
    q_ptr, kc_ptr, ks_ptr, ko_ptr, vc_ptr, vs_ptr, vo_ptr, lens_ptr, mask_ptr, out_ptr, lse_ptr,
    final_ptr, cnt_ptr, kr_ptr, S, rows_total, qk_scale,
    stride_qb, stride_qh, stride_qd,
    stride_cb, stride_ch, stride_sb, stride_sh, stride_lens,
    stride_mb, stride_mh, stride_ms, stride_kb, stride_kh, stride_rb, stride_rh,
    HKV: tl.constexpr, GQA: tl.constexpr, D: tl.constexpr, Q_BIAS_BITS: tl.constexpr,
    HAS_LENS: tl.constexpr, MASK_KIND: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, ASM: tl.constexpr, SELF_REDUCE: tl.constexpr,
    SCALE_PREFETCH: tl.constexpr, STAGE_V: tl.constexpr, CENTER_V: tl.constexpr,
    WIDE: tl.constexpr, COMBINE_ROWS: tl.constexpr, SWAP_PAIRS: tl.constexpr = False,
    KEY_MASK: tl.constexpr = False, FP16_KEYS: tl.constexpr = False,
    LAUNCH_DEPENDENTS: tl.constexpr = False, KEY_TOKENS: tl.constexpr = 0,
    WAIT: tl.constexpr = False,
):  # fmt: skip
    # WAIT (`_KV4_PDL`): launched with programmatic dependent launch, so the programs may be
    # placed while the kernel before (the cache write) drains; nothing is read before it ends.
    if WAIT:
        gdc_wait()
    # LAUNCH_DEPENDENTS: the split reduce launched next with programmatic dependent launch may
    # place its programs as soon as this grid's free SM slots allow; they wait (griddepcontrol
    # .wait) for this whole grid and its writes before reading a partial.
    if LAUNCH_DEPENDENTS:
        gdc_launch_dependents()
    # "decode_t": `_kv4_decode_kernel`'s decode of one query position (per-token keys, G = D),
    # transposed so the keys are the MMA's M side and the GQA query heads its N side:
    #   S^T [BLOCK_N, ROWS] = K_lo @ q_e^T + K_hi @ q_o^T,  O_e^T [D/2, ROWS] += V_lo^T @ P^T.
    # tl.dot pads N (4 query heads of GQA 4) to the instruction's 8 where the other form pads
    # M to 16, so the softmax's elementwise work and the accumulators are per 8 columns of
    # real and padding heads instead of per 16 rows. Same splits, partials, self-reduce and
    # output layout as the decode kernel (rows r = query head hkv * GQA + r).
    # KEY_MASK: the mask is one row per batch (head stride 0: transformers' padding mask, which
    # a compiled decode step always passes), read as one [BLOCK_N] vector per tile; read per
    # head, a bool mask grew the loop from 850 to 1156 instructions (offline sm_90, bf16).
    HALF: tl.constexpr = D // 2
    pid_bh = tl.program_id(0)
    pid_split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b, hkv, pos, head, row_ok, seq_len, start, end = _program_tile(
        pid_bh, 0, pid_split, num_splits, lens_ptr, stride_lens, 1, S, HKV, GQA, HAS_LENS,
        False, ROWS, BLOCK_N,
    )  # fmt: skip
    c = tl.arange(0, HALF)
    # SWAP_PAIRS: V's planes (fp16) and, with an fp16 query, K's come from `_nibble_planes`
    # SWAP, so the query is read and the output written at the swapped channels
    # FP16_KEYS (a bf16 query): the query scaled per head by a power of two r >= max |q| and
    # rounded to fp16 (exact: bf16's 8-bit mantissa fits, short of fp16's subnormals), so K's
    # planes are fp16 and swapped too; the scores take r back.
    # KEY_TOKENS = T > 0: K per channel over groups of T tokens (BLOCK_N divides T, so a tile
    # lies in one group or wholly in the 16-bit residual past the last whole group): scores
    # (q / r) . (codes * s / 2 + o / 2) * 2r, the key tile dequantized and halved (a query
    # scaled per tile took 255 registers, sm_90); K's planes are not swapped (the query keeps
    # its natural channels, the scales load whole). V stays per token.
    K16: tl.constexpr = (Q_BIAS_BITS == 0x6400 or FP16_KEYS) and KEY_TOKENS == 0
    SWAP_K: tl.constexpr = SWAP_PAIRS and K16
    qc = _swap(c) if SWAP_K else c
    q_cols = q_ptr + b * stride_qb + head[None, :] * stride_qh  # [1, ROWS]
    q_e = tl.load(q_cols + (2 * qc)[:, None] * stride_qd, mask=row_ok[None, :], other=0.0)
    q_o = tl.load(q_cols + (2 * qc + 1)[:, None] * stride_qd, mask=row_ok[None, :], other=0.0)
    q_sum = tl.sum(q_e.to(tl.float32), axis=0) + tl.sum(q_o.to(tl.float32), axis=0)  # [ROWS]
    q_r = tl.full((ROWS,), 1.0, tl.float32)
    if (FP16_KEYS and Q_BIAS_BITS != 0x6400) or KEY_TOKENS > 0:
        top = tl.maximum(tl.max(tl.abs(q_e.to(tl.float32)), axis=0),
                         tl.max(tl.abs(q_o.to(tl.float32)), axis=0))  # fmt: skip
        q_r = tl.exp2(tl.ceil(tl.log2(tl.maximum(top, 1e-30))))
    if FP16_KEYS and Q_BIAS_BITS != 0x6400 and KEY_TOKENS == 0:
        q_e = (q_e.to(tl.float32) / q_r[None, :]).to(tl.float16)
        q_o = (q_o.to(tl.float32) / q_r[None, :]).to(tl.float16)
    qh_e, qh_o = q_e, q_o  # keys per channel: q / r in fp16, the scaled keys' operand
    if KEY_TOKENS > 0:
        qh_e = (q_e.to(tl.float32) / q_r[None, :]).to(tl.float16)
        qh_o = (q_o.to(tl.float32) / q_r[None, :]).to(tl.float16)
    # keys per channel: positions >= quantized_end are the residual's
    quantized_end = seq_len
    if KEY_TOKENS > 0:
        quantized_end = seq_len // KEY_TOKENS * KEY_TOKENS
    # per-token scales: K's and V's, or V's only (K's are per channel: read V's twice, unused)
    tks_ptr, tko_ptr = ks_ptr, ko_ptr
    if KEY_TOKENS > 0:
        tks_ptr, tko_ptr = vs_ptr, vo_ptr

    m_i = tl.full((ROWS,), _NEG_INF, tl.float32)  # running max per query head, log2 domain
    l_i = tl.zeros((ROWS,), tl.float32)
    acc_e = tl.zeros((HALF, ROWS), tl.float32)
    acc_o = tl.zeros((HALF, ROWS), tl.float32)
    fix = tl.zeros((ROWS,), tl.float32)
    acc_unit = tl.full((), 1.0, tl.float32)  # acc_e / acc_o hold multiples of this
    offs_n = tl.arange(0, BLOCK_N)
    kc_ptr, vc_ptr, slab = _cache_slab(kc_ptr, vc_ptr, b, hkv, stride_cb, stride_ch, WIDE)
    code_base = slab + c[None, :]
    scale_base = b * stride_sb + hkv * stride_sh
    mask_base = mask_ptr + b * stride_mb + head[None, :] * stride_mh  # [1, ROWS]
    mask_keys = mask_ptr + b * stride_mb  # KEY_MASK: the batch's one row
    ks_n = tl.zeros((BLOCK_N,), ks_ptr.dtype.element_ty)
    ko_n, vs_n, vo_n = ks_n, ks_n, ks_n
    if SCALE_PREFETCH:
        ks_n, ko_n, vs_n, vo_n = _token_scales(
            tks_ptr, tko_ptr, vs_ptr, vo_ptr, scale_base, start + offs_n, end
        )  # fmt: skip
    q_stop = end  # keys per channel: the quantized groups' tiles, then the residual's
    if KEY_TOKENS > 0:
        q_stop = tl.minimum(end, quantized_end)
    for n0 in range(start, q_stop, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < end
        code_offs = code_base + cols[:, None] * HALF
        if SCALE_PREFETCH:
            ks_t, ko_t, vs_t, vo_t = ks_n, ko_n, vs_n, vo_n
            ks_n, ko_n, vs_n, vo_n = _token_scales(
                tks_ptr, tko_ptr, vs_ptr, vo_ptr, scale_base, cols + BLOCK_N, end
            )  # fmt: skip
        else:
            ks_t, ko_t, vs_t, vo_t = _token_scales(
                tks_ptr, tko_ptr, vs_ptr, vo_ptr, scale_base, cols, end
            )  # fmt: skip
        if KEY_TOKENS == 0:
            k_lo, k_hi = _nibble_planes(
                tl.load(kc_ptr + code_offs, mask=col_ok[:, None], other=0),
                0x6400 if K16 else Q_BIAS_BITS, q_e.dtype, ASM, SWAP=SWAP_K,
            )  # fmt: skip
            qk = tl.dot(k_lo, q_e)
            qk = tl.dot(k_hi, q_o, qk)  # [BLOCK_N, ROWS]
            if FP16_KEYS and Q_BIAS_BITS != 0x6400:
                qk = qk * q_r[None, :]
            k_scale = ks_t.to(tl.float32) * qk_scale
            scores = (k_scale[:, None] * qk
                      + (ko_t.to(tl.float32) * qk_scale)[:, None] * q_sum[None, :])  # fmt: skip
        else:
            group = b * stride_kb + hkv * stride_kh + (n0 // KEY_TOKENS) * D
            s_e, s_o = _channel_pairs(ks_ptr + group, HALF)
            o_e, o_o = _channel_pairs(ko_ptr + group, HALF)
            k_lo, k_hi = _nibble_planes(
                tl.load(kc_ptr + code_offs, mask=col_ok[:, None], other=0), 0x6400, tl.float16,
                ASM,
            )  # fmt: skip
            # the key tile dequantized and halved, k / 2 = codes * (s / 2) + o / 2, by one fp16
            # FMA per pair (within fp16: K is; the product is not rounded on its own), so the
            # query operand (q / r, |q / r| <= 1) stays fixed over the loop and the offsets ride
            # the MMA. codes are exact in fp16 and s / 2, o / 2 are s's and o's own halvings,
            # so each is k / 2 rounded once: an fp16 K cache's rounding. Offline sm_90: a
            # q . o per tile in fp32 took ~80 more loop instructions (shuffles and adds);
            # unhalved, fma(codes, s, o) took 1053 (the pairs packed by 173 PRMT) against 1004.
            kh_lo = tl.fma(k_lo, (0.5 * s_e).to(tl.float16)[None, :],
                           (0.5 * o_e).to(tl.float16)[None, :])  # fmt: skip
            kh_hi = tl.fma(k_hi, (0.5 * s_o).to(tl.float16)[None, :],
                           (0.5 * o_o).to(tl.float16)[None, :])  # fmt: skip
            qk = tl.dot(kh_lo, qh_e)
            qk = tl.dot(kh_hi, qh_o, qk)  # [BLOCK_N, ROWS]
            scores = qk * (2.0 * q_r * qk_scale)[None, :]
        m_i, l_i, acc_e, acc_o, fix, acc_unit = _t_attend(
            scores, cols, col_ok, code_offs, vc_ptr, vs_t, vo_t, m_i, l_i, acc_e, acc_o, fix,
            acc_unit, row_ok, mask_base, mask_keys, stride_ms, MASK_KIND, KEY_MASK, ASM,
            STAGE_V, CENTER_V, SWAP_PAIRS,
        )  # fmt: skip
    if KEY_TOKENS > 0:  # the residual: keys past the last whole group, in 16 bits
        # (at most T / BLOCK_N tiles: not pipelined, so its 16-bit tiles take no shared memory)
        for n0 in tl.range(tl.maximum(start, quantized_end), end, BLOCK_N, num_stages=1):
            cols = n0 + offs_n
            col_ok = cols < end
            code_offs = code_base + cols[:, None] * HALF
            vs_t = tl.load(vs_ptr + scale_base + cols, mask=col_ok, other=0.0)
            vo_t = tl.load(vo_ptr + scale_base + cols, mask=col_ok, other=0.0)
            k_e, k_o = _residual_planes(
                kr_ptr, b * stride_rb + hkv * stride_rh, cols, col_ok, quantized_end, D
            )  # fmt: skip
            qk = tl.dot(k_e.to(q_e.dtype), q_e)
            scores = tl.dot(k_o.to(q_e.dtype), q_o, qk) * qk_scale
            m_i, l_i, acc_e, acc_o, fix, acc_unit = _t_attend(
                scores, cols, col_ok, code_offs, vc_ptr, vs_t, vo_t, m_i, l_i, acc_e, acc_o,
                fix, acc_unit, row_ok, mask_base, mask_keys, stride_ms, MASK_KIND, KEY_MASK, ASM,
                STAGE_V, CENTER_V, SWAP_PAIRS,
            )  # fmt: skip

    out_row = b * HKV * GQA + head  # [ROWS] (Sq = 1)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out_e = (acc_e * acc_unit + fix[None, :]) / l_safe[None, :]
    out_o = (acc_o * acc_unit + fix[None, :]) / l_safe[None, :]
    oc = _swap(c) if SWAP_PAIRS else c
    out_ptrs = out_ptr + pid_split * rows_total * D + out_row[None, :] * D + 2 * oc[:, None]
    _store_rows(
        out_ptr, out_ptrs, out_e, out_o, row_ok[None, :], out_row, row_ok, l_i, m_i, l_safe,
        lse_ptr, final_ptr, cnt_ptr, pid_bh, pid_split, num_splits, rows_total, b, hkv, 0, 1,
        HKV, GQA, D, ROWS, COMBINE_ROWS, WRITE_PARTIAL, SELF_REDUCE,
    )  # fmt: skip


@triton.jit
def _kv4_split_reduce_kernel(
    part_ptr, lse_ptr, out_ptr, rows_total, SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr,
    D: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    # One program per output row; partials [SPLITS, rows_total, D] fp32, lse [SPLITS, rows].
    # PDL: launched with programmatic dependent launch; wait for the attention grid first.
    if PDL:
        gdc_wait()
    row = tl.program_id(0)
    sp = tl.arange(0, SPLITS_POW2)
    d = tl.arange(0, D)
    sp_ok = sp < SPLITS
    lse = tl.load(lse_ptr + sp * rows_total + row, mask=sp_ok, other=_NEG_INF)
    top = tl.max(lse, axis=0)
    w = tl.exp2(lse - tl.where(top == _NEG_INF, 0.0, top))  # empty splits weigh 0
    part = tl.load(part_ptr + (sp[:, None] * rows_total + row) * D + d[None, :],
                   mask=sp_ok[:, None], other=0.0)  # fmt: skip
    total = tl.sum(w, axis=0)
    out = tl.sum(part * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty))


# --------------------------------------------------------------------------- cache write
@triton.jit
def _quantize_store(x, codes_ptr, scales_ptr, offsets_ptr, code_offs, scale_offs, ok,
                    NG: tl.constexpr, BLOCK_T: tl.constexpr, G: tl.constexpr):  # fmt: skip
    """x [BLOCK_T, NG, G] float32 -> codes/scales/offsets stored at the given offsets."""
    lo = tl.min(x, axis=2)
    hi = tl.max(x, axis=2)
    scale = tl.maximum(tl.math.div_rn(hi - lo, 15.0), _MIN_SCALE).to(tl.float16)
    offset = lo.to(tl.float16)
    # IEEE division and floor(v + 0.5), as the reference: the codes match it bit for bit
    v = tl.math.div_rn(x - offset.to(tl.float32)[:, :, None], scale.to(tl.float32)[:, :, None])
    codes = tl.minimum(tl.maximum(tl.floor(v + 0.5), 0.0), 15.0).to(tl.int32)
    even, odd = tl.split(tl.reshape(codes, (BLOCK_T, NG, G // 2, 2)))
    packed = (even | (odd << 4)).to(tl.uint8)  # [BLOCK_T, NG, G/2]
    tl.store(codes_ptr + code_offs, packed, mask=ok[:, None, None])
    tl.store(scales_ptr + scale_offs, scale, mask=ok[:, None])
    tl.store(offsets_ptr + scale_offs, offset, mask=ok[:, None])


@triton.jit
def _kv4_cache_write_kernel(
    k_ptr, v_ptr, kc_ptr, ks_ptr, ko_ptr, vc_ptr, vs_ptr, vo_ptr, pos_ptr, Sn, S,
    stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs, stride_vd,
    stride_cb, stride_ch, stride_sb, stride_sh,
    HKV: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BLOCK_T: tl.constexpr,
    WRITE_K: tl.constexpr = True, PDL: tl.constexpr = False,
):  # fmt: skip
    # One program per (batch, KV head, tile of new tokens) writes both K and V (only V when
    # not WRITE_K: keys per channel have their own kernel). A position past the cache (S) is
    # dropped rather than written out of bounds.
    # PDL (`_KV4_PDL`): launched with programmatic dependent launch, it waits for the kernel
    # before (which wrote K and V) and lets the attention after it be placed at once; that
    # kernel's griddepcontrol.wait still waits for this grid's end and writes.
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    NG: tl.constexpr = D // G
    pid_bh = tl.program_id(0)
    b = pid_bh // HKV
    h = pid_bh % HKV
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    live = t < Sn  # the loads' mask: K and V are read without waiting for the positions
    pos = tl.load(pos_ptr + t, mask=live, other=0)
    ok = live & (pos >= 0) & (pos < S)  # the stores'
    grp = tl.arange(0, NG)[None, :, None]
    ch = tl.arange(0, G)[None, None, :]
    half = tl.arange(0, G // 2)[None, None, :]
    chan = grp * G + ch  # [1, NG, G]
    kc_ptr, vc_ptr, _ = _cache_slab(kc_ptr, vc_ptr, b, h, stride_cb, stride_ch, True)
    code_offs = pos[:, None, None] * (D // 2) + grp * (G // 2) + half
    scale_offs = b * stride_sb + h * stride_sh + pos[:, None] * NG + tl.arange(0, NG)[None, :]
    # V is loaded before K's stores so both loads are in flight at once (the compiler does
    # not move a load above a store that may alias it)
    b = b.to(tl.int64)  # (the new tokens' offsets below)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + t[:, None, None] * stride_vs
                + chan * stride_vd, mask=live[:, None, None], other=0.0)  # fmt: skip
    if WRITE_K:
        k = tl.load(k_ptr + b * stride_kb + h * stride_kh + t[:, None, None] * stride_ks
                    + chan * stride_kd, mask=live[:, None, None], other=0.0)  # fmt: skip
        _quantize_store(
            k.to(tl.float32), kc_ptr, ks_ptr, ko_ptr, code_offs, scale_offs, ok, NG, BLOCK_T, G
        )
    _quantize_store(
        v.to(tl.float32), vc_ptr, vs_ptr, vo_ptr, code_offs, scale_offs, ok, NG, BLOCK_T, G
    )


@triton.jit
def _kv4_key_channels_write_kernel(
    k_ptr, kc_ptr, ks_ptr, ko_ptr, kr_ptr, pos_ptr, Sn, S,
    stride_kb, stride_kh, stride_ks, stride_kd, stride_cb, stride_ch, stride_sb, stride_sh,
    stride_rb, stride_rh,
    HKV: tl.constexpr, D: tl.constexpr, T: tl.constexpr,
):  # fmt: skip
    # Keys per channel over groups of T tokens, new keys at [p0, p0 + Sn) (consecutive,
    # p0 = positions[0], read here so a CUDA graph replays any position). One program per
    # (batch, KV head, group the write touches): a group the write completes is quantized
    # per channel from its T tokens (the residual's earlier ones, the new ones rounded to the
    # residual's dtype first, as `qcompile.quant.kv4.write_keys_per_channel_`), codes and
    # scales stored. The new tokens of a last, incomplete group go to the residual, written
    # by program 0 after a barrier: program 0's group is the only one that reads old
    # residual tokens, and the incomplete group's tokens reuse those slots.
    pid_bh = tl.program_id(0)
    b = (pid_bh // HKV).to(tl.int64)  # 64-bit cache offsets, as `_cache_slab`
    h = pid_bh % HKV
    p0 = tl.load(pos_ptr).to(tl.int32)
    p1 = tl.minimum(p0 + Sn, S)  # positions past the cache are dropped
    g = p0 // T + tl.program_id(1)
    lo = g * T
    d = tl.arange(0, D)
    slot = tl.arange(0, T)
    key_base = k_ptr + b * stride_kb + h * stride_kh + d[None, :] * stride_kd
    res_ptrs = kr_ptr + b * stride_rb + h * stride_rh + slot[:, None] * D + d[None, :]
    if lo + T <= p1:  # this write completes group g
        idx = lo + slot
        is_new = idx >= p0
        new = tl.load(key_base + (idx - p0)[:, None] * stride_ks, mask=is_new[:, None], other=0.0)
        old = tl.load(res_ptrs, mask=(idx < p0)[:, None], other=0.0)
        x = tl.where(is_new[:, None], new.to(kr_ptr.dtype.element_ty), old).to(tl.float32)
        lo_c = tl.min(x, axis=0)
        hi_c = tl.max(x, axis=0)
        scale = tl.maximum(tl.math.div_rn(hi_c - lo_c, 15.0), _MIN_SCALE).to(tl.float16)
        offset = lo_c.to(tl.float16)
        v = tl.math.div_rn(x - offset.to(tl.float32)[None, :], scale.to(tl.float32)[None, :])
        codes = tl.minimum(tl.maximum(tl.floor(v + 0.5), 0.0), 15.0).to(tl.int32)
        even, odd = tl.split(tl.reshape(codes, (T, D // 2, 2)))
        half = tl.arange(0, D // 2)
        tl.store(kc_ptr + b * stride_cb + h * stride_ch + idx[:, None] * (D // 2)
                 + half[None, :], (even | (odd << 4)).to(tl.uint8))  # fmt: skip
        group_ptr = b * stride_sb + h * stride_sh + g * D + d
        tl.store(ks_ptr + group_ptr, scale)
        tl.store(ko_ptr + group_ptr, offset)
    last = tl.maximum(p1 - 1, 0) // T * T  # first position of the last group written
    if tl.program_id(1) == 0 and p0 < p1 and last + T > p1:
        tl.debug_barrier()  # every thread has read the old residual tokens above
        idx = last + slot
        is_new = (idx >= p0) & (idx < p1)
        new = tl.load(key_base + (idx - p0)[:, None] * stride_ks, mask=is_new[:, None], other=0.0)
        tl.store(res_ptrs, new.to(kr_ptr.dtype.element_ty), mask=is_new[:, None])


# --------------------------------------------------------------------------- configs
def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def seq_bucket(s: int) -> int:
    """Next power of two of the cache length S (at least 16)."""
    return max(16, 1 << max(s - 1, 0).bit_length())


def decode_rows(sq: int, gqa: int) -> int:
    """BLOCK_M of the decode strategy: every query row of a KV head in one tile (>= 16 for
    tl.dot, so MHA pads 1 row to 16: the tensor cores idle anyway in a memory-bound loop)."""
    return max(16, 1 << max(sq * gqa - 1, 0).bit_length())


def decode_t_rows(gqa: int, least: int = 4) -> int:
    """BLOCK_M of "decode_t" (one query position): its GQA heads, at least `least`, a power
    of two."""
    return max(least, 1 << max(gqa - 1, 0).bit_length())


def decode_kind(groups: int) -> str:
    """The decode kernel for D/G groups per head: "decode" (`_kv4_decode_kernel`, 2-D
    nibble planes) takes one group per head (G = D, the default), "decode_grouped"
    (`_kv4_attention_kernel` split over the sequence) any number."""
    return "decode" if groups == 1 else "decode_grouped"


def prefill_kind(groups: int) -> str:
    """Likewise for prefill: "prefill" (`_kv4_decode_kernel` over row tiles) at G = D,
    "prefill_grouped" (`_kv4_attention_kernel`) otherwise."""
    return "prefill" if groups == 1 else "prefill_grouped"


_KINDS = ("decode", "decode_grouped", "prefill", "prefill_grouped", "decode_t")
_ONE_GROUP_KINDS = ("decode", "prefill", "decode_t")


def valid_config(cfg: KernelConfig, rows: int, groups: int = 1, key_tokens: int = 0) -> bool:
    """Power-of-two tiles, BLOCK_M >= 16 (tl.dot's minimum), BLOCK_N >= 32, decode tiles
    holding every row, "decode" only for one group per head. BLOCK_N = 16 computes wrong
    attention on the H100 with Triton 3.6 (rel. error 2.7-5.5 at any BLOCK_M, warps or
    stages, `benchmarks/probe_kv4_prefill.py`) while the interpreter gets it right, so no
    config may use it. Keys per channel over `key_tokens` tokens: "decode"/"prefill" with
    BLOCK_N dividing key_tokens. `prefetch` (the next tile's token scales, loaded one
    iteration ahead) and `max_registers` only on the one-group kernel; `stage_v` only on
    "decode"."""
    if cfg.kernel not in _KINDS:
        return False
    if cfg.kernel == "decode_t":  # one query position: BLOCK_M is its GQA heads, >= 4
        return (
            groups == 1 and not cfg.max_registers and cfg.split_k >= 1
            and (not key_tokens or (_DECODE_T_KEY_TOKENS and key_tokens % cfg.block_n == 0))
            and _pow2(cfg.block_m) and 4 <= cfg.block_m <= 16 and cfg.block_m >= rows
            and _pow2(cfg.block_n) and cfg.block_n >= 32 and cfg.prefetch in (0, 1)
        )  # fmt: skip
    if not (_pow2(cfg.block_m) and _pow2(cfg.block_n)) or cfg.block_m < 16 or cfg.block_n < 32:
        return False
    if cfg.kernel in _ONE_GROUP_KINDS and groups != 1:
        return False
    if cfg.prefetch not in (0, 1) or (cfg.prefetch and cfg.kernel not in _ONE_GROUP_KINDS):
        return False  # the scale prefetch is the one-group kernel's
    if cfg.stage_v and cfg.kernel != "decode":
        return False  # prefill tiles (BLOCK_M >= 64) stage V through shared memory anyway
    if cfg.max_registers and (
        cfg.kernel not in _ONE_GROUP_KINDS or not 24 <= cfg.max_registers <= 255
    ):
        return False  # the register cap is passed to the one-group kernel's launch only
    if key_tokens and (cfg.kernel not in _ONE_GROUP_KINDS or key_tokens % cfg.block_n):
        return False  # keys per channel: the 2-D kernel, tiles within one group of tokens
    if cfg.kernel.startswith("decode"):
        return cfg.block_m >= rows and cfg.split_k >= 1
    return cfg.split_k == 1


# Split the sequence until the grid covers ~4 waves of an H100 (132 SMs); past that the
# partials cost traffic without adding parallelism.
_SPLIT_PROGRAM_TARGET = 4 * 132


def candidate_configs(
    b: int, hkv: int, sq: int, gqa: int, s: int, groups: int = 1, key_tokens: int = 0,
    device: int | None = None,
) -> list[KernelConfig]:  # fmt: skip
    """What autotuning tries for one (rows, head_dim, S bucket, group, dtype, B * Hkv);
    keys per channel cap BLOCK_N at their group of `key_tokens` tokens; `device` as in
    `default_config`."""
    rows = sq * gqa
    out: list[KernelConfig] = []
    cap = key_tokens or 1 << 30
    if rows <= 64:
        bm = decode_rows(sq, gqa)
        for split in _tuning_splits(b * hkv, s):
            for bn, warps, stages in _DECODE_TILES[decode_kind(groups)]:
                bn = min(bn, cap)
                cfg = KernelConfig(decode_kind(groups), bm, bn, 0, split, warps, stages)
                # V staged through shared memory: 11-17% fewer loop instructions (offline
                # sm_90), more shared memory per program; wins at BLOCK_N 32 (H100)
                out += [cfg, dataclasses.replace(cfg, stage_v=True)]
                if warps == 1 and bn <= 64 and groups == 1 and not key_tokens:
                    # the token-scale prefetch: B=16, S=32k on the H100 (bf16), 304.7 -> 277.6
                    # us at its best split (`results/session17/probe_kv4_pf.log`); with
                    # stage_v at BLOCK_N 32, 260.0 us (fp16, `results/session24/`)
                    pf = dataclasses.replace(cfg, prefetch=True)
                    out += [pf, dataclasses.replace(pf, stage_v=True)]
    per_token_or_t = not key_tokens or _DECODE_T_KEY_TOKENS
    if sq == 1 and gqa <= 16 and groups == 1 and per_token_or_t and _DECODE_T_CANDIDATES:
        bm = decode_t_rows(gqa)
        # the powers of two and the split filling one wave (`_wave_split`)
        wave = _decode_t_wave(b * hkv, s, bm, device, key_tokens)
        # keys per channel also one split past their wave: B = 16 on the H100 (4 columns),
        # S = 32k 271.6 -> 253.5 us, 8k 77.6 -> 74.3 (`results/session30/tkeys/`)
        past = [wave + 1] if key_tokens and wave + 1 <= min(128, s // 64) else []
        for split in dict.fromkeys([*_tuning_splits(b * hkv, s), wave, *past]):
            for bn, warps, stages in _DECODE_TILES["decode_t"]:
                bn = min(bn, cap)
                cfg = KernelConfig("decode_t", bm, bn, 0, split, warps, stages, prefetch=True)
                out += [cfg, dataclasses.replace(cfg, stage_v=True)]
        wide = decode_t_rows(gqa, 8)
        if wide != bm:
            # 8 head columns (padding past GQA 4) at their own wave: the H100's best at B = 1
            # S = 8k per token (the shipped key) and at B = 1 / 64 with keys per channel
            # (`results/session29/tkeys_fma/`: B = 64 S = 32k 1013.4 -> 921.7 us)
            split = _decode_t_wave(b * hkv, s, wide, device, key_tokens)
            out.append(KernelConfig("decode_t", wide, 32, 0, split, 1, 3, True, stage_v=True))
    if sq > 1:
        for bm, bn, warps, stages in _PREFILL_TILES[prefill_kind(groups)]:
            out.append(KernelConfig(prefill_kind(groups), bm, min(bn, cap), 0, 1, warps, stages))
    out = list(dict.fromkeys(out))  # capping BLOCK_N can repeat a config
    return [c for c in out if valid_config(c, rows, groups, key_tokens)]


# `KernelConfig.max_registers` (Triton's maxnreg) is valid on the one-group kernel but not a
# candidate. The shipped decode tile (BLOCK_N 32, one warp, prefetch, staged V) needs 242-246
# registers per thread, 8 resident programs per SM. Capped at 184 (no spill offline, loop 4%
# longer, 11 per SM) or 168 (8 local loads/stores per tile, 12 per SM) with up to twice the
# splits, it was slower at every probed shape on the H100: best B=16 S=32k 248.6 -> 263.4 /
# 376.0 us, B=64 S=8k 253.3 -> 258.6 / 372.1, B=1 S=32k 25.4 -> 27.3
# (`results/session26/capped/`). The decode loop is not short of resident warps.


def _tuning_splits(programs: int, s: int) -> list[int]:
    """Split factors worth tuning for `programs` (batch x KV heads) over `s` keys: powers of
    two up to 128 while half the split's grid stays under `_SPLIT_PROGRAM_TARGET` programs and
    every split keeps >= 64 keys."""
    splits = (1, 2, 4, 8, 16, 32, 64, 128)
    target = _SPLIT_PROGRAM_TARGET
    return [p for p in splits if p == 1 or (programs * p // 2 < target and s >= p * 64)]


# (SMs, shared memory per SM) of the H100 and H200 (the shipped targets): what the CPU and
# the interpreter plan for.
_SM90 = (132, 228 * 1024)
# The one-warp "decode_t" tile (BLOCK_N 32, 3 stages, prefetch, staged V) per head-column
# count: (registers per thread, shared memory per program), sm_90 with Triton 3.6;
# `tests/test_offline_compile.py` checks them against the compiled kernel.
_DECODE_T_TILE = {4: (168, 17536), 8: (151, 18560), 16: (251, 20608)}
# The same over keys per channel (`KEY_TOKENS` 64, fp16 or bf16 query; T = 32 at 4 columns:
# 168 registers): 10 programs per SM at 4 and 8 columns.
_DECODE_T_KEY_TILE = {4: (199, 19584), 8: (168, 21632), 16: (255, 25728)}


@functools.cache
def _sm_budget(device: int | None) -> tuple[int, int]:
    """(SMs, shared memory per SM in bytes) of CUDA device `device`; sm_90's without one."""
    if device is None or not torch.cuda.is_available():
        return _SM90
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_multiprocessor", 0) or _SM90[1]
    return props.multi_processor_count, smem


def resident_programs(regs: int, shared: int, smem_per_sm: int = _SM90[1]) -> int:
    """One-warp programs an SM holds at once: 64K registers allocated 256 per warp, shared
    memory with 1 KB reserved per program, at most 32."""
    warp_regs = -(-regs * 32 // 256) * 256
    return max(1, min(65536 // warp_regs, smem_per_sm // (shared + 1024), 32))


def _decode_t_wave(
    programs: int, s: int, rows: int, device: int | None, key_tokens: int = 0
) -> int:
    """`_wave_split` for the one-warp decode_t tile over `rows` head columns on `device`
    (sm_90: 12 / 11 / 8 programs per SM at 4 / 8 / 16 columns; keys per channel 10 / 10)."""
    sms, smem = _sm_budget(device)
    tile = (_DECODE_T_KEY_TILE if key_tokens else _DECODE_T_TILE)[rows]
    return _wave_split(programs, s, resident_programs(*tile, smem), 64, sms=sms)


def _wave_split(
    programs: int, s: int, resident: int, min_keys: int, limit: int = 128, sms: int = _SM90[0]
) -> int:
    """The largest split (any integer <= limit, >= `min_keys` keys each) whose grid fits one
    wave of `resident` programs per SM. On the H100 a one-warp decode_t grid of 1024
    programs (B=16 split 8, B=64 split 2: 7.8 per SM) left the loop latency-bound; filling
    the 12 slots (split 12 / split 3) took B=16 S=32k 234.6 -> 217.8 us, B=64 S=8k 239.5 ->
    215.6, while a grid past one wave (8 columns at split 12: 1536 > 11 x 132) ran 283.1
    (`results/session28/splits/`)."""
    fit = max(1, resident * sms // max(programs, 1))
    return max(1, min(fit, limit, s // min_keys))


def _default_split(programs: int, s: int, per_sm: int, min_keys: int, limit: int = 128) -> int:
    """The largest power-of-two split (<= limit) with at most ~`per_sm` programs per H100 SM
    (132) and >= `min_keys` keys per split."""
    split = 1
    while split < limit and programs * split * 2 <= per_sm * 132 and s >= split * 2 * min_keys:
        split *= 2
    return split


# (BLOCK_M, BLOCK_N, warps, stages) per prefill kernel
_PREFILL_TILES = {
    "prefill": ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3),
                (64, 128, 4, 2), (128, 128, 8, 2)),
    "prefill_grouped": ((64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (128, 32, 8, 2),
                        (128, 64, 8, 2), (128, 64, 8, 3)),
}  # fmt: skip
_SELF_REDUCE_SPLITS = 8
# `_kv4_decode_kernel` accumulates P @ V in place, in units of the tile's power of two
# (False: a fresh dot per tile, scaled and added; kept for `benchmarks/probe_kv4_fold.py`).
_FOLD_UNIT = True
# Programs that read more than this many keys take V's codes as code - 8 (its offset takes
# + 8 * scale). P @ V accumulates in place in the tensor cores, whose fp32 adds truncate
# toward zero (Fasi et al., 2021), so the error grows with the keys one program reads and
# with the accumulator's size. With codes 0..15 the accumulator holds ~7.5 * scale * sum(p)
# and the offsets' sum takes nearly all of it back out: on a randn cache (flat attention,
# outputs ~1/sqrt(S)) the H100 lost 1.6e-2 relative at 16k keys per program and 2.2e-3 at
# 4k; centered, 16k keys stayed under 2e-3. Centering cost 2-5% at the shipped decode tiles
# (B=16 S=32k split 8 253.8 -> 258.6 us, B=64 S=8k split 2 253.3 -> 260.0, two runs each;
# `results/session26/center_v_repeat/`), so programs of at most 4k keys keep their codes.
_CENTER_V_KEYS = 4096
# Per-token keys unpacked as 16 + code (`_nibble_planes` PLUS16, no subtraction; the dot's extra
# 16 * sum(q) taken out of the offset): 2106 -> 2010 loop instructions with STAGE_V, 2431 ->
# 2344 without (offline sm_90, Triton 3.6, 64-token one-warp tile). Off: on the H100 it kept
# the error (fp16 2.49e-4 vs 2.48e-4) but slowed the best tile, BLOCK_N 32 with STAGE_V, from
# 260.0 to 280.8 us at B=16, S=32k (`results/session24/first/probe_kv4_stage_v.log`).
_KEY_BIAS16 = False
# Decode tiles read the query as whole rows (`_kv4_decode_kernel` Q_ROWS): the MMA operand
# stays in registers over the loop. Offline sm_90 (Triton 3.6), loop instructions per tile:
# BLOCK_N 32 one warp with prefetch and STAGE_V 1115 -> 1012, BLOCK_N 64 2431 -> 2248; 4 KB
# less shared memory, no new spills. Prefill tiles (BLOCK_M 64) grew 2%, and keys per channel
# spilled (two-warp BLOCK_N 64: 96 B of stack, 2006 -> 2177), so both keep the plane loads.
# Triton 3.9 spills the BLOCK_N 32 tile more with it (48 -> 200 B). Off: on the H100 it was
# within noise (B=16 S=32k best tile 251.6 us off, 257.2 on; B=1 25.4 vs 25.1;
# `results/session25/probe_switches*.log`).
_Q_ROWS = False
# "decode_t" (keys on the MMA's M side) beat the decode kernel at every probed shape on the
# H100 (fp16, BLOCK_N 32, one warp, 3 stages, prefetch, staged V, the same splits): B=16
# S=32k 252.0 -> 237.1 us, B=64 S=32k 988.4 -> 921.6, B=64 S=8k 255.7 -> 239.3, B=16 S=8k
# 70.4 -> 66.8, B=1 S=32k 25.8 -> 23.9, B=1 S=8k 13.0 -> 12.0 (`results/session27/decode_t/`).
_DECODE_T_CANDIDATES = True
# "decode_t" grids reduced by a second launch (more than `_SELF_REDUCE_SPLITS` splits) of at
# most this many output rows (B x query heads) launch it with programmatic dependent launch:
# its programs are placed while the attention grid drains and wait for it on the GPU, not
# behind a kernel boundary. H100, fp16 (`results/session29/pdl/`): B=1 (32 rows) S=8k 11.8 ->
# 11.0 us (split 96 and 128), S=32k 23.6 -> 22.9; B=16 (512 rows, split 12) lost, 62.9 ->
# 65.1 and 216.5 -> 218.9. Between 32 and 512 rows: untimed, so off. 0: never.
_REDUCE_PDL = 32
# The per-token cache write and the "decode_t" attention launched with programmatic dependent
# launch (each waits for the kernel before it on the GPU; the write lets the attention be
# placed at once): the two kernel boundaries of a decode step's attention that run without
# PDL while the lane kernel and Inductor's kernels use it. Bit-exact under CUDA graphs (gpu
# test). Off: H100, bf16, 16 layers, 8000-token prompt, two rounds (`probe_e2e_long.py --pdl
# --kv4-pdl`, `results/session35/kv4pdl/`): GPU ms per forward 2.266 / 2.317 -> 2.244 / 2.211,
# wall ms per step 2.779 / 2.735 -> 2.815 / 2.765, within the rounds' spread.
_KV4_PDL = False
# "decode_t" over keys per channel (`KEY_TOKENS`): valid, a tuning candidate and the untuned
# default for one query position (off: the decode kernel's two-warp BLOCK_N 64 programs).
# H100, fp16, T = 64 (`results/session29/tkeys_fma/`): 0.49-0.64x the decode kernel's time,
# 1.00-1.28x per-token keys' (B=16 S=32k 467.8 -> 269.7 us, B=64 S=32k 1820.1 -> 921.7 at 8
# columns, B=1 S=32k 41.3 -> 22.5).
_DECODE_T_KEY_TOKENS = True
# "decode_t" unpacks with `_nibble_planes` SWAP (9 instructions per 8 codes instead of 12).
_SWAP_PAIRS = True
# "decode_t" with a bf16 query: K's planes in fp16 (the query scaled into fp16 per head), so
# they are swapped too: offline sm_90 (BLOCK_N 32, 8 columns) 850 -> 819 loop instructions.
# Untimed, so off.
_FP16_KEYS = False
# (BLOCK_N, warps, stages) per decode kernel. "decode": one warp per 32 keys with the
# prefetch and staged V won every shipped key on the H100 (twenty-fourth session; one warp
# per 64 keys before), `benchmarks/probe_kv4_decode.py`.
_DECODE_TILES = {
    "decode": (
        (32, 1, 3),
        (64, 1, 3),
        (64, 1, 2),
        (128, 2, 3),
        (128, 4, 3),
        (128, 8, 3),
        (256, 4, 3),
        (256, 8, 2),
    ),  # fmt: skip
    "decode_grouped": ((32, 2, 2), (64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 3)),
    "decode_t": ((32, 1, 3), (64, 1, 3), (64, 2, 3), (128, 4, 3)),
}


def default_config(
    b: int, hkv: int, sq: int, gqa: int, s: int, groups: int = 1, key_tokens: int = 0,
    device: int | None = None,
) -> KernelConfig:  # fmt: skip
    """Used without tuning (QCOMPILE_AUTOTUNE=0, CUDA-graph capture): valid for every shape;
    `device` (a CUDA index; None: an H100) sizes the decode_t grid to its SMs."""
    rows = sq * gqa
    bn = min(64, key_tokens or 64)
    per_channel_t = key_tokens > 0 and key_tokens % 32 == 0 and _DECODE_T_KEY_TOKENS
    if sq == 1 and gqa <= 16 and groups == 1 and (not key_tokens or per_channel_t):
        # one query position of <= 16 heads, per-token keys: what the H100 tuner and probe
        # picked at B = 1 / 16 / 64, S = 8k / 32k (`results/session24/`, `session27/
        # decode_t/`, `session28/`): "decode_t" over its head columns, 32 keys per one-warp
        # tile, the token-scale prefetch, V staged, split to fill one wave of resident
        # programs (>= 64 keys each). Keys per channel the same, their wave sized by their
        # own tile (`_DECODE_T_KEY_TILE`, `session29/tkeys_fma/`).
        bm = decode_t_rows(gqa)
        split = _decode_t_wave(b * hkv, s, bm, device, key_tokens)
        return KernelConfig("decode_t", bm, 32, 0, split, 1, 3, True, stage_v=True)
    if rows <= 64 and groups == 1 and key_tokens:
        # keys per channel: two-warp programs (the query scaling spills a one-warp program:
        # sm_90, 440 B of stack at BLOCK_N = 64), splits up to ~8 programs per SM with
        # >= 512 keys each
        split = _default_split(b * hkv, s, 8, 512)
        return KernelConfig("decode", decode_rows(sq, gqa), bn, 0, split, 2, 3)
    if rows <= 64 and groups == 1:
        # per-token keys over several query positions: the decode kernel's tile as above,
        # ~8 programs per SM with >= 128 keys per split
        split = _default_split(b * hkv, s, 8, 128)
        return KernelConfig("decode", decode_rows(sq, gqa), 32, 0, split, 1, 3, True, stage_v=True)
    if rows <= 64:
        split = _default_split(b * hkv, s, 2, 256, limit=64)
        return KernelConfig("decode_grouped", decode_rows(sq, gqa), 64, 0, split, 4, 2)
    return KernelConfig(prefill_kind(groups), 64, bn, 0, 1, 4, 2)


# --------------------------------------------------------------------------- launchers
# Bit pattern of the bias whose mantissa a nibble is ORed into, per query dtype
# (`_nibble_planes`): 1024 in fp16 (spacing 1 up to 2048), 128 in bf16 (spacing 1 up to 256).
_Q_BIAS = {torch.float16: 0x6400, torch.bfloat16: 0x4300}


# Caches whose farthest element lies this many elements from their base take 64-bit slab
# offsets (`_cache_slab`); a test lowers it to run the wide form on small caches.
_WIDE_ELEMENTS = 2**31


def wide_offsets(*tensors: torch.Tensor) -> bool:
    """Whether some element of `tensors` lies 2**31 or more elements from its base pointer
    (strides in elements), past what a 32-bit offset reaches."""
    far = (sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)) for t in tensors)
    return max(far, default=0) >= _WIDE_ELEMENTS


def split_buffers(split: int, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, lse) of an attention launch writing out [B, Hq, Sq, D]: out itself unsplit
    (lse unused), else fp32 partials [split, B, Hq, Sq, D] and log-sum-exps [split, B, Hq, Sq]."""
    if split == 1:
        return out, out
    part = torch.empty((split, *out.shape), device=out.device, dtype=torch.float32)
    return part, torch.empty((split, *out.shape[:3]), device=out.device, dtype=torch.float32)


def mask_args(mask: torch.Tensor | None, shape: tuple, out: torch.Tensor) -> tuple:
    """(MASK_KIND, pointer argument, 4 strides) of an attention mask broadcast to `shape`
    [B, Hq, Sq, S]: 0 none, 1 bool (read as uint8), 2 additive float."""
    if mask is None:
        return 0, out, (0, 0, 0, 0)
    full = mask.expand(*shape)
    if mask.dtype == torch.bool:
        return 1, full.view(torch.uint8), full.stride()
    return 2, full, full.stride()


def reduce_splits(
    target: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, pdl: bool = False
) -> None:
    """Combine a split launch's partials into out (no-op when the launch was not split);
    `pdl`: launched with programmatic dependent launch after a grid that triggers it."""
    if target is out:
        return
    split, rows_total, d = target.shape[0], out.numel() // out.shape[-1], out.shape[-1]
    _kv4_split_reduce_kernel[(rows_total,)](
        target, lse, out, rows_total, SPLITS=split, SPLITS_POW2=triton.next_power_of_2(split),
        D=d, PDL=pdl, **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip


def launch_attention(
    cfg: KernelConfig,
    query: torch.Tensor,
    k_codes: torch.Tensor,
    k_scales: torch.Tensor,
    k_offsets: torch.Tensor,
    v_codes: torch.Tensor,
    v_scales: torch.Tensor,
    v_offsets: torch.Tensor,
    seq_lens: torch.Tensor | None,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    k_residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run one config: query [B, Hq, Sq, D] (any strides) -> out [B, Hq, Sq, D] contiguous.

    The packed cache tensors must be contiguous (the op checks). With `k_residual` the keys
    are stored per channel (one-group kernels only, BLOCK_N dividing T)."""
    b, hq, sq, d = query.shape
    hkv, s = k_codes.shape[1], k_codes.shape[2]
    gqa = hq // hkv
    g = d // v_scales.shape[-1]
    key_tokens = 0 if k_residual is None else k_residual.shape[2]
    if out is None:
        out = torch.empty((b, hq, sq, d), device=query.device, dtype=query.dtype)
    elif not out.is_contiguous():
        raise ValueError("launch_attention: out must be contiguous")
    rows_total = b * hq * sq
    split = cfg.split_k if cfg.kernel.startswith("decode") else 1
    target, lse = split_buffers(split, out)
    mask_kind, mask_arg, mask_strides = mask_args(mask, (b, hq, sq, s), out)
    lens_arg = seq_lens if seq_lens is not None else out
    if cfg.kernel == "decode_t" and (sq != 1 or (key_tokens and not _DECODE_T_KEY_TOKENS)):
        # a decode_t key's rows (Sq * GQA) can also be several query positions of fewer heads
        cfg = dataclasses.replace(cfg, kernel="decode", block_m=decode_rows(sq, gqa))
    if cfg.kernel == "decode_t":
        if g != d or query.dtype not in _Q_BIAS:
            raise ValueError(
                f"kv4 decode_t kernel: needs one group per head and a 16-bit query, got "
                f"G={g}, D={d}, {query.dtype}"
            )
        reduce_here = 1 < split <= _SELF_REDUCE_SPLITS and b * hkv <= _COUNTERS
        counters = _tile_counters(query.device) if reduce_here else None
        pdl = rows_total <= _REDUCE_PDL and split > 1 and counters is None and not _interpreting()
        residual = k_residual if k_residual is not None else k_scales
        _kv4_decode_t_kernel[(b * hkv, split)](
            query, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets, lens_arg,
            mask_arg, target, lse, out, counters if counters is not None else lse, residual,
            s, rows_total, scale * _LOG2E,
            query.stride(0), query.stride(1), query.stride(3), k_codes.stride(0),
            k_codes.stride(1), v_scales.stride(0), v_scales.stride(1),
            seq_lens.stride(0) if seq_lens is not None else 0,
            mask_strides[0], mask_strides[1], mask_strides[3],
            k_scales.stride(0), k_scales.stride(1), residual.stride(0), residual.stride(1),
            HKV=hkv, GQA=gqa, D=d, Q_BIAS_BITS=_Q_BIAS[query.dtype],
            HAS_LENS=seq_lens is not None, MASK_KIND=mask_kind, WRITE_PARTIAL=split > 1,
            ROWS=cfg.block_m, BLOCK_N=cfg.block_n, ASM=not _interpreting(),
            SELF_REDUCE=counters is not None, SCALE_PREFETCH=bool(cfg.prefetch),
            STAGE_V=bool(cfg.stage_v), CENTER_V=triton.cdiv(s, split) > _CENTER_V_KEYS,
            WIDE=wide_offsets(k_codes, v_codes),
            COMBINE_ROWS=min(cfg.block_m, triton.next_power_of_2(gqa)),
            SWAP_PAIRS=_SWAP_PAIRS, KEY_MASK=mask_kind != 0 and mask_strides[1] == 0,
            FP16_KEYS=_FP16_KEYS, LAUNCH_DEPENDENTS=pdl, KEY_TOKENS=key_tokens,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_pdl_launch(),
        )  # fmt: skip
        if counters is None:
            reduce_splits(target, lse, out, pdl=pdl)
        return out
    if cfg.kernel in _ONE_GROUP_KINDS:
        if g != d or query.dtype not in _Q_BIAS:
            raise ValueError(
                f"kv4 {cfg.kernel} kernel: needs one group per head and a 16-bit query, got "
                f"G={g}, D={d}, {query.dtype}; use a {cfg.kernel}_grouped config"
            )
        if key_tokens and key_tokens % cfg.block_n:
            raise ValueError(
                f"kv4 {cfg.kernel} kernel: BLOCK_N={cfg.block_n} does not divide the "
                f"{key_tokens} tokens of a per-channel key group; use BLOCK_N <= {key_tokens}"
            )
        # Self-reduce up to 8 splits; past that the last program's combine (a chain of
        # 4-split loads from L2) outlasts a second launch (H100: B=1, S=8k, split 16 took
        # 19.4 us self-reduced, 14.8 us with `_kv4_split_reduce_kernel`).
        reduce_here = 1 < split <= _SELF_REDUCE_SPLITS and b * hkv <= _COUNTERS
        counters = _tile_counters(query.device) if reduce_here else None
        residual = k_residual if k_residual is not None else k_scales
        _kv4_decode_kernel[(b * hkv, split, triton.cdiv(sq * gqa, cfg.block_m))](
            query, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets, lens_arg,
            mask_arg, target, lse, out, counters if counters is not None else lse, residual,
            sq, s, rows_total, scale * _LOG2E,
            *query.stride(), k_codes.stride(0), k_codes.stride(1),
            v_scales.stride(0), v_scales.stride(1),
            seq_lens.stride(0) if seq_lens is not None else 0, *mask_strides,
            k_scales.stride(0), k_scales.stride(1), residual.stride(0), residual.stride(1),
            HKV=hkv, GQA=gqa, D=d, Q_BIAS_BITS=_Q_BIAS[query.dtype],
            HAS_LENS=seq_lens is not None, IS_CAUSAL=is_causal,
            MASK_KIND=mask_kind, WRITE_PARTIAL=split > 1, BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n, ASM=not _interpreting(), SELF_REDUCE=counters is not None,
            FOLD_UNIT=_FOLD_UNIT, KEY_TOKENS=key_tokens, SCALE_PREFETCH=bool(cfg.prefetch),
            STAGE_V=bool(cfg.stage_v), KEY_BIAS16=_KEY_BIAS16 and not key_tokens,
            Q_ROWS=_Q_ROWS and cfg.kernel == "decode" and not key_tokens,
            COMBINE_ROWS=min(cfg.block_m, triton.next_power_of_2(gqa)),
            CENTER_V=triton.cdiv(s, split) > _CENTER_V_KEYS,
            WIDE=wide_offsets(k_codes, v_codes),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            maxnreg=cfg.max_registers or None,
        )  # fmt: skip
        if counters is None:
            reduce_splits(target, lse, out)
        return out
    if key_tokens:
        raise ValueError(f"kv4 {cfg.kernel} kernel: keys per channel need a one-group kernel")
    grid = (triton.cdiv(sq * gqa, cfg.block_m), b * hkv, split)
    _kv4_attention_kernel[grid](
        query, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets, lens_arg, mask_arg,
        target, lse, sq, s, rows_total, scale * _LOG2E,
        *query.stride(), k_codes.stride(0), k_codes.stride(1),
        k_scales.stride(0), k_scales.stride(1),
        seq_lens.stride(0) if seq_lens is not None else 0, *mask_strides,
        HKV=hkv, GQA=gqa, D=d, G=g, HAS_LENS=seq_lens is not None, IS_CAUSAL=is_causal,
        MASK_KIND=mask_kind, WRITE_PARTIAL=split > 1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        WIDE=wide_offsets(k_codes, v_codes), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    reduce_splits(target, lse, out)
    return out


def tune_key(
    query: torch.Tensor, k_codes: torch.Tensor, v_scales: torch.Tensor, key_tokens: int = 0
) -> TuneKey:
    """TuneKey(family, m_bucket(Sq * Hq/Hkv rows), N=D, K=S bucket, G, dtype, B * Hkv bucket);
    keys per channel over T tokens are their own families ("kv4_decode_k64", ...)."""
    b, hq, sq, d = query.shape
    hkv, s = k_codes.shape[1], k_codes.shape[2]
    family = DECODE_FAMILY if sq * (hq // hkv) <= 64 else PREFILL_FAMILY
    if key_tokens:
        family += f"_k{key_tokens}"
    return TuneKey(
        family, m_bucket(sq * (hq // hkv)), d, seq_bucket(s), d // v_scales.shape[-1],
        str(query.dtype).removeprefix("torch."), m_bucket(b * hkv),
    )  # fmt: skip


def kv4_attention_cuda(
    query: torch.Tensor,
    k_codes: torch.Tensor,
    k_scales: torch.Tensor,
    k_offsets: torch.Tensor,
    v_codes: torch.Tensor,
    v_scales: torch.Tensor,
    v_offsets: torch.Tensor,
    seq_lens: torch.Tensor | None,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    k_residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """The op's CUDA path: the tuned config of this shape, then `launch_attention`."""
    b, hq, sq, _ = query.shape
    hkv, s = k_codes.shape[1], k_codes.shape[2]
    gqa = hq // hkv
    groups = v_scales.shape[-1]
    kt = 0 if k_residual is None else k_residual.shape[2]
    args = (query, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets, seq_lens, mask)
    key = tune_key(query, k_codes, v_scales, kt)
    cfg = autotuner(query.device.index or 0).get(
        key,
        lambda: candidate_configs(b, hkv, sq, gqa, s, groups, kt, query.device.index or 0),
        lambda c: time_us(lambda: launch_attention(c, *args, is_causal, scale, k_residual)),
        lambda: default_config(b, hkv, sq, gqa, s, groups, kt, query.device.index or 0),
        valid=lambda c: valid_config(c, sq * gqa, groups, kt),
    )
    return launch_attention(cfg, *args, is_causal, scale, k_residual)


# (tokens per program, warps) of the K/V write of one token per head (a decode step); None:
# the prompt's tile, 8 tokens on 4 warps (the H100's best at 1k tokens, session 22). Offline
# sm_90, one token on one warp compiles to 520 instructions and no barrier, against 736 and
# 7 barriers (the min / max across warps) for 8 tokens on 4 warps, of which 7 are masked at
# decode; in the H100 decode profile the write took 4.3 us a layer, half the attention
# kernel's 8.2 (`results/session30/e2e/`). Timed alone (H100, CUDA-graph replays,
# `results/session31/write/`): one token on 2 warps 4.97 / 4.99 / 5.21 us at B = 1 / 16 / 64,
# against 5.14 / 5.44 / 6.22 for the prompt's tile (1 or 4 warps: within 0.05 us of 2).
_DECODE_WRITE: tuple[int, int] | None = (1, 2)


def _pdl_launch(flag: str = "WAIT") -> dict:
    """The launch arguments of a kernel under `_KV4_PDL`: its constexpr `flag` and the
    launch attribute (none under the interpreter, which runs grids one after another)."""
    if not _KV4_PDL or _interpreting():
        return {}
    return {flag: True, "launch_pdl": True}


def kv4_cache_write_cuda(
    key: torch.Tensor,
    value: torch.Tensor,
    k_codes: torch.Tensor,
    k_scales: torch.Tensor,
    k_offsets: torch.Tensor,
    v_codes: torch.Tensor,
    v_scales: torch.Tensor,
    v_offsets: torch.Tensor,
    positions: torch.Tensor,
    block_t: int | None = None,
    k_residual: torch.Tensor | None = None,
    num_warps: int | None = None,
) -> None:
    """Quantize key/value [B, Hkv, Sn, D] (any strides) into the cache at `positions`
    (consecutive for keys per channel, i.e. with `k_residual`); `block_t` tokens of one head
    per program on `num_warps` warps (None: `_DECODE_WRITE` for one token, else 8 on 4)."""
    b, hkv, sn, d = key.shape
    tile = _DECODE_WRITE if sn == 1 and _DECODE_WRITE is not None else (8, 4)
    block_t = block_t or tile[0]
    num_warps = num_warps or tile[1]
    g = d // v_scales.shape[-1]
    grid = (b * hkv, triton.cdiv(sn, block_t))
    _kv4_cache_write_kernel[grid](
        key, value, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets, positions, sn,
        k_codes.shape[2],
        *key.stride(), *value.stride(), v_codes.stride(0), v_codes.stride(1),
        v_scales.stride(0), v_scales.stride(1),
        HKV=hkv, D=d, G=g, BLOCK_T=block_t, WRITE_K=k_residual is None, num_warps=num_warps,
        **_pdl_launch("PDL"),
    )  # fmt: skip
    if k_residual is None:
        return
    t = k_residual.shape[2]
    # Sn consecutive tokens touch at most cdiv(Sn - 1, T) + 1 groups (fixed for a CUDA graph)
    groups = triton.cdiv(sn - 1, t) + 1
    _kv4_key_channels_write_kernel[(b * hkv, groups)](
        key, k_codes, k_scales, k_offsets, k_residual, positions, sn, k_codes.shape[2],
        *key.stride(), k_codes.stride(0), k_codes.stride(1), k_scales.stride(0),
        k_scales.stride(1), k_residual.stride(0), k_residual.stride(1),
        HKV=hkv, D=d, T=t, num_warps=4 if t * d <= 8192 else 8,
    )  # fmt: skip
