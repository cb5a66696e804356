"""Transformers integration of the KV4 cache: a static int4 `Cache`, the "qcompile_kv4"
attention function that reads it without dequantizing, and SmoothAttention for HF models.

    from qcompile.integrations.kv4_cache import KV4Cache, enable_kv4_attention
    enable_kv4_attention(model)                        # attn_implementation="qcompile_kv4"
    cache = KV4Cache(model.config, max_cache_len=4096) # KVScheme(group_size=128) by default
    out = model.generate(ids, past_key_values=cache, max_new_tokens=256)

How a layer flows (Llama and every model whose attention calls `past_key_values.update`
and then the registered attention function):
  k_proj/v_proj -> RoPE -> cache.update(k, v, layer_idx)
      `qcompile::kv4_cache_write` (`kv4_cache_write_channels` for keys per channel)
      quantizes the new tokens into the pre-allocated packed buffers (one kernel launch)
      and advances the layer's length (a tensor, so a compiled decode step does not
      recompile per position). With `KVScheme(rotate_keys=True)` K is stored
      as K @ H (Walsh-Hadamard). It returns
      - with attn_implementation "qcompile_kv4": `PackedKV4` views of the buffers (codes,
        scales, offsets, length, and H for K), which only the kv4 attention function
        understands (it multiplies the query by H);
      - otherwise: `qcompile::kv4_dequantize` of the whole buffer (K rotated back), which
        any attention implementation (sdpa, eager) can read: correct but it materializes
        fp16 K/V. Compiled with `backend="qcompile"`, the attention pass fuses that
        dequantize + attention back into `kv4_attention` (see `qcompile/passes/attention.py`;
        not with rotated keys).
  -> attention function -> `qcompile::kv4_attention(query, packed K/V, seq_lens=length,
     mask, is_causal=True)` -> o_proj. A chunk of several tokens (a prompt) goes to
     `qcompile::kv4_prefill_attention` instead, which reads the chunk's own K/V in 16 bits
     (`KVScheme.fresh_prefill`, on by default; SDPA over the chunk for a first prompt).
The attention function is the robust path for HF models: it does not depend on how Dynamo
happens to trace the model, and it works eagerly, under any backend, and in generate().
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import AttentionInterface, PreTrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from qcompile.config import KVScheme
from qcompile.quant.kv4 import (
    SCALE_DTYPE,
    PackedKV4,
    fold_smooth_attention,
    hadamard_matrix,
    key_channel_absmax,
    smooth_attention_scales,
)

ATTN_IMPLEMENTATION = "qcompile_kv4"


class KV4Layer(CacheLayerMixin):
    """One attention layer's K and V as packed int4 buffers [B, Hkv, max_cache_len, D/2] plus
    fp16 scales/offsets [B, Hkv, max_cache_len, D/G], allocated on first use."""

    is_compileable = True
    is_sliding = False

    def __init__(self, max_cache_len: int, scheme: KVScheme, packed_reads: bool):
        super().__init__()
        self.max_cache_len = max_cache_len
        self.scheme = scheme
        self.packed_reads = packed_reads
        self.fresh_prefill = scheme.fresh_prefill  # read per compiled call: a bool, not scheme's
        # A tensor, as in transformers' StaticLayer: a compiled step reads it, never guards on it.
        self.length = torch.tensor(0, dtype=torch.int64)
        self.key_cache: PackedKV4 | None = None
        self.value_cache: PackedKV4 | None = None
        self.rotation: torch.Tensor | None = None  # [D, D] Hadamard with scheme.rotate_keys
        # The length on the host while every update ran eagerly (-1 once a compiled one did):
        # lets a prompt's attention skip a device sync (kv4_prefill_attention's start_hint).
        self.host_length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads, _, self.head_dim = key_states.shape
        self.scheme.check_head_dim(self.head_dim)
        b, h, s, d = self.batch_size, self.num_heads, self.max_cache_len, self.head_dim
        t = self.scheme.key_tokens

        def packed(per_channel: bool = False) -> PackedKV4:
            codes = torch.zeros((b, h, s, d // 2), dtype=torch.uint8, device=self.device)
            if not per_channel:
                scales = torch.zeros((b, h, s, d // self.scheme.group_size), dtype=SCALE_DTYPE,
                                     device=self.device)  # fmt: skip
                return PackedKV4(codes, scales, torch.zeros_like(scales), self.scheme.group_size)
            scales = torch.zeros((b, h, -(-s // t), d), dtype=SCALE_DTYPE, device=self.device)
            residual = torch.zeros((b, h, t, d), dtype=self.dtype, device=self.device)
            return PackedKV4(codes, scales, torch.zeros_like(scales), 1, residual=residual)

        self.key_cache, self.value_cache = packed(per_channel=t > 0), packed()
        self.length = self.length.to(self.device)
        if self.scheme.rotate_keys:
            self.rotation = hadamard_matrix(self.head_dim, self.dtype, self.device)
        if not torch.compiler.is_compiling():  # fixed addresses: no recompiles, CUDA graphs
            for t in (*self.tensors(), self.length, self.rotation):
                if t is not None:
                    torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """k codes, k scales, k offsets, v codes, v scales, v offsets (the op's order), and
        the key residual when keys are stored per channel."""
        k, v = self.key_cache, self.value_cache
        residual = () if k.residual is None else (k.residual,)
        return (k.codes, k.scales, k.offsets, v.codes, v.scales, v.offsets, *residual)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Quantize and store the new tokens at [length, length + Sn); return what attention
        reads (see the module docstring)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        positions = torch.arange(key_states.shape[-2], device=self.device) + self.length
        if self.rotation is not None:
            key_states = key_states @ self.rotation.to(key_states.dtype)
        k, v = self.key_cache, self.value_cache
        caches = (k.codes, k.scales, k.offsets, v.codes, v.scales, v.offsets)
        if k.residual is None:
            torch.ops.qcompile.kv4_cache_write(key_states, value_states, *caches, positions)
        else:
            torch.ops.qcompile.kv4_cache_write_channels(
                key_states, value_states, *caches, positions, k.residual
            )
        self.length.add_(key_states.shape[-2])
        start_hint = -1
        if torch.compiler.is_compiling():
            self.host_length = -1  # a constant store: no guard on the value, no recompiles
        elif self.host_length >= 0:
            start_hint = self.host_length
            self.host_length += key_states.shape[-2]
        if self.packed_reads:
            # Built field by field: `dataclasses.replace` and the shared scheme's attributes
            # cost Dynamo guards per layer on every compiled call, some evaluated in Python
            # (`tests/test_kv4.py::test_compiled_decode_guards_per_layer`).
            fresh = self.fresh_prefill and key_states.shape[-2] > 1
            return (
                PackedKV4(
                    k.codes, k.scales, k.offsets, k.group_size, self.length, self.rotation,
                    k.residual, key_states if fresh else None, positions if fresh else None,
                    start_hint,
                ),
                PackedKV4(
                    v.codes, v.scales, v.offsets, v.group_size, self.length,
                    fresh=value_states if fresh else None,
                ),
            )  # fmt: skip
        dequantize = torch.ops.qcompile.kv4_dequantize
        keys = dequantize(
            k.codes, k.scales, k.offsets, key_states.dtype, k.residual,
            None if k.residual is None else self.length,
        )  # fmt: skip
        if self.rotation is not None:  # H is its own inverse; the pass does not rewrite this
            keys = keys @ self.rotation.to(keys.dtype)
        return keys, dequantize(v.codes, v.scales, v.offsets, key_states.dtype)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_seq_length(self) -> torch.Tensor | int:
        return self.length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        if self.is_initialized:
            for t in self.tensors():
                t.zero_()
        self.length.zero_()
        self.host_length = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            for t in self.tensors():
                t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def nbytes(self) -> int:
        """Bytes held by the packed buffers (0 before the first update)."""
        if not self.is_initialized:
            return 0
        return self.key_cache.nbytes() + self.value_cache.nbytes()


class KV4Cache(Cache):
    """A static, pre-allocated transformers cache storing K and V as packed int4.

    config: the model's config (one `KV4Layer` per layer; sliding-window and linear-attention
        layers are refused). max_cache_len: positions per sequence. scheme: the group size.
    packed_reads: hand attention the packed buffers (needs attn_implementation
        "qcompile_kv4", see `enable_kv4_attention`); default: True exactly when the config
        already uses it. False returns dequantized K/V to any attention implementation.
    Memory: B * Hkv * max_cache_len * (D + 8 * D / G) bytes per layer, 0.266x of fp16 at
    D = G = 128 (`nbytes()` counts it). Keys per channel over T tokens (`key_tokens`):
    B * Hkv * (max_cache_len * (D + 4 + 4 * D / T) + T * D * 2) with a 16-bit model,
    0.281x of fp16 at D = 128, T = 64, 4k tokens.
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        max_cache_len: int,
        scheme: KVScheme | None = None,
        packed_reads: bool | None = None,
    ):
        text = config.get_text_config(decoder=True)
        types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
        refused = sorted({t for t in types if t != "full_attention"})
        if refused or getattr(text, "sliding_window", None) is not None:
            raise ValueError(
                f"KV4Cache: layer types {refused or ['sliding_attention']} are not supported; "
                "only full-attention layers (Llama, Mistral without sliding window, Qwen2, ...)"
            )
        if packed_reads is None:
            packed_reads = text._attn_implementation == ATTN_IMPLEMENTATION
        self.scheme = scheme or KVScheme()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.scheme.check_head_dim(head_dim)  # fail here, not at the first forward
        layers = [KV4Layer(max_cache_len, self.scheme, packed_reads) for _ in types]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


