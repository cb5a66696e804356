"""Round-to-nearest int4 quantization: no data, one pass over the weight."""

from __future__ import annotations

import torch

from qcompile.config import Scheme
from qcompile.quant.int4 import PackedInt4, pack_int4_along_k, pad_columns

# Range shrink factors tried by the clip search (1.0 = plain min-max).
CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(11))


def fit_groups(
    w: torch.Tensor, symmetric: bool, dtype: torch.dtype, clip_search: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset of each group of `w` [..., G] (float32, already rounded to `dtype`).

    Asymmetric: scale = (max - min) / 15, offset = min. Symmetric: scale = absmax / 7,
    offset = -8 * scale. Rounding to `dtype` first means codes are fitted to what is stored.
    `clip_search` shrinks each group's range by the factor in `CLIP_GRID` that minimizes the
    group's sum |w - dequant(w)|^2.4 (clipping a rare outlier can lower everyone's error).
    """
    if clip_search:
        best = None
        for p in CLIP_GRID:
            scales, offsets = _fit(w * p, symmetric, dtype)
            q = round_to_codes(w, scales[..., None], offsets[..., None])
            err = (q * scales[..., None] + offsets[..., None] - w).abs().pow(2.4).sum(-1)
            if best is None:
                best = (err, scales, offsets)
            else:
                better = err < best[0]
                best = tuple(
                    torch.where(better, new, old)
                    for new, old in zip((err, scales, offsets), best, strict=True)
                )
        return best[1], best[2]
    return _fit(w, symmetric, dtype)


def _fit(w: torch.Tensor, symmetric: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    finfo = torch.finfo(dtype)

    def stored(scale: torch.Tensor) -> torch.Tensor:
        # Scales stay positive in `dtype` (a tiny range must not round to 0; the floor is the
        # smallest subnormal) and small enough that the symmetric offset -8 * scale is finite.
        return scale.clamp(finfo.tiny * finfo.eps, finfo.max / 8).to(dtype).float()

    if symmetric:
        scales = stored(w.abs().amax(dim=-1) / 7)
        return scales, (-8 * scales).to(dtype).float()
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    return stored((hi - lo) / 15), lo.to(dtype).float()


def round_to_codes(w: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Nearest code in [0, 15] of each element of `w` for broadcastable scales/offsets."""
    return torch.round((w - offsets) / scales).clamp_(0, 15)


def quantize_weight_int4(
    weight: torch.Tensor,
    scheme: Scheme,
    dtype: torch.dtype | None = None,
    clip_search: bool = False,
) -> PackedInt4:
    """Quantize a [N, K] weight group-wise along K with round-to-nearest (see `fit_groups`)."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight_int4: weight must be [N, K], got {tuple(weight.shape)}")
    weight = pad_columns(weight, scheme.padded_k(weight.shape[1]))
    n, k = weight.shape
    g = scheme.group_size_for(k)
    if k % g:
        raise ValueError(
            f"quantize_weight_int4: K={k} is not divisible by group_size={g}; use a group size "
            "that divides K, or Scheme(pad_k=True) to pad K to whole groups"
        )
    dtype = dtype or weight.dtype
    w = weight.detach().to(torch.float32).reshape(n, k // g, g)
    scales, offsets = fit_groups(w, scheme.symmetric, dtype, clip_search)
    codes = round_to_codes(w, scales[..., None], offsets[..., None])
    return PackedInt4(
        qweight=pack_int4_along_k(codes.reshape(n, k)),
        scales=scales.to(dtype).t().contiguous(),
        offsets=offsets.to(dtype).t().contiguous(),
        group_size=g,
    )
