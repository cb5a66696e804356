"""Random packed weights (W4A16, W4A8) of a given shape, for timing (speed does not depend
on values)."""

from __future__ import annotations

import torch

from qcompile.quant.int4 import PackedInt4
from qcompile.quant.w4a8 import PackedW4A8


def random_packed(
    n: int, k: int, group: int, dtype: torch.dtype, device: str = "cuda"
) -> PackedInt4:
    """Uniform random codes, small positive scales, symmetric offsets; the op's layout."""
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device=device)
    scales = torch.rand(k // group, n, dtype=dtype, device=device) * 0.01 + 1e-3
    return PackedInt4(qweight, scales, -8 * scales, group)


def rotated_w4a16(
    n: int, k: int, group: int, dtype: torch.dtype, l2_bytes: int
) -> tuple[list[PackedInt4], list[torch.Tensor]]:
    """Enough packed int4 copies, and fp16 [N, K] copies for cuBLAS, that rotating through
    each set spans >= 4x L2 (`bench_w4a16.copies`)."""
    from bench_w4a16 import copies

    nbytes = n * k // 2 + 4 * (k // group) * n
    packed = [random_packed(n, k, group, dtype) for _ in range(copies(nbytes, l2_bytes))]
    dense = [
        torch.randn(n, k, dtype=dtype, device="cuda") for _ in range(copies(2 * n * k, l2_bytes))
    ]
    return packed, dense


def random_w4a8(n: int, k: int, group: int, device: str = "cuda") -> PackedW4A8:
    """Uniform random codes and zeros 0..15, group scales 1..8 (so every (q - z) * s2 fits
    int8, as QoQ's real codes do), small fp32 channel scales; the W4A8 op's layout."""
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device=device)
    scales = torch.randint(1, 9, (k // group, n), dtype=torch.uint8, device=device)
    zeros = torch.randint(0, 16, (k // group, n), dtype=torch.uint8, device=device)
    channel = torch.rand(n, dtype=torch.float32, device=device) * 1e-3 + 1e-4
    return PackedW4A8(qweight, scales, zeros, channel, group)