# --------------------------------------------------------------------------- attention
def kv4_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: PackedKV4 | torch.Tensor,
    value: PackedKV4 | torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The "qcompile_kv4" attention function: query [B, Hq, Sq, D] over a KV4Cache layer.

    Without a KV4 cache (no cache, or another cache class) key/value are plain tensors and
    this is transformers' SDPA attention, so the same model runs with any cache.
    """
    if not isinstance(key, PackedKV4):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout:
        raise ValueError("qcompile_kv4 attention: dropout is not supported (inference only)")
    b = query.shape[0]
    seq_lens = key.length.view(1).expand(b) if key.length is not None else None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if key.rotation is not None:  # K was stored as K @ H: (q H)(k H)^T = q k^T
        query = query @ key.rotation.to(query.dtype)
    if key.fresh is not None and getattr(module, "is_causal", True):
        out = torch.ops.qcompile.kv4_prefill_attention(
            query, key.fresh, value.fresh, key.codes, key.scales, key.offsets, value.codes,
            value.scales, value.offsets, key.positions, attention_mask, scale, key.residual,
            key.length, key.start_hint,
        )  # fmt: skip
        return out.transpose(1, 2).contiguous(), None
    out = torch.ops.qcompile.kv4_attention(
        query, key.codes, key.scales, key.offsets, value.codes, value.scales, value.offsets,
        seq_lens, attention_mask, getattr(module, "is_causal", True), scale, key.residual,
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def kv4_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The mask for "qcompile_kv4": None when there is no padding (the op applies causality
    and the cache length itself), else transformers' boolean [B, 1, Sq, kv_length] mask."""
    if attention_mask is None or (not torch.compiler.is_compiling() and bool(attention_mask.all())):
        return None
    kwargs.pop("allow_is_causal_skip", None)
    return sdpa_mask(
        batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask,
        allow_is_causal_skip=False, **kwargs,
    )  # fmt: skip


