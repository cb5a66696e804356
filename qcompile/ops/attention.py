"""Decode attention over a 16-bit KV cache shared by groups of query heads.

* `qcompile::decode_attention(query, key, value, mask, scale)`: softmax(Q K^T * scale + mask) V
  for query [B, Hq, Sq, D] over key/value [B, Hkv, S, D] (any strides), Hq a multiple of Hkv:
  grouped-query attention by shape, without repeating K and V. What the attention pass emits
  for transformers' decode step (one query over a repeat_kv'd static cache).

`mask` is 4-D, broadcastable to [B, Hq, Sq, S], boolean (True = attend) or additive float, as
SDPA takes it; there is no causal flag (a decode query sees its whole cache). The reference
is SDPA itself (a query that sees no key gets a zero row, as SDPA gives on CPU); on CUDA,
fp16/bf16 at head_dim 64/128 with Sq * Hq/Hkv <= 64 query rows per KV head runs the Triton
flash-decoding kernel of `qcompile.lowering.decode_attention`, anything else the reference.
The op is opaque to Inductor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qcompile.ops.kv4 import check_attention_mask

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_HEAD_DIMS = (64, 128)
KERNEL_MAX_ROWS = 64  # query rows per KV head (Sq * Hq / Hkv) the decode kernel holds


def check_decode_attention_args(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
) -> None:
    """Shape/dtype contract of `decode_attention`; raises ValueError saying what is wrong."""
    if query.dim() != 4 or not query.dtype.is_floating_point:
        raise ValueError(
            f"qcompile.decode_attention: query must be [B, Hq, Sq, D] float, got "
            f"{tuple(query.shape)} {query.dtype}"
        )
    b, hq, sq, d = query.shape
    for name, t in (("key", key), ("value", value)):
        if t.dim() != 4 or t.shape[0] != b or t.shape[3] != d or t.dtype != query.dtype:
            raise ValueError(
                f"qcompile.decode_attention: {name} {tuple(t.shape)} {t.dtype} is not "
                f"[B={b}, Hkv, S, D={d}] {query.dtype}"
            )
    if key.shape != value.shape:
        raise ValueError(
            f"qcompile.decode_attention: key {tuple(key.shape)} and value "
            f"{tuple(value.shape)} differ in shape"
        )
    if hq % key.shape[1]:
        raise ValueError(
            f"qcompile.decode_attention: {hq} query heads are not a multiple of "
            f"{key.shape[1]} KV heads"
        )
    check_attention_mask("decode_attention", mask, (b, hq, sq, key.shape[2]))


def decode_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """SDPA with the KV heads shared by groups of query heads."""
    check_decode_attention_args(query, key, value, mask)
    b, hq, sq, d = query.shape
    hkv = key.shape[1]
    if sq == 1 and (mask is None or mask.shape[1] == 1):
        # a KV head's query heads as its query rows: the same attention, K/V not repeated
        q = query.reshape(b, hkv, hq // hkv, d)
        m = None if mask is None else mask.reshape(mask.shape[0], 1, 1, mask.shape[-1])
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=m, scale=scale)
        return out.reshape(b, hq, 1, d)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scale, enable_gqa=True
    )


@torch.library.custom_op("qcompile::decode_attention", mutates_args=())
def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """query [B, Hq, Sq, D] over key/value [B, Hkv, S, D] -> [B, Hq, Sq, D]."""
    return decode_attention_reference(query, key, value, mask, scale).contiguous()


@decode_attention.register_fake
def _(query, key, value, mask, scale):
    check_decode_attention_args(query, key, value, mask)
    return torch.empty_like(query, memory_format=torch.contiguous_format)


@decode_attention.register_kernel("cuda")
def _(query, key, value, mask, scale):
    check_decode_attention_args(query, key, value, mask)
    b, hq, sq, d = query.shape
    if (
        query.dtype not in KERNEL_DTYPES
        or d not in KERNEL_HEAD_DIMS
        or sq * (hq // key.shape[1]) > KERNEL_MAX_ROWS
        or key.shape[2] == 0
        or query.numel() == 0
    ):
        return decode_attention_reference(query, key, value, mask, scale).contiguous()
    from qcompile.lowering.decode_attention import decode_attention_cuda

    return decode_attention_cuda(query, key, value, mask, scale)
