"""KV4 ops: attention that reads a packed int4 K/V cache, and quantize-on-write into it.

* `qcompile::kv4_attention(query, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets,
  seq_lens, mask, is_causal, scale, k_residual=None)`: softmax(Q K^T * scale + mask) V with K
  and V in the layout of `qcompile.quant.kv4`, grouped-query attention by shape (Hq a
  multiple of Hkv). With `k_residual` [B, Hkv, T, D], K is stored per channel over T tokens
  (k_scales [B, Hkv, ceil(S / T), D]); the last incomplete group is read from the residual.
* `qcompile::kv4_prefill_attention(query, key, value, <the six cache tensors>, positions,
  mask, scale, k_residual=None, length=None, start_hint=-1)`: a chunk of Sq > 1 queries right
  after its key/value [B, Hkv, Sq, D] were written at `positions`: it attends to them in
  16 bits and to earlier positions in 4 bits (`KVScheme.fresh_prefill`). On CUDA a prompt
  into an empty cache (start_hint, or positions[0], = 0) is exactly SDPA over the chunk.
* `qcompile::kv4_cache_write(key, value, <the six cache tensors>, positions)`: quantize new
  K/V [B, Hkv, Sn, D] and store them at `positions` along S, in place;
  `qcompile::kv4_cache_write_channels(..., positions, k_residual)` the same for keys per
  channel, whose positions must be consecutive (the write of one step or one prompt).
* `qcompile::kv4_dequantize(codes, scales, offsets, dtype, residual=None, length=None)`: the
  plain [B, H, S, D] tensor;
  what a KV4 cache returns to attention code that cannot read int4 (SDPA, eager), and what
  the attention pass folds away when it rewrites that attention into `kv4_attention`.

The reference implementations (dequantize, then plain attention in float32) are the CPU path,
the test oracle and the definition of the math; on CUDA the ops run the Triton kernels of
`qcompile.lowering.kv4_attention`. The ops are opaque to Inductor.

Masking, in the order applied: key j of batch b exists iff j < seq_lens[b] (all S when
seq_lens is None); with is_causal, query i sees key j iff j <= i + seq_lens[b] - Sq (the
queries are the last Sq positions: bottom-right alignment, as in a KV cache); `mask`
(4-D, broadcastable to [B, Hq, Sq, S]) is boolean (True = attend) or additive float. A query
that sees no key gets a zero output row (SDPA would give NaN).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qcompile.config import KVScheme
from qcompile.quant.kv4 import (
    SCALE_DTYPE,
    PackedKV4,
    dequantize_kv4,
    quantize_kv4,
    write_keys_per_channel_,
)

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_HEAD_DIMS = (64, 128)


def _group_size(codes: torch.Tensor, scales: torch.Tensor) -> int:
    return 2 * codes.shape[-1] // max(scales.shape[-1], 1)


def check_kv4_cache(
    name: str, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor
) -> int:
    """Layout contract of one packed K or V; returns its group size."""
    if codes.dim() != 4 or codes.dtype != torch.uint8:
        raise ValueError(
            f"qcompile.kv4: {name}_codes must be [B, H, S, D/2] uint8, got "
            f"{tuple(codes.shape)} {codes.dtype}"
        )
    d = 2 * codes.shape[-1]
    groups = scales.shape[-1] if scales.dim() == 4 else 0
    if groups == 0 or d % groups or (d // groups) % 2:
        raise ValueError(
            f"qcompile.kv4: {name}_scales {tuple(scales.shape)} do not divide D={d} into groups"
        )
    for part, t in (("scales", scales), ("offsets", offsets)):
        if tuple(t.shape) != (*codes.shape[:3], groups) or t.dtype != SCALE_DTYPE:
            raise ValueError(
                f"qcompile.kv4: {name}_{part} must be [B, H, S, D/G] = "
                f"{(*codes.shape[:3], groups)} float16, got {tuple(t.shape)} {t.dtype}"
            )
    for part, t in (("codes", codes), ("scales", scales), ("offsets", offsets)):
        if not t.is_contiguous():
            raise ValueError(f"qcompile.kv4: {name}_{part} must be contiguous")
    return d // groups


def check_kv4_keys_per_channel(
    codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, residual: torch.Tensor
) -> int:
    """Layout contract of K stored per channel over T tokens; returns T."""
    if codes.dim() != 4 or codes.dtype != torch.uint8:
        raise ValueError(
            f"qcompile.kv4: k_codes must be [B, H, S, D/2] uint8, got {tuple(codes.shape)} "
            f"{codes.dtype}"
        )
    b, h, s, half = codes.shape
    if residual.dim() != 4 or not residual.dtype.is_floating_point:
        raise ValueError(
            f"qcompile.kv4: k_residual must be [B, H, T, D] float, got {tuple(residual.shape)} "
            f"{residual.dtype}"
        )
    t = residual.shape[2]
    if tuple(residual.shape) != (b, h, t, 2 * half) or t < 1 or t & (t - 1):
        raise ValueError(
            f"qcompile.kv4: k_residual {tuple(residual.shape)} must be [B={b}, H={h}, T, "
            f"D={2 * half}] with T a power of two"
        )
    want = (b, h, -(-s // t), 2 * half)
    for part, x in (("scales", scales), ("offsets", offsets)):
        if tuple(x.shape) != want or x.dtype != SCALE_DTYPE:
            raise ValueError(
                f"qcompile.kv4: k_{part} of keys per channel over T={t} tokens must be "
                f"[B, H, ceil(S / T), D] = {want} float16, got {tuple(x.shape)} {x.dtype}"
            )
    for part, x in (("codes", codes), ("scales", scales), ("offsets", offsets), ("residual", residual)):  # fmt: skip
        if not x.is_contiguous():
            raise ValueError(f"qcompile.kv4: k_{part} must be contiguous")
    return t


def check_kv4_attention_args(
    query: torch.Tensor,
    k_codes: torch.Tensor,
    k_scales: torch.Tensor,
    k_offsets: torch.Tensor,
    v_codes: torch.Tensor,
    v_scales: torch.Tensor,
    v_offsets: torch.Tensor,
    seq_lens: torch.Tensor | None,
    mask: torch.Tensor | None,
    k_residual: torch.Tensor | None = None,
) -> None:
    """Shape/dtype contract of `kv4_attention`; raises ValueError saying what is wrong."""
    if k_residual is None:
        check_kv4_cache("k", k_codes, k_scales, k_offsets)
    else:
        check_kv4_keys_per_channel(k_codes, k_scales, k_offsets, k_residual)
    check_kv4_cache("v", v_codes, v_scales, v_offsets)
    if query.dim() != 4 or not query.dtype.is_floating_point:
        raise ValueError(
            f"qcompile.kv4_attention: query must be [B, Hq, Sq, D] float, got "
            f"{tuple(query.shape)} {query.dtype}"
        )
    b, hq, sq, d = query.shape
    kb, hkv, s, half = k_codes.shape
    if v_codes.shape != k_codes.shape or kb != b or 2 * half != d:
        raise ValueError(
            f"qcompile.kv4_attention: K codes {tuple(k_codes.shape)} / V codes "
            f"{tuple(v_codes.shape)} must both be [B={b}, Hkv, S, D/2={d // 2}]"
        )
    if hq % hkv:
        raise ValueError(
            f"qcompile.kv4_attention: {hq} query heads are not a multiple of {hkv} KV heads"
        )
    if seq_lens is not None and (
        seq_lens.shape != (b,) or seq_lens.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(
            f"qcompile.kv4_attention: seq_lens must be [B={b}] int32/int64, got "
            f"{tuple(seq_lens.shape)} {seq_lens.dtype}"
        )
    check_attention_mask("kv4_attention", mask, (b, hq, sq, s))


def check_attention_mask(op: str, mask: torch.Tensor | None, full: tuple) -> None:
    """An attention op's mask: 4-D, broadcastable to `full` [B, Hq, Sq, S], bool or float."""
    if mask is None:
        return
    if mask.dim() != 4 or any(m not in (1, f) for m, f in zip(mask.shape, full, strict=True)):
        raise ValueError(
            f"qcompile.{op}: mask {tuple(mask.shape)} does not broadcast to [B, Hq, Sq, S] = {full}"
        )
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise ValueError(f"qcompile.{op}: mask must be bool or float, not {mask.dtype}")


