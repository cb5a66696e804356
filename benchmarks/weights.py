"""Random packed int4 weights of a given shape, for timing (speed does not depend on values)."""

from __future__ import annotations

import torch

from qcompile.quant.int4 import PackedInt4


def random_packed(
    n: int, k: int, group: int, dtype: torch.dtype, device: str = "cuda"
) -> PackedInt4:
    """Uniform random codes, small positive scales, symmetric offsets; the op's layout."""
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device=device)
    scales = torch.rand(k // group, n, dtype=dtype, device=device) * 0.01 + 1e-3
    return PackedInt4(qweight, scales, -8 * scales, group)
