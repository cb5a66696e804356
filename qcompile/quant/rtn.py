"""Round-to-nearest int4 quantization: no data, one pass over the weight."""

from __future__ import annotations

import torch

from qcompile.config import Scheme
from qcompile.quant.int4 import PackedInt4, pack_int4_along_k


def quantize_weight_int4(
    weight: torch.Tensor, scheme: Scheme, dtype: torch.dtype | None = None
) -> PackedInt4:
    """Quantize a [N, K] weight group-wise along K with round-to-nearest.

    Asymmetric: code = round((w - min) / scale), scale = (max - min) / 15, offset = min.
    Symmetric:  code = round(w / scale) + 8 in [0, 15], scale = absmax / 7, offset = -8 * scale.
    Scales and offsets are rounded to `dtype` (default: the weight's) before the codes are
    computed, so the stored tensors dequantize to exactly what the codes were fitted to.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight_int4: weight must be [N, K], got {tuple(weight.shape)}")
    n, k = weight.shape
    g = scheme.group_size_for(k)
    if k % g:
        raise ValueError(f"quantize_weight_int4: K={k} is not divisible by group_size={g}")
    dtype = dtype or weight.dtype
    finfo = torch.finfo(dtype)
    w = weight.detach().to(torch.float32).reshape(n, k // g, g)

    def stored(scale: torch.Tensor) -> torch.Tensor:
        # Scales stay positive in `dtype` (a tiny range must not round to 0; the floor is the
        # smallest subnormal) and small enough that the symmetric offset -8 * scale is finite.
        return scale.clamp(finfo.tiny * finfo.eps, finfo.max / 8).to(dtype).float()

    if scheme.symmetric:
        scales = stored(w.abs().amax(dim=-1) / 7)
        offsets = (-8 * scales).to(dtype).float()
    else:
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scales = stored((hi - lo) / 15)
        offsets = lo.to(dtype).float()
    codes = torch.round((w - offsets[..., None]) / scales[..., None]).clamp_(0, 15)
    return PackedInt4(
        qweight=pack_int4_along_k(codes.reshape(n, k)),
        scales=scales.to(dtype).t().contiguous(),
        offsets=offsets.to(dtype).t().contiguous(),
        group_size=g,
    )
