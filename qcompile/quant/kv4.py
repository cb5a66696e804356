"""The packed int4 KV-cache format: per token, per head, groups of `G` channels along head_dim.

Layout (the contract the attention kernels read; produced by `quantize_kv4` here and by the
`kv4_cache_write` kernel, which computes the same codes bit for bit):
    codes:   [B, H, S, D // 2] uint8, two channels per byte, even channel in the low nibble:
             code of x[b, h, s, d] = (codes[b, h, s, d // 2] >> (4 * (d % 2))) & 0xF
    scales:  [B, H, S, D // G] float16
    offsets: [B, H, S, D // G] float16 (the value of code 0, i.e. the group minimum)
             x[b, h, s, d] ~= code * scales[b, h, s, d // G] + offsets[b, h, s, d // G]
One token of one head is D/2 contiguous bytes (64 B at D=128) and the tokens of a head are
contiguous in S, so the [BLOCK_N tokens, D/2] tile an attention kernel reads for one KV head is
a single contiguous block: each thread issues 16-byte vector loads and a warp reads 512
consecutive bytes (fully coalesced) for any group size >= 32 (a group is G/2 >= 16 bytes).
Byte-granular packing (rather than 8 nibbles per int32) keeps the unpacked tile in natural
channel order with one split into low/high nibbles and one interleave, so a group is a
contiguous slice of channels and the query needs no permutation. Scales and offsets are
fp16 whatever the model dtype: memory per token and head is D/2 + 4 * D/G bytes, 0.266x of
fp16 at D=128, G=128 (0.281x at G=64, 0.3125x at G=32). Values must lie within fp16's range.

Quantization is asymmetric min-max per group: scale = (max - min) / 15 rounded to fp16 (never
below fp16's smallest subnormal), offset = min rounded to fp16, code = floor((x - offset) /
scale + 0.5) clamped to [0, 15], computed in float32 from the stored (rounded) scale/offset.

Keys per channel (`KVScheme.key_tokens` = T): K's codes keep the layout above, but a scale and
offset cover one channel over T consecutive tokens (min-max over those T values, the same
rounding as above):
    scales:  [B, H, ceil(S / T), D] float16, offsets likewise
             k[b, h, s, d] ~= code * scales[b, h, s // T, d] + offsets[b, h, s // T, d]
    residual: [B, H, T, D] in the model's dtype: with L tokens written, the tokens of the
             incomplete last group, positions [T * (L // T), L), sit at residual[..., s % T, :]
             and their codes are not yet written.
A group is quantized by the write that completes it, from the residual's (rounded) values
and the new tokens, so writing a sequence at once or token by token stores the same codes.

Key rotation (`KVScheme.rotate_keys`, as QuaRot does online for K): K is stored as K @ H with
H the orthonormal Walsh-Hadamard matrix, and the query multiplied by H before attention; the
scores are unchanged, while each rotated channel mixes all D channels, so a few outliers no
longer set every group's range. Applied after RoPE, so it needs no pairing.

SmoothAttention (QServe): keys have a few outlier channels that blow up a group's range. A
per-channel factor lambda_c = max|K_c|^alpha divides K and multiplies Q (Q K^T is unchanged),
folded into k_proj / q_proj. With RoPE the factor must commute with the rotation: rotate-half
RoPE (Llama and every Hugging Face model using `rotate_half`) rotates channel pairs (i, i + D/2),
so both channels of a pair get one factor, computed from the rotation-invariant pair norm
sqrt(k_i^2 + k_{i+D/2}^2). Interleaved (GPT-J) pairing and partial rotary are not supported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.config import KVScheme

SCALE_DTYPE = torch.float16
# The smallest fp16 subnormal: a constant group gets this scale instead of 0 (no 0 / 0).
MIN_SCALE = 2.0**-24
ROPE_PAIRINGS = ("half", "none")


@dataclass(frozen=True)
class PackedKV4:
    """K or V of one layer, [B, H, S, D] in the layout above.

    length: a 0-d integer tensor, the number of valid positions along S when this is a
    pre-allocated cache (positions >= length were never written); None means all S.
    rotation: [D, D] when K was stored rotated (K @ rotation, `KVScheme.rotate_keys`): the
    query must be read as query @ rotation. None for V and unrotated K.
    residual: [B, H, T, D] for keys per channel (`KVScheme.key_tokens` = T; scales are then
    [B, H, ceil(S / T), D] and group_size is 1): the incomplete last group, see above.
    fresh, positions: a KV4 cache's update of several tokens also hands attention the chunk
    it just wrote, [B, H, Sn, D] in the model's dtype, and where ([Sn] consecutive
    positions; on K only), for `KVScheme.fresh_prefill`. None otherwise. start_hint: the
    first of those positions when the host knows it, else -1.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    group_size: int
    length: torch.Tensor | None = None
    rotation: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    fresh: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    start_hint: int = -1

    @property
    def key_tokens(self) -> int:
        """T of keys stored per channel over T tokens; 0 for groups along head_dim."""
        return 0 if self.residual is None else self.residual.shape[2]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, S, D) of the tensor the codes stand for."""
        b, h, s, half = self.codes.shape
        return b, h, s, 2 * half

    def nbytes(self) -> int:
        parts = (self.codes, self.scales, self.offsets, self.residual)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def pack_int4_pairs(codes: torch.Tensor) -> torch.Tensor:
    """[..., D] integer codes in [0, 15] -> [..., D // 2] uint8, even channel in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4_pairs: D={codes.shape[-1]} is odd")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()


def unpack_int4_pairs(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4_pairs`: [..., D // 2] uint8 -> [..., D] uint8 codes."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def fit_kv_groups(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scales and offsets [..., D // G] of `x` [..., D] (min-max, see the module doc)."""
    g = x.float().unflatten(-1, (-1, group_size))
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp_min(MIN_SCALE).to(SCALE_DTYPE)
    return scales, lo.to(SCALE_DTYPE)


def quantize_kv4(
    x: torch.Tensor, scheme: KVScheme, length: torch.Tensor | None = None
) -> PackedKV4:
    """Quantize K or V `x` [B, H, S, D] (any float dtype) into the packed layout."""
    if x.dim() != 4:
        raise ValueError(f"quantize_kv4: expected [B, H, S, D], got {tuple(x.shape)}")
    scheme.check_head_dim(x.shape[-1])
    g = scheme.group_size
    scales, offsets = fit_kv_groups(x, g)
    xg = x.float().unflatten(-1, (-1, g))
    codes = torch.floor((xg - offsets.float()[..., None]) / scales.float()[..., None] + 0.5)
    codes = codes.clamp_(0, 15).flatten(-2)
    return PackedKV4(pack_int4_pairs(codes), scales, offsets, g, length)


def dequantize_kv4(
    packed: PackedKV4,
    dtype: torch.dtype = torch.float32,
    seq_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The [B, H, S, D] tensor the codes stand for, computed in float32, returned in `dtype`.

    Keys per channel: positions of the incomplete last group come from the residual, with
    L = seq_lens[b] (default: `packed.length`, else S) tokens written in batch b."""
    if packed.residual is not None:
        return _dequantize_keys_per_channel(packed, dtype, seq_lens)
    codes = unpack_int4_pairs(packed.codes).float().unflatten(-1, (-1, packed.group_size))
    x = codes * packed.scales.float()[..., None] + packed.offsets.float()[..., None]
    return x.flatten(-2).to(dtype)


def _dequantize_keys_per_channel(
    packed: PackedKV4, dtype: torch.dtype, seq_lens: torch.Tensor | None
) -> torch.Tensor:
    b, _, s, _ = packed.shape
    t = packed.key_tokens
    codes = unpack_int4_pairs(packed.codes).float()
    scales = packed.scales.float().repeat_interleave(t, dim=2)[:, :, :s]
    offsets = packed.offsets.float().repeat_interleave(t, dim=2)[:, :, :s]
    x = codes * scales + offsets
    if seq_lens is None:
        seq_lens = packed.length if packed.length is not None else torch.tensor(s)
    lens = seq_lens.to(x.device).long().reshape(-1).expand(b)
    slot = torch.arange(s, device=x.device)[None, :] - (lens // t * t)[:, None]  # [B, S]
    from_residual = ((slot >= 0) & (slot < t))[:, None, :, None]
    index = slot.clamp(0, t - 1)[:, None, :, None].expand_as(x)
    tail = packed.residual.float().gather(2, index)
    return torch.where(from_residual, tail, x).to(dtype)


def write_keys_per_channel_(
    key: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    residual: torch.Tensor,
    start: int,
) -> None:
    """Store key [B, H, Sn, D] at positions [start, start + Sn) of a per-channel K cache, in
    place: groups this write completes are quantized (from the residual's earlier tokens
    and the new ones, both in the residual's dtype), the rest goes to the residual."""
    t = residual.shape[2]
    sn = key.shape[2]
    end = start + sn
    if start < 0 or end > codes.shape[2]:
        raise ValueError(
            f"qcompile.kv4: positions [{start}, {end}) do not fit the cache of {codes.shape[2]}"
        )
    new = key.to(residual.dtype)
    for g in range(start // t, (end - 1) // t + 1 if sn else 0):
        lo, hi = g * t, min(g * t + t, end)
        first = max(lo, start)
        if hi == g * t + t:  # complete: quantize the T tokens per channel
            full = torch.cat(
                (residual[:, :, : first - lo], new[:, :, first - start : hi - start]), 2
            )
            sc, off = fit_kv_groups(full.transpose(-1, -2), t)  # [B, H, D, 1]
            sc, off = sc[..., 0], off[..., 0]
            v = (full.float() - off.float()[:, :, None]) / sc.float()[:, :, None]
            codes[:, :, lo:hi] = pack_int4_pairs(torch.floor(v + 0.5).clamp_(0, 15))
            scales[:, :, g], offsets[:, :, g] = sc, off
        else:
            residual[:, :, first - lo : hi - lo] = new[:, :, first - start : hi - start]


def quantize_kv4_keys_per_channel(
    x: torch.Tensor, tokens: int, length: torch.Tensor | None = None
) -> PackedKV4:
    """Quantize keys `x` [B, H, S, D] per channel over groups of `tokens` tokens (the layout
    above): complete groups to codes, the incomplete tail to the residual (dtype of x)."""
    if x.dim() != 4:
        raise ValueError(
            f"quantize_kv4_keys_per_channel: expected [B, H, S, D], got {tuple(x.shape)}"
        )
    b, h, s, d = x.shape
    codes = torch.zeros((b, h, s, d // 2), dtype=torch.uint8, device=x.device)
    scales = torch.zeros((b, h, -(-s // tokens), d), dtype=SCALE_DTYPE, device=x.device)
    offsets = torch.zeros_like(scales)
    residual = torch.zeros((b, h, tokens, d), dtype=x.dtype, device=x.device)
    write_keys_per_channel_(x, codes, scales, offsets, residual, 0)
    return PackedKV4(codes, scales, offsets, 1, length, residual=residual)


def hadamard_matrix(d: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The orthonormal Walsh-Hadamard matrix [d, d] (Sylvester order; symmetric, H H = I)."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"hadamard_matrix: d={d} is not a power of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / d**0.5).to(dtype=dtype, device=device)


# --------------------------------------------------------------------------- SmoothAttention
def key_channel_absmax(keys: torch.Tensor, rope: str = "half") -> torch.Tensor:
    """Per-channel max |K| [H, D] over tokens of `keys` [..., H, D], invariant under RoPE.

    rope="half": channels i and i + D/2 are one rotated pair; both get the pair's largest norm
    sqrt(k_i^2 + k_{i+D/2}^2), the largest |K_i| any rotation angle can produce. "none": |K|.
    """
    if rope not in ROPE_PAIRINGS:
        raise ValueError(f"key_channel_absmax: rope={rope!r}; use one of {ROPE_PAIRINGS}")
    k = keys.float().flatten(0, -3)  # [tokens, H, D]
    if rope == "none":
        return k.abs().amax(dim=0)
    half = k.shape[-1] // 2
    pair = torch.sqrt(k[..., :half] ** 2 + k[..., half:] ** 2).amax(dim=0)
    return torch.cat((pair, pair), dim=-1)


def smooth_attention_scales(absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """lambda = max|K_c|^alpha per (KV head, channel): K / lambda is stored, Q * lambda read."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth_attention_scales: alpha={alpha} is not in [0, 1]")
    return absmax.float().clamp_min(1e-5).pow(alpha)


def fold_smooth_attention(
    q_weight: torch.Tensor,
    q_bias: torch.Tensor | None,
    k_weight: torch.Tensor,
    k_bias: torch.Tensor | None,
    lam: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """q_proj rows times lambda, k_proj rows divided by it (weights [Hq*D, hidden], [Hkv*D, hidden]).

    lam [Hkv, D]; query head h reads KV head h // (Hq / Hkv), so its rows use that head's row
    of lambda. Computed in (at least) float32, returned in each tensor's dtype.
    """
    hkv, d = lam.shape
    n_rep = q_weight.shape[0] // (hkv * d)
    if q_weight.shape[0] != n_rep * hkv * d or k_weight.shape[0] != hkv * d:
        raise ValueError(
            f"fold_smooth_attention: q_proj {tuple(q_weight.shape)} / k_proj "
            f"{tuple(k_weight.shape)} do not match lambda [Hkv={hkv}, D={d}]"
        )
    q_lam = lam.repeat_interleave(n_rep, dim=0).flatten()  # [Hq * D]
    k_lam = lam.flatten()

    def scaled(t: torch.Tensor | None, s: torch.Tensor, divide: bool) -> torch.Tensor | None:
        if t is None:
            return None
        work = torch.promote_types(t.dtype, torch.float32)
        s = s.to(t.device, work).view((-1,) + (1,) * (t.dim() - 1))
        return (t.to(work) / s if divide else t.to(work) * s).to(t.dtype)

    return (
        scaled(q_weight, q_lam, False),
        scaled(q_bias, q_lam, False),
        scaled(k_weight, k_lam, True),
        scaled(k_bias, k_lam, True),
    )
