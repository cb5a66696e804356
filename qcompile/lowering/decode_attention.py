"""Flash-decoding over a 16-bit KV cache, GQA-aware: the kernel of `qcompile::decode_attention`.

One program owns one (batch, KV head) and one slice of the sequence; its BLOCK_M query rows
are every (query position, query head) of that KV head (row r = i * GQA + j is position i of
query head hkv * GQA + j), so each K/V tile is read once for all the query heads that share
it, and nothing repeats K/V in memory (transformers' repeat_kv, which Inductor materializes as
a copy of the whole cache per layer). Per tile: S = Q K^T on the tensor cores (K and V tiles
load straight into the dot: Triton pipelines them over num_stages), online softmax in the
log2 domain, O += P V. With split_k > 1 each program writes an fp32 partial output and its
log-sum-exp, combined by the KV4 kernels' split reduction.

Memory-bound: roofline = B * Hkv * S * 2 * D * 2 bytes (K and V, 16-bit) / HBM bandwidth; the
split keeps enough programs in flight to reach it at batch 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.lowering.autotune import KernelConfig, TuneKey, autotuner, m_bucket, time_us
from qcompile.lowering.kv4_attention import (
    _SPLIT_PROGRAM_TARGET,
    _softmax_tile,
    decode_rows,
    mask_args,
    reduce_splits,
    seq_bucket,
    split_buffers,
    wide_offsets,
)

FAMILY = "decode16"
_LOG2E = 1.4426950408889634
_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, lse_ptr,
    Sq, S, rows_total, qk_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_mh, stride_mq, stride_ms,
    HKV: tl.constexpr, GQA: tl.constexpr, D: tl.constexpr, MASK_KIND: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WIDE: tl.constexpr = False,
):  # fmt: skip
    # MASK_KIND: 0 none, 1 bool (as uint8, nonzero = attend), 2 additive float. Output (and the
    # fp32 partials, one [rows_total, D] slab per split) is [B, Hq, Sq, D] contiguous.
    pid_bh = tl.program_id(0)
    pid_split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    rows = tl.arange(0, BLOCK_M)
    pos = rows // GQA
    head = hkv * GQA + rows % GQA
    row_ok = pos < Sq
    d = tl.arange(0, D)
    q = tl.load(
        q_ptr + b * stride_qb + head[:, None] * stride_qh + pos[:, None] * stride_qs
        + d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0,
    )  # fmt: skip

    per_split = tl.cdiv(tl.cdiv(S, num_splits), BLOCK_N) * BLOCK_N
    start = pid_split * per_split
    end = tl.minimum(start + per_split, S)
    m_i = tl.full((BLOCK_M,), _NEG_INF, tl.float32)  # running max, log2 domain
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    # WIDE: 64-bit batch offsets, for a [B, Hkv, S, D] cache past 2**31 elements (B * S >= 2M
    # tokens with 8 KV heads of 128 channels: B = 64 at S = 32k), where b * stride_kb in 32
    # bits wraps; otherwise 32-bit, as the KV4 kernels (`kv4_attention._cache_slab`)
    bw = b.to(tl.int64) if WIDE else b
    k_base = k_ptr + bw * stride_kb + hkv * stride_kh + d[None, :] * stride_kd
    v_base = v_ptr + bw * stride_vb + hkv * stride_vh + d[None, :] * stride_vd
    mask_base = mask_ptr + b * stride_mb + head[:, None] * stride_mh + pos[:, None] * stride_mq
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < end
        k = tl.load(k_base + cols[:, None] * stride_ks, mask=col_ok[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
        visible = row_ok[:, None] & col_ok[None, :]
        p, alpha, m_new, l_i = _softmax_tile(
            scores, visible, mask_base + cols[None, :] * stride_ms, m_i, l_i, MASK_KIND
        )
        v = tl.load(v_base + cols[:, None] * stride_vs, mask=col_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out_row = (b * HKV * GQA + head) * Sq + pos  # row of the [B, Hq, Sq] output
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]  # rows that saw no key: acc = 0 -> 0
    out_ptrs = out_ptr + pid_split * rows_total * D + out_row[:, None] * D + d[None, :]
    if WRITE_PARTIAL:
        tl.store(out_ptrs, out, mask=row_ok[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), _NEG_INF)
        tl.store(lse_ptr + pid_split * rows_total + out_row, lse, mask=row_ok)
    else:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------- configs
def valid_config(cfg: KernelConfig, rows: int) -> bool:
    """Power-of-two tiles, BLOCK_M >= 16 (tl.dot's minimum) holding every row, BLOCK_N >= 32."""
    pow2 = all(v > 0 and v & (v - 1) == 0 for v in (cfg.block_m, cfg.block_n))
    return (
        cfg.kernel == "decode16" and pow2 and cfg.block_m >= max(16, rows)
        and cfg.block_n >= 32 and cfg.split_k >= 1
    )  # fmt: skip


def _split(b: int, hkv: int, s: int, min_keys: int) -> int:
    """Largest power-of-two split (<= 64) keeping >= min_keys keys per split and the grid
    within ~2 waves of the H100's 132 SMs."""
    split = 1
    while split < 64 and b * hkv * split * 2 <= 2 * 132 and s >= split * 2 * min_keys:
        split *= 2
    return split


def candidate_configs(b: int, hkv: int, sq: int, gqa: int, s: int) -> list[KernelConfig]:
    """What autotuning tries for one (rows, head_dim, S bucket, dtype, B * Hkv bucket)."""
    bm = decode_rows(sq, gqa)
    out = []
    for split in (1, 2, 4, 8, 16, 32, 64):
        if split > 1 and (b * hkv * split // 2 >= _SPLIT_PROGRAM_TARGET or s < split * 32):
            continue
        for bn, warps, stages in ((32, 4, 2), (64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2)):
            out.append(KernelConfig("decode16", bm, bn, 0, split, warps, stages))
    return [c for c in out if valid_config(c, sq * gqa)]


def default_config(b: int, hkv: int, sq: int, gqa: int, s: int) -> KernelConfig:
    """Used without tuning (QCOMPILE_AUTOTUNE=0, CUDA-graph capture): valid for every shape."""
    return KernelConfig("decode16", decode_rows(sq, gqa), 64, 0, _split(b, hkv, s, 64), 4, 2)


# --------------------------------------------------------------------------- launchers
def launch(
    cfg: KernelConfig,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run one config: query [B, Hq, Sq, D], key/value [B, Hkv, S, D] (any strides) ->
    out [B, Hq, Sq, D] contiguous."""
    b, hq, sq, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    gqa = hq // hkv
    if out is None:
        out = torch.empty((b, hq, sq, d), device=query.device, dtype=query.dtype)
    elif not out.is_contiguous():
        raise ValueError("decode_attention launch: out must be contiguous")
    rows_total = b * hq * sq
    split = cfg.split_k
    target, lse = split_buffers(split, out)
    mask_kind, mask_arg, mask_strides = mask_args(mask, (b, hq, sq, s), out)
    _decode_attention_kernel[(b * hkv, split)](
        query, key, value, mask_arg, target, lse, sq, s, rows_total, scale * _LOG2E,
        *query.stride(), *key.stride(), *value.stride(), *mask_strides,
        HKV=hkv, GQA=gqa, D=d, MASK_KIND=mask_kind, WRITE_PARTIAL=split > 1,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, WIDE=wide_offsets(key, value),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    reduce_splits(target, lse, out)
    return out


def tune_key(query: torch.Tensor, key: torch.Tensor) -> TuneKey:
    """TuneKey(family, m_bucket(rows), N=D, K=S bucket, 0, dtype, B * Hkv bucket)."""
    b, hq, sq, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    return TuneKey(
        FAMILY, m_bucket(sq * (hq // hkv)), d, seq_bucket(s), 0,
        str(query.dtype).removeprefix("torch."), m_bucket(b * hkv),
    )  # fmt: skip


def decode_attention_cuda(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """The op's CUDA path: the tuned config of this shape, then `launch`."""
    b, hq, sq, _ = query.shape
    hkv, s = key.shape[1], key.shape[2]
    gqa = hq // hkv
    tkey = tune_key(query, key)
    cfg = autotuner(query.device.index or 0).get(
        tkey,
        lambda: candidate_configs(b, hkv, sq, gqa, s),
        lambda c: time_us(lambda: launch(c, query, key, value, mask, scale)),
        lambda: default_config(b, hkv, sq, gqa, s),
        valid=lambda c: valid_config(c, sq * gqa),
    )
    return launch(cfg, query, key, value, mask, scale)