def register_kv4_attention() -> None:
    """Register "qcompile_kv4" with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kv4_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, kv4_mask)


def enable_kv4_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Switch a transformers model to the "qcompile_kv4" attention function (in place)."""
    register_kv4_attention()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


# --------------------------------------------------------------------------- SmoothAttention
def _attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "q_proj", None), torch.nn.Linear)
        and isinstance(getattr(m, "k_proj", None), torch.nn.Linear)
        and hasattr(m, "head_dim")
    ]


@torch.no_grad()
def smooth_attention_(
    model: torch.nn.Module, batches: Iterable[torch.Tensor], alpha: float = 0.5
) -> dict[str, torch.Tensor]:
    """SmoothAttention (QServe) in place: lambda = max|K_c|^alpha per KV head and channel,
    measured on `batches` of input ids, folded into q_proj (x lambda) and k_proj (/ lambda).

    Rotate-half RoPE pairs channels (i, i + D/2), so a pair shares one lambda from the pair
    norm (`qcompile.quant.kv4.key_channel_absmax`). Refused: partial rotary embeddings and
    q_norm/k_norm (a norm after k_proj would undo the scaling). Returns lambda per layer.
    """
    config = model.config.get_text_config(decoder=True)
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("smooth_attention_: partial rotary embeddings are not supported")
    layers = _attention_modules(model)
    if not layers:
        raise ValueError("smooth_attention_: no attention module with q_proj/k_proj found")
    absmax: dict[str, torch.Tensor] = {}
    hooks = []
    for name, attn in layers:
        if hasattr(attn, "k_norm") or hasattr(attn, "q_norm"):
            raise ValueError(f"{name}: q_norm/k_norm after the projections; cannot fold")

        def record(_mod, _inp, out, name=name, d=attn.head_dim):
            k = out.reshape(-1, out.shape[-1] // d, d)
            m = key_channel_absmax(k, rope="half")
            absmax[name] = m if name not in absmax else torch.maximum(absmax[name], m)

        hooks.append(attn.k_proj.register_forward_hook(record))
    try:
        for ids in batches:
            model(ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    scales = {}
    for name, attn in layers:
        lam = smooth_attention_scales(absmax[name], alpha)
        q, k = attn.q_proj, attn.k_proj
        wq, bq, wk, bk = fold_smooth_attention(q.weight, q.bias, k.weight, k.bias, lam)
        q.weight.copy_(wq)
        k.weight.copy_(wk)
        if bq is not None:
            q.bias.copy_(bq)
        if bk is not None:
            k.bias.copy_(bk)
        scales[name] = lam
    return scales