def visible_keys(
    b: int,
    sq: int,
    s: int,
    seq_lens: torch.Tensor | None,
    is_causal: bool,
    device: torch.device,
) -> torch.Tensor:
    """[B, 1, Sq, S] bool: which keys each query may see before the explicit mask."""
    j = torch.arange(s, device=device)
    lens = (
        torch.full((b,), s, device=device) if seq_lens is None else seq_lens.to(device).long()
    ).view(b, 1, 1, 1)
    visible = j.view(1, 1, 1, s) < lens
    if is_causal:
        i = torch.arange(sq, device=device).view(1, 1, sq, 1)
        visible = visible & (j.view(1, 1, 1, s) <= i + lens - sq)
    return visible


def kv4_attention_reference(
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
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize K and V, repeat them for the query heads, plain softmax attention."""
    check_kv4_attention_args(
        query, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets, seq_lens, mask,
        k_residual,
    )  # fmt: skip
    b, hq, sq, _ = query.shape
    hkv, s = k_codes.shape[1], k_codes.shape[2]
    if k_residual is None:
        keys = PackedKV4(k_codes, k_scales, k_offsets, _group_size(k_codes, k_scales))
    else:
        keys = PackedKV4(k_codes, k_scales, k_offsets, 1, residual=k_residual)
    k = dequantize_kv4(keys, compute_dtype, seq_lens)
    v = dequantize_kv4(
        PackedKV4(v_codes, v_scales, v_offsets, _group_size(v_codes, v_scales)), compute_dtype
    )
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    scores = (query.to(compute_dtype) @ k.transpose(-1, -2)) * scale
    visible = visible_keys(b, sq, s, seq_lens, is_causal, query.device).expand(b, hq, sq, s)
    if mask is not None:
        if mask.dtype == torch.bool:
            visible = visible & mask
        else:
            scores = scores + mask.to(compute_dtype)
    scores = scores.masked_fill(~visible, -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows that see no key -> 0
    return (probs @ v).to(query.dtype)


@torch.library.custom_op("qcompile::kv4_attention", mutates_args=())
def kv4_attention(
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
    """query [B, Hq, Sq, D] attending over packed int4 K/V [B, Hkv, S, D] -> [B, Hq, Sq, D]."""
    return kv4_attention_reference(
        query, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets, seq_lens, mask,
        is_causal, scale, k_residual,
    )  # fmt: skip


def _reserve_counters(device: torch.device) -> None:
    """The split reduction's counters, allocated while tracing (`reserve_tile_counters`)."""
    from qcompile.lowering.w4a16 import reserve_tile_counters

    reserve_tile_counters(device)


@kv4_attention.register_fake
def _(query, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets, seq_lens, mask,
      is_causal, scale, k_residual=None):  # fmt: skip
    check_kv4_attention_args(
        query, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets, seq_lens, mask,
        k_residual,
    )  # fmt: skip
    _reserve_counters(query.device)
    return torch.empty_like(query, memory_format=torch.contiguous_format)


@kv4_attention.register_kernel("cuda")
def _(query, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets, seq_lens, mask,
      is_causal, scale, k_residual=None):  # fmt: skip
    args = (query, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets, seq_lens, mask)
    check_kv4_attention_args(*args, k_residual)
    kernel_ok = query.dtype in KERNEL_DTYPES and query.shape[-1] in KERNEL_HEAD_DIMS
    if k_residual is not None:  # the 2-D kernel: one V group per head, T >= its tiles
        kernel_ok &= (
            v_scales.shape[-1] == 1
            and k_residual.shape[2] >= 32
            and k_residual.dtype == query.dtype
        )
    if not kernel_ok:
        # The pass and the attention function never emit this; a hand-built call gets the
        # reference math, not an error.
        return kv4_attention_reference(*args, is_causal, scale, k_residual)
    from qcompile.lowering.kv4_attention import kv4_attention_cuda

    return kv4_attention_cuda(*args, is_causal, scale, k_residual)


def check_kv4_prefill_args(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_codes: torch.Tensor,
    k_scales: torch.Tensor,
    k_offsets: torch.Tensor,
    v_codes: torch.Tensor,
    v_scales: torch.Tensor,
    v_offsets: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor | None,
    k_residual: torch.Tensor | None = None,
) -> None:
    """Contract of `kv4_prefill_attention`: the cache's, plus the chunk [B, Hkv, Sq, D] and
    its [Sq] integer positions, one per query."""
    check_kv4_attention_args(
        query, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets, None, mask, k_residual
    )
    b, hkv, _, half = k_codes.shape
    sq = query.shape[2]
    for name, t in (("key", key), ("value", value)):
        if tuple(t.shape) != (b, hkv, sq, 2 * half) or not t.dtype.is_floating_point:
            raise ValueError(
                f"qcompile.kv4_prefill_attention: {name} {tuple(t.shape)} {t.dtype} must be the "
                f"chunk's float [B={b}, Hkv={hkv}, Sq={sq}, D={2 * half}]"
            )
    if tuple(positions.shape) != (sq,) or positions.is_floating_point():
        raise ValueError(
            f"qcompile.kv4_prefill_attention: positions must be [Sq={sq}] integers, got "
            f"{tuple(positions.shape)} {positions.dtype}"
        )


def _prefill_attention(
    query, key, value, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets, positions,
    mask, scale, k_residual, length, dtype: torch.dtype, limit: int,
) -> torch.Tensor:  # fmt: skip
    """The op's math over the first `limit` positions (all that any query can see), in `dtype`:
    the cache dequantized, the chunk's own K/V put back at its positions in 16 bits, causal
    by position (query i sees key j <= positions[i]) and the mask, SDPA."""
    hq, sq = query.shape[1], query.shape[2]
    hkv = k_codes.shape[1]
    n = slice(None, limit)  # positions [0, limit): slice the packed tensors, then dequantize
    if k_residual is None:
        keys = PackedKV4(k_codes[:, :, n], k_scales[:, :, n], k_offsets[:, :, n],
                         _group_size(k_codes, k_scales))  # fmt: skip
    else:
        g = slice(None, -(-limit // k_residual.shape[2]))
        keys = PackedKV4(k_codes[:, :, n], k_scales[:, :, g], k_offsets[:, :, g], 1,
                         residual=k_residual)  # fmt: skip
    values = PackedKV4(v_codes[:, :, n], v_scales[:, :, n], v_offsets[:, :, n],
                       _group_size(v_codes, v_scales))  # fmt: skip
    # keys per channel: the written length locates the residual (the sliced codes cannot)
    lens = length if length is not None else torch.tensor(k_codes.shape[2])
    pos = positions.to(query.device).long()
    k = dequantize_kv4(keys, dtype, lens).index_copy(2, pos, key.to(dtype))
    v = dequantize_kv4(values, dtype).index_copy(2, pos, value.to(dtype))
    visible = torch.arange(limit, device=query.device)[None, :] <= pos[:, None]
    bias: torch.Tensor = visible.view(1, 1, sq, limit)
    if mask is not None:
        if mask.dtype == torch.bool:
            bias = bias & mask[..., :limit]
        else:
            bias = mask[..., :limit].to(dtype).masked_fill(~bias, -math.inf)
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    out = F.scaled_dot_product_attention(query.to(dtype), k, v, attn_mask=bias, scale=scale)
    # a query that sees no key -> 0, as kv4_attention; contiguous, as the fake promises (SDPA's
    # output takes the query's layout, and a model's query is a transposed projection)
    return out.nan_to_num_(0.0).to(query.dtype).contiguous()


def kv4_prefill_attention_reference(
    query, key, value, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets, positions,
    mask, scale, k_residual=None, length=None,
) -> torch.Tensor:  # fmt: skip
    """Definition of `kv4_prefill_attention`, in float32 over the whole cache."""
    check_kv4_prefill_args(
        query, key, value, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets,
        positions, mask, k_residual,
    )  # fmt: skip
    return _prefill_attention(
        query, key, value, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets,
        positions, mask, scale, k_residual, length, torch.float32, k_codes.shape[2],
    )  # fmt: skip


@torch.library.custom_op("qcompile::kv4_prefill_attention", mutates_args=())
def kv4_prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_codes: torch.Tensor,
    k_scales: torch.Tensor,
    k_offsets: torch.Tensor,
    v_codes: torch.Tensor,
    v_scales: torch.Tensor,
    v_offsets: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    k_residual: torch.Tensor | None = None,
    length: torch.Tensor | None = None,
    start_hint: int = -1,
) -> torch.Tensor:
    """A chunk of Sq queries at consecutive `positions` over the KV4 cache it was just
    written into: its own key/value [B, Hkv, Sq, D] read in 16 bits, earlier positions in 4."""
    return kv4_prefill_attention_reference(
        query, key, value, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets,
        positions, mask, scale, k_residual, length,
    )  # fmt: skip


@kv4_prefill_attention.register_fake
def _(query, key, value, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets, positions,
      mask, scale, k_residual=None, length=None, start_hint=-1):  # fmt: skip
    check_kv4_prefill_args(
        query, key, value, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets,
        positions, mask, k_residual,
    )  # fmt: skip
    _reserve_counters(query.device)
    return torch.empty_like(query, memory_format=torch.contiguous_format)


def kv4_prefill_attention_fast(
    query, key, value, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets, positions,
    mask, scale, k_residual=None, length=None, start_hint=-1,
) -> torch.Tensor:  # fmt: skip
    """The op on CUDA (plain torch, so it also runs on CPU for tests): a prompt written into
    an empty cache sees only itself in 16 bits, which is SDPA over the chunk (no 4-bit read
    at all); otherwise the 16-bit math of the reference over the positions it can see.
    `start_hint` >= 0 is positions[0], known on the host (a KV4 cache used eagerly passes
    it). Otherwise reading positions[0] syncs with the device, and inside a CUDA graph
    capture every call takes the second branch over the whole cache (same values, slower)."""
    check_kv4_prefill_args(
        query, key, value, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets,
        positions, mask, k_residual,
    )  # fmt: skip
    sq, s = query.shape[2], k_codes.shape[2]
    dtype = query.dtype if query.dtype in KERNEL_DTYPES else torch.float32
    capturing = query.is_cuda and torch.cuda.is_current_stream_capturing()
    start = start_hint if start_hint >= 0 else None
    if start is None and not capturing and sq:
        start, last = positions[[0, -1]].tolist()  # one sync
        if last - start != sq - 1:
            raise ValueError(
                f"qcompile.kv4_prefill_attention: positions {start}..{last} are not the "
                f"{sq} consecutive positions of one chunk"
            )
    if start == 0 and mask is None:
        out = F.scaled_dot_product_attention(
            query.to(dtype), key.to(dtype), value.to(dtype), is_causal=True, scale=scale,
            enable_gqa=True,
        )  # fmt: skip
        return out.to(query.dtype).contiguous()
    limit = s if start is None else min(s, start + sq)
    return _prefill_attention(
        query, key, value, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets,
        positions, mask, scale, k_residual, length, dtype, limit,
    )  # fmt: skip


kv4_prefill_attention.register_kernel("cuda")(kv4_prefill_attention_fast)


def check_kv4_cache_write_args(
    key: torch.Tensor,
    value: torch.Tensor,
    k_codes: torch.Tensor,
    k_scales: torch.Tensor,
    k_offsets: torch.Tensor,
    v_codes: torch.Tensor,
    v_scales: torch.Tensor,
    v_offsets: torch.Tensor,
    positions: torch.Tensor,
    k_residual: torch.Tensor | None = None,
) -> int:
    """Contract of `kv4_cache_write`; returns V's group size."""
    g = check_kv4_cache("v", v_codes, v_scales, v_offsets)
    if k_residual is None:
        same = check_kv4_cache("k", k_codes, k_scales, k_offsets) == g
    else:
        check_kv4_keys_per_channel(k_codes, k_scales, k_offsets, k_residual)
        same = True
    if not same or v_codes.shape != k_codes.shape:
        raise ValueError("qcompile.kv4_cache_write: the K and V caches differ in shape")
    b, h, _, half = k_codes.shape
    for name, t in (("key", key), ("value", value)):
        if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (b, h, 2 * half):
            raise ValueError(
                f"qcompile.kv4_cache_write: {name} {tuple(t.shape)} is not [B={b}, H={h}, "
                f"Sn, D={2 * half}]"
            )
    if positions.dim() != 1 or positions.shape[0] != key.shape[2] or positions.is_floating_point():
        raise ValueError(
            f"qcompile.kv4_cache_write: positions must be [Sn={key.shape[2]}] integers, got "
            f"{tuple(positions.shape)} {positions.dtype}"
        )
    if value.shape != key.shape:
        raise ValueError("qcompile.kv4_cache_write: key and value differ in shape")
    return g


def kv4_cache_write_reference(
    key, value, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets, positions,
    k_residual=None,
) -> None:  # fmt: skip
    """quantize_kv4, then index_copy_ into the cache along S (keys per channel:
    `write_keys_per_channel_` at the first position)."""
    g = check_kv4_cache_write_args(
        key, value, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets, positions,
        k_residual,
    )  # fmt: skip
    pos = positions.to(k_codes.device).long()
    writes = [(value, (v_codes, v_scales, v_offsets))]
    if k_residual is None:
        writes.append((key, (k_codes, k_scales, k_offsets)))
    elif pos.numel():
        start = int(pos[0])
        if not torch.equal(pos, torch.arange(start, start + pos.numel(), device=pos.device)):
            raise ValueError(
                "qcompile.kv4_cache_write: keys per channel need consecutive positions "
                f"(one step or one prompt), got {pos.tolist()[:8]}..."
            )
        write_keys_per_channel_(
            key.to(k_codes.device), k_codes, k_scales, k_offsets, k_residual, start
        )
    for x, caches in writes:
        packed = quantize_kv4(x, KVScheme(group_size=g))
        for cache, new in zip(caches, (packed.codes, packed.scales, packed.offsets), strict=True):
            cache.index_copy_(2, pos, new.to(cache.device))


@torch.library.custom_op(
    "qcompile::kv4_cache_write",
    mutates_args=("k_codes", "k_scales", "k_offsets", "v_codes", "v_scales", "v_offsets"),
)
def kv4_cache_write(
    key: torch.Tensor,
    value: torch.Tensor,
    k_codes: torch.Tensor,
    k_scales: torch.Tensor,
    k_offsets: torch.Tensor,
    v_codes: torch.Tensor,
    v_scales: torch.Tensor,
    v_offsets: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """Quantize key/value [B, Hkv, Sn, D] into the packed cache at S = positions, in place."""
    kv4_cache_write_reference(
        key, value, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets, positions
    )


def _cache_write_fake(*args) -> None:
    check_kv4_cache_write_args(*args)


def _cache_write_cuda(*args) -> None:
    """Both write ops on CUDA: (key, value, the six cache tensors, positions[, k_residual])."""
    check_kv4_cache_write_args(*args)
    if args[0].shape[2] == 0:
        return
    from qcompile.lowering.kv4_attention import kv4_cache_write_cuda

    kv4_cache_write_cuda(*args[:9], k_residual=args[9] if len(args) > 9 else None)


kv4_cache_write.register_fake(_cache_write_fake)
kv4_cache_write.register_kernel("cuda")(_cache_write_cuda)


# A separate op rather than an optional mutated k_residual on kv4_cache_write: torch 2.11's
# ADInplaceOrView kernel indexes every mutated argument, and fails on an omitted one.
@torch.library.custom_op(
    "qcompile::kv4_cache_write_channels",
    mutates_args=(
        "k_codes", "k_scales", "k_offsets", "v_codes", "v_scales", "v_offsets", "k_residual",
    ),
)  # fmt: skip
def kv4_cache_write_channels(
    key: torch.Tensor,
    value: torch.Tensor,
    k_codes: torch.Tensor,
    k_scales: torch.Tensor,
    k_offsets: torch.Tensor,
    v_codes: torch.Tensor,
    v_scales: torch.Tensor,
    v_offsets: torch.Tensor,
    positions: torch.Tensor,
    k_residual: torch.Tensor,
) -> None:
    """`kv4_cache_write` for keys stored per channel (consecutive positions, see above)."""
    kv4_cache_write_reference(
        key, value, k_codes, k_scales, k_offsets, v_codes, v_scales, v_offsets, positions,
        k_residual,
    )  # fmt: skip


kv4_cache_write_channels.register_fake(_cache_write_fake)
kv4_cache_write_channels.register_kernel("cuda")(_cache_write_cuda)


@torch.library.custom_op("qcompile::kv4_dequantize", mutates_args=())
def kv4_dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    dtype: torch.dtype,
    residual: torch.Tensor | None = None,
    length: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed [B, H, S, D/2] -> [B, H, S, D] in `dtype` (float32 math; any device). Keys per
    channel: with `residual`, and `length` (0-d, tokens written; default S)."""
    if residual is None:
        g = check_kv4_cache("kv", codes, scales, offsets)
        return dequantize_kv4(PackedKV4(codes, scales, offsets, g), dtype)
    check_kv4_keys_per_channel(codes, scales, offsets, residual)
    return dequantize_kv4(PackedKV4(codes, scales, offsets, 1, length, residual=residual), dtype)


@kv4_dequantize.register_fake
def _(codes, scales, offsets, dtype, residual=None, length=None):
    if residual is None:
        check_kv4_cache("kv", codes, scales, offsets)
    else:
        check_kv4_keys_per_channel(codes, scales, offsets, residual)
    return codes.new_empty((*codes.shape[:3], 2 * codes.shape[3]), dtype=dtype)
