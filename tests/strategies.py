"""Hypothesis strategies for quantized-linear problems (small, so the interpreter is fast)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from qcompile.config import Scheme
from qcompile.quant.int4 import PackedInt4
from qcompile.quant.rtn import quantize_weight_int4
from qcompile.quant.w4a8 import PackedW4A8, quantize_weight_w4a8


@dataclass
class LinearProblem:
    x: torch.Tensor  # [M, K]
    weight: torch.Tensor  # [N, K] float32 original
    packed: PackedInt4
    bias: torch.Tensor | None
    dtype: torch.dtype

    def reference64(self) -> torch.Tensor:
        """x @ dequant(W)^T + b in float64: the oracle every kernel is held to."""
        from qcompile.quant.int4 import dequantize_int4

        w = dequantize_int4(self.packed, torch.float64).to(self.x.device)
        out = self.x.double() @ w.t()
        return out + self.bias.double() if self.bias is not None else out


@st.composite
def linear_problems(draw, device: str = "cpu", max_m: int = 40) -> LinearProblem:
    m = draw(st.sampled_from([1, 2, 3, 5, 16, 17, 33, max_m]))
    n = draw(st.sampled_from([16, 40, 64, 72, 96]))  # 40, 72: N not a multiple of the tile
    group = draw(st.sampled_from([32, 64, 128, None]))
    k = (group or 32) * draw(st.integers(1, 4 if group != 128 else 2))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16]))
    symmetric = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen)
    x = torch.randn(m, k, generator=gen)
    if draw(st.booleans()):  # outliers: a few weights and activation channels 50x larger
        weight.view(-1)[torch.randint(0, n * k, (max(1, n * k // 100),), generator=gen)] *= 50
        x[:, torch.randint(0, k, (max(1, k // 32),), generator=gen)] *= 50
    bias = torch.randn(n, generator=gen).to(dtype).to(device) if draw(st.booleans()) else None
    packed = quantize_weight_int4(weight, Scheme(group_size=group, symmetric=symmetric), dtype)
    packed = PackedInt4(
        *(t.to(device) for t in (packed.qweight, packed.scales, packed.offsets)), packed.group_size
    )
    return LinearProblem(x.to(dtype).to(device), weight, packed, bias, dtype)


@dataclass
class W4A8Problem:
    x: torch.Tensor  # [M, K] float activations
    weight: torch.Tensor  # [N, K] float32 original
    packed: PackedW4A8
    bias: torch.Tensor | None
    dtype: torch.dtype  # x's and the output's dtype
    act_dtype: str  # "int8" or "float8_e4m3fn"

    def quantized_x(self) -> tuple[torch.Tensor, torch.Tensor]:
        from qcompile.quant.w4a8 import quantize_activations_per_token

        return quantize_activations_per_token(self.x, self.act_dtype)

    def accumulator64(self) -> torch.Tensor:
        """sum_k xq * (q - z) * s2 in float64 from the unpacked integers: exact."""
        from qcompile.quant.w4a8 import int8_weight

        p = self.packed
        w8 = int8_weight(p.qweight.cpu(), p.group_scales.cpu(), p.group_zeros.cpu(), p.group_size)
        return self.quantized_x()[0].cpu().double() @ w8.double().t()

    def reference64(self) -> torch.Tensor:
        """acc * x_scale[m] * s1[n] (+ bias) in float64: the oracle of the kernels' output."""
        scale = self.quantized_x()[1].cpu().double()
        out = self.accumulator64() * scale[:, None] * self.packed.channel_scales.cpu().double()
        return out + self.bias.cpu().double() if self.bias is not None else out


@st.composite
def w4a8_problems(
    draw, device: str = "cpu", max_m: int = 33, act_dtypes=("int8", "float8_e4m3fn")
) -> W4A8Problem:
    m = draw(st.sampled_from([1, 2, 3, 5, 16, 17, max_m]))
    n = draw(st.sampled_from([16, 40, 64, 72]))  # 40, 72: N not a multiple of the tile
    group = draw(st.sampled_from([32, 64, 128, None]))
    k = (group or 64) * draw(st.integers(1, 4 if group != 128 else 2))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16]))
    act_dtype = draw(st.sampled_from(act_dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    weight = torch.randn(n, k, generator=gen)
    x = torch.randn(m, k, generator=gen)
    if draw(st.booleans()):  # outliers: a few weights and activation channels 50x larger
        weight.view(-1)[torch.randint(0, n * k, (max(1, n * k // 100),), generator=gen)] *= 50
        x[:, torch.randint(0, k, (max(1, k // 32),), generator=gen)] *= 50
    if draw(st.booleans()):
        x[0] = 0  # an all-zero token: finite scale, zero output row
    bias = torch.randn(n, generator=gen).to(dtype).to(device) if draw(st.booleans()) else None
    packed = quantize_weight_w4a8(weight, Scheme(name="w4a8", group_size=group))
    packed = PackedW4A8(*(t.to(device) for t in packed.tensors()), packed.group_size)
    return W4A8Problem(x.to(dtype).to(device), weight, packed, bias, dtype, act_dtype)
