"""W4A8 numerics: QoQ progressive int4 weights and per-token 8-bit activations.

Weights (QServe's QoQ progressive group quantization), for W [N, K] and group size G:

    level 1, per output channel n: symmetric int8 in the protective range [-119, 119]
        s1[n] = max_k |W[n, k]| / 119                     float32
        w8[n, k] = round(W[n, k] / s1[n])                 in -119..119
    level 2, per group of G consecutive k, on the int8 values: asymmetric uint4 with an
    integer scale and an integer zero point
        lo = min(min w8, 0),  hi = max(max w8, 0)          (the range always holds 0)
        s2 = max(1, ceil((hi - lo) / 15))                  in 1..16 (ceil: 16 codes cover it)
        z  = round(-lo / s2)                               in 0..15
        q  = clamp(round(w8 / s2) + z, 0, 15)
    the kernels' int8 weight is w8' = (q - z) * s2, from integers only, and
        W[n, k] ~= s1[n] * w8'[n, k].

Why [-119, 119]: the codes cover [lo, hi], so every w8' lies within s2 / 2 <= 8 of its w8 and
|w8'| <= 119 + 8 = 127; the int4 -> int8 step never leaves int8 (QoQ's protective range).
With |x8| <= 127 the int32 accumulator of a K-long dot stays below 127 * 127 * K < 2**31 up
to K = 133,144.

Layout (produced only by `pack_w4a8`; the kernels read exactly this):

    qweight:        [K // 8, N] int32, 8 nibbles along K, low nibble first: code q of (n, k) is
                    (qweight[k // 8, n] >> (4 * (k % 8))) & 0xF  (W4A16's packing, quant/int4.py)
    group_scales:   [K // G, N] uint8, s2 in 1..16
    group_zeros:    [K // G, N] uint8, z in 0..15
    channel_scales: [N] float32, s1
Every tensor is N-contiguous, like W4A16's (a tile is rows of contiguous bytes). Storing z
rather than z * s2 keeps the metadata one byte each; the kernels form z * s2 once per
(column, group) and compute q * s2 - z * s2 (QServe's subtraction after multiplication).

Activations, per token (row of x [M, K]), dynamic and symmetric:
    scale[m] = max_k |x[m, k]| / QMAX,   xq[m, k] = round(x[m, k] * (QMAX / max_k |x[m, k]|))
with QMAX = 127 for int8 and 448 for float8_e4m3fn (rounding to nearest even in both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.config import Scheme
from qcompile.quant.int4 import (
    NIBBLES_PER_WORD,
    pack_int4_along_k,
    pad_columns,
    unpack_int4_along_k,
)
from qcompile.quant.rtn import CLIP_GRID

# Level-1 range: leaves room for the level-2 rounding (<= 8) inside int8 (see the docstring).
PROTECTIVE_INT8 = 119
INT4_CODES = 15
ACT_TORCH_DTYPES = {"int8": torch.int8, "float8_e4m3fn": torch.float8_e4m3fn}
ACT_QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0}
# Smallest row absmax used for a scale (an all-zero row would divide by 0); 2**-100 keeps
# QMAX / absmax finite in float32.
ABSMAX_FLOOR = 2.0**-100


@dataclass(frozen=True)
class PackedW4A8:
    """A QoQ-quantized [N, K] weight in the layout above."""

    qweight: torch.Tensor
    group_scales: torch.Tensor
    group_zeros: torch.Tensor
    channel_scales: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the original weight."""
        return self.qweight.shape[1], self.qweight.shape[0] * NIBBLES_PER_WORD

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.qweight, self.group_scales, self.group_zeros, self.channel_scales

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def quantize_weight_w4a8(
    weight: torch.Tensor, scheme: Scheme, clip_search: bool = False, channel_search: bool = False
) -> PackedW4A8:
    """Progressive (int8 per channel, then uint4 per group) quantization of a [N, K] weight.

    `clip_search`: each group's int8 range may be shrunk (`fit_w4a8_groups`);
    `channel_search`: each row's s1 may be stretched (`channel_scales_w4a8`)."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight_w4a8: weight must be [N, K], got {tuple(weight.shape)}")
    weight = pad_columns(weight, scheme.padded_k(weight.shape[1]))
    n, k = weight.shape
    g = scheme.group_size_for(k)
    check_w4a8_shape("quantize_weight_w4a8", k, g)
    w = weight.detach().to(torch.float32)
    s1 = channel_scales_w4a8(w, g if channel_search else 0)
    groups = to_int8(w, s1).reshape(n, k // g, g)
    s2, z = fit_w4a8_groups(groups, clip_search)
    q = round_to_w4a8_codes(groups, s2[..., None], z[..., None])
    return pack_w4a8(q.reshape(n, k), s2, z, s1)


def check_w4a8_shape(caller: str, k: int, g: int) -> None:
    """Raise unless K holds whole groups and whole int32 words of codes."""
    if k % g or k % NIBBLES_PER_WORD:
        raise ValueError(
            f"{caller}: K={k} is not divisible by group_size={g} "
            f"and {NIBBLES_PER_WORD} (int4 packing)"
        )


# s1 stretch factors `channel_scales_w4a8` tries: a coarser int8 grid moves the groups' integer
# ranges, and with them where `ceil(range / 15)` wastes levels. Only >= 1: shrinking s1 clips
# the row's largest weights, which lowered the weight error but raised perplexity on SmolLM2.
CHANNEL_STRETCH = (1.0, 1.04, 1.08, 1.12, 1.16)


def channel_scales_w4a8(w: torch.Tensor, group: int = 0) -> torch.Tensor:
    """Level 1: s1 [N] = max_k |w[n, k]| / 119 (float32, never 0). With `group` > 0, each
    row's s1 is instead the `CHANNEL_STRETCH` multiple whose RTN fit in groups of `group`
    has the smallest squared weight error (ties keep the smaller s1)."""
    base = (w.abs().amax(dim=1) / PROTECTIVE_INT8).clamp_min(torch.finfo(torch.float32).tiny)
    if group <= 0:
        return base
    n, k = w.shape
    best_err, best = None, base
    for stretch in CHANNEL_STRETCH:
        s1 = base * stretch
        groups = to_int8(w, s1).reshape(n, k // group, group)
        s2, z = fit_w4a8_groups(groups)
        q = round_to_w4a8_codes(groups, s2[..., None], z[..., None])
        err = (((q - z[..., None]) * s2[..., None]).reshape(n, k) * s1[:, None] - w).pow(2).sum(1)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, s1, best)
    return best


def to_int8(w: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
    """w8 = round(w / s1) in the protective range, for w [N, ...] (float32, integer-valued).

    The clamp matters only for weights GPTQ's error updates pushed past the row's absmax; it
    keeps every group range within 238, hence s2 <= 16 and |w8'| <= 127."""
    s1 = s1.reshape(-1, *([1] * (w.dim() - 1)))
    return torch.round(w / s1).clamp_(-PROTECTIVE_INT8, PROTECTIVE_INT8)


def fit_w4a8_groups(
    w8: torch.Tensor, clip_search: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Level 2: integer (s2, z) of each group of int8 values w8 [..., G] (float32 tensors).

    Min-max over a range that holds 0 (see the module docstring). `clip_search` shrinks the
    range by the factor in `CLIP_GRID` that minimizes the group's sum |w8 - w8'|^2.4 (as
    W4A16's `fit_groups`; ties keep the full range); a shrunk range still holds 0, so s2 and
    z stay in 1..16 and 0..15.
    """
    lo = w8.amin(dim=-1).clamp(max=0)
    hi = w8.amax(dim=-1).clamp(min=0)

    def fit(shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
        s2 = torch.ceil((hi - lo) * shrink / INT4_CODES).clamp_(min=1)
        return s2, torch.round(-lo * shrink / s2)

    if not clip_search:
        return fit(1.0)
    best = None
    for shrink in CLIP_GRID:
        s2, z = fit(shrink)
        q = round_to_w4a8_codes(w8, s2[..., None], z[..., None])
        err = ((q - z[..., None]) * s2[..., None] - w8).abs().pow(2.4).sum(-1)
        if best is None:
            best = (err, s2, z)
        else:
            better = err < best[0]
            best = tuple(
                torch.where(better, new, old) for new, old in zip((err, s2, z), best, strict=True)
            )
    return best[1], best[2]


def round_to_w4a8_codes(w8: torch.Tensor, s2: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Nearest code q = clamp(round(w8 / s2) + z, 0, 15) for broadcastable s2, z."""
    return (torch.round(w8 / s2) + z).clamp_(0, INT4_CODES)


def pack_w4a8(
    codes: torch.Tensor, s2: torch.Tensor, z: torch.Tensor, s1: torch.Tensor
) -> PackedW4A8:
    """[N, K] codes, [N, K // G] s2 and z, [N] s1 -> the layout above."""
    n, k = codes.shape
    return PackedW4A8(
        qweight=pack_int4_along_k(codes),
        group_scales=s2.to(torch.uint8).t().contiguous(),
        group_zeros=z.to(torch.uint8).t().contiguous(),
        channel_scales=s1.contiguous(),
        group_size=k // s2.shape[1],
    )


def int8_weight(
    qweight: torch.Tensor, group_scales: torch.Tensor, group_zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """The [N, K] integer weight w8' = (q - z) * s2 the kernels multiply with (int32, |w8'| <= 127)."""
    q = unpack_int4_along_k(qweight).to(torch.int32)
    n, k = q.shape
    s2 = group_scales.to(torch.int32).t()[..., None]  # [N, K/G, 1]
    z = group_zeros.to(torch.int32).t()[..., None]
    return ((q.reshape(n, k // group_size, group_size) - z) * s2).reshape(n, k)


def dequantize_w4a8(packed: PackedW4A8, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [N, K] weight the codes stand for: s1[n] * w8'[n, k], computed in float64."""
    w8 = int8_weight(packed.qweight, packed.group_scales, packed.group_zeros, packed.group_size)
    return (w8.double() * packed.channel_scales.double()[:, None]).to(dtype)


def quantize_activations_per_token(
    x: torch.Tensor, act_dtype: str, chunks: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (xq [..., K] int8 / float8_e4m3fn, scale [...] float32).

    Plain torch ops on purpose: the compiled graph uses this very function in front of the
    W4A8 op, so Inductor fuses the row reduction and the rounding into whatever produced x
    (an RMSNorm, SiLU * mul). The Triton kernel `lowering.w4a8` runs for eager calls must
    agree with it bit for bit. `chunks` (dividing K): each row's absmax taken over that many
    chunks first, then over the chunks' maxima; max is exact, so the result is the same.
    It gives Inductor's first reduction `chunks` programs a row (`absmax_chunks`).
    """
    qmax = ACT_QMAX[act_dtype]
    xf = x.float()
    if chunks > 1:
        parts = xf.abs().unflatten(-1, (chunks, xf.shape[-1] // chunks)).amax(dim=-1)
        absmax = parts.amax(dim=-1).clamp_min(ABSMAX_FLOOR)
    else:
        absmax = xf.abs().amax(dim=-1).clamp_min(ABSMAX_FLOOR)
    # A true division (one rounding): `qmax / absmax` would be reciprocal-then-multiply in torch.
    inv = torch.full_like(absmax, qmax) / absmax
    v = xf * inv[..., None]
    if act_dtype == "int8":
        xq = torch.round(v).clamp_(-qmax, qmax).to(torch.int8)
    else:  # the cast rounds to nearest even; the clamp keeps it finite (e4m3fn has no inf)
        xq = v.clamp(-qmax, qmax).to(torch.float8_e4m3fn)
    return xq, absmax / qmax


# Columns per chunk of the compiled graph's absmax (`quantize_activations_per_token`'s
# `chunks`), 0 for one reduction per row. At M = 16 Inductor's SiLU * mul with the
# quantization fused took 7.7 us at K = 28672 against 2.7 us without it (H100, session 39):
# the row reduction runs one program a row. Over 2048-column chunks (the same bits) the
# producer took 0.4-1.3 us less at M = 1 and 16, K = 14336 and 28672 (H200, session 40,
# `results/session40/absmax/`: e.g. M = 16, K = 14336 7.2 -> 6.0 us, block 25.1 -> 23.8).
_ABSMAX_CHUNK = 2048


def absmax_chunks(k: int) -> int:
    """The chunks the compiled graph takes a K-wide row's absmax over (`_ABSMAX_CHUNK`)."""
    c = _ABSMAX_CHUNK
    return k // c if c and k % c == 0 and k >= 2 * c else 1


def dequantize_activations(xq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """xq * scale per row, in float64 (exact)."""
    return xq.double() * scale.double()[..., None]
