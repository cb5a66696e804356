"""`qcompile::w4a8_linear` and `qcompile::w4a8_linear_quantized_act`: QoQ int4 weights x
per-token 8-bit activations (layouts and math: `qcompile.quant.w4a8`).

`w4a8_linear(x, ...)` takes float activations and quantizes them per token itself;
`w4a8_linear_quantized_act(xq, x_scale, ...)` takes them already quantized, so the compiled
graph can compute (xq, x_scale) with plain torch ops that Inductor fuses into the producer of
x. The reference implementation is the exact integer math: the accumulator
acc[m, n] = sum_k xq[m, k] * (q - z)[n, k] * s2 is a sum of integers (int8) or of multiples of
2**-9 (fp8) far below 2**53, so float64 computes it exactly; then out = acc * scale[m] * s1[n].
It is the CPU path and the bit-exact oracle of the kernels' integer part. On CUDA the ops run
`qcompile.lowering.w4a8`.
"""

from __future__ import annotations

import torch

from qcompile.config import W4A8_ACT_DTYPES
from qcompile.quant.int4 import NIBBLES_PER_WORD
from qcompile.quant.w4a8 import (
    ACT_TORCH_DTYPES,
    PackedW4A8,
    dequantize_w4a8,
    int8_weight,
    quantize_activations_per_token,
)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
# int8 / fp8 tl.dot needs K tiles of at least 32; groups are multiples of 32 too.
KERNEL_K_MULTIPLE = 32
_QUANT_DTYPES = tuple(ACT_TORCH_DTYPES.values())
# Longest K chunk whose int8 x int8 dot is exact in float32: 127 * 127 * 1040 < 2**24.
EXACT_FP32_K = 1024


def check_w4a8_weight_args(
    k: int,
    qweight: torch.Tensor,
    group_scales: torch.Tensor,
    group_zeros: torch.Tensor,
    channel_scales: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    op: str = "w4a8_linear",
) -> None:
    """The packed weight's contract (shapes, dtypes, contiguity) for activations with K=`k`."""
    where = f"qcompile.{op}"
    words, n = qweight.shape
    if qweight.dtype != torch.int32 or words * NIBBLES_PER_WORD != k:
        raise ValueError(
            f"{where}: qweight must be [K/8, N] int32 for x with K={k}, "
            f"got {tuple(qweight.shape)} {qweight.dtype}"
        )
    if group_size <= 0 or k % group_size:
        raise ValueError(f"{where}: K={k} is not divisible by group_size={group_size}")
    groups = (k // group_size, n)
    for name, t in (("group_scales", group_scales), ("group_zeros", group_zeros)):
        if tuple(t.shape) != groups or t.dtype != torch.uint8:
            raise ValueError(
                f"{where}: {name} must be [K/group_size, N] = {groups} uint8, "
                f"got {tuple(t.shape)} {t.dtype}"
            )
    if tuple(channel_scales.shape) != (n,) or channel_scales.dtype != torch.float32:
        raise ValueError(
            f"{where}: channel_scales must be [N] = ({n},) float32, "
            f"got {tuple(channel_scales.shape)} {channel_scales.dtype}"
        )
    for name, t in (
        ("qweight", qweight),
        ("group_scales", group_scales),
        ("group_zeros", group_zeros),
        ("channel_scales", channel_scales),
    ):
        if not t.is_contiguous():
            raise ValueError(f"{where}: {name} must be contiguous (call .contiguous())")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{where}: bias must be [N]={n}, got {tuple(bias.shape)}")


def check_w4a8_args(
    x, qweight, group_scales, group_zeros, channel_scales, bias, group_size, act_dtype
):
    """Contract of `w4a8_linear`; raises ValueError saying what is wrong and how to fix it."""
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"qcompile.w4a8_linear: x must be float16/bfloat16/float32, got {x.dtype} "
            "(already-quantized activations go to w4a8_linear_quantized_act)"
        )
    if act_dtype not in W4A8_ACT_DTYPES:
        raise ValueError(
            f"qcompile.w4a8_linear: act_dtype={act_dtype!r} is not supported; use one of {W4A8_ACT_DTYPES}"
        )
    check_w4a8_weight_args(
        x.shape[-1], qweight, group_scales, group_zeros, channel_scales, bias, group_size
    )


def check_w4a8_quantized_act_args(
    xq, x_scale, qweight, group_scales, group_zeros, channel_scales, bias, group_size, out_dtype
):
    """Contract of `w4a8_linear_quantized_act`."""
    op = "w4a8_linear_quantized_act"
    if xq.dtype not in _QUANT_DTYPES:
        raise ValueError(
            f"qcompile.{op}: xq must be int8 or float8_e4m3fn, got {xq.dtype} "
            "(float activations go to w4a8_linear)"
        )
    if x_scale.dtype != torch.float32 or tuple(x_scale.shape) != tuple(xq.shape[:-1]):
        raise ValueError(
            f"qcompile.{op}: x_scale must be float32 of shape xq.shape[:-1] = "
            f"{tuple(xq.shape[:-1])}, got {tuple(x_scale.shape)} {x_scale.dtype}"
        )
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"qcompile.{op}: out_dtype must be a float dtype, got {out_dtype}")
    check_w4a8_weight_args(
        xq.shape[-1], qweight, group_scales, group_zeros, channel_scales, bias, group_size, op
    )


def w4a8_accumulator_reference(
    xq: torch.Tensor,
    qweight: torch.Tensor,
    group_scales: torch.Tensor,
    group_zeros: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """acc [..., N] = xq @ ((q - z) * s2)^T in float64: exact (see the module docstring).

    int8 activations take a faster route that is just as exact: a K chunk of at most
    `EXACT_FP32_K` products sums integers below 127 * 127 * 1040 < 2**24, which float32 adds
    without rounding in any order (a BLAS sgemm, FMA or not), then float64 adds the chunks."""
    w8 = int8_weight(qweight, group_scales, group_zeros, group_size).t()
    if xq.dtype != torch.int8 or torch.get_float32_matmul_precision() != "highest":
        return xq.double() @ w8.double()
    k = xq.shape[-1]
    acc = None
    for k0 in range(0, k, EXACT_FP32_K):
        part = (
            xq[..., k0 : k0 + EXACT_FP32_K].float() @ w8[k0 : k0 + EXACT_FP32_K].float()
        ).double()
        acc = part if acc is None else acc + part
    return acc


# --------------------------------------------------------------------------- quantized x
@torch.library.custom_op("qcompile::w4a8_linear_quantized_act", mutates_args=())
def w4a8_linear_quantized_act(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    qweight: torch.Tensor,
    group_scales: torch.Tensor,
    group_zeros: torch.Tensor,
    channel_scales: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """(xq * x_scale) [..., K] @ (s1 * (q - z) * s2)^T (+ bias) -> [..., N] in out_dtype."""
    return w4a8_linear_quantized_act_reference(
        xq, x_scale, qweight, group_scales, group_zeros, channel_scales, bias, group_size, out_dtype
    )


def w4a8_linear_quantized_act_reference(
    xq, x_scale, qweight, group_scales, group_zeros, channel_scales, bias, group_size, out_dtype
) -> torch.Tensor:
    """Exact accumulator, then acc * x_scale[m] * s1[n] (+ bias) in float64, rounded once."""
    check_w4a8_quantized_act_args(
        xq, x_scale, qweight, group_scales, group_zeros, channel_scales, bias, group_size, out_dtype
    )
    acc = w4a8_accumulator_reference(xq, qweight, group_scales, group_zeros, group_size)
    out = acc * x_scale.double()[..., None] * channel_scales.double()
    if bias is not None:
        out = out + bias.double()
    return out.to(out_dtype)


@w4a8_linear_quantized_act.register_fake
def _(xq, x_scale, qweight, group_scales, group_zeros, channel_scales, bias, group_size, out_dtype):
    from qcompile.lowering.w4a8 import reserve_lane_buffers

    check_w4a8_quantized_act_args(
        xq, x_scale, qweight, group_scales, group_zeros, channel_scales, bias, group_size, out_dtype
    )
    reserve_lane_buffers(xq.device, qweight.shape[1])  # the lane kernel's split-K buffers
    return xq.new_empty((*xq.shape[:-1], qweight.shape[1]), dtype=out_dtype)


@w4a8_linear_quantized_act.register_kernel("cuda")
def _(xq, x_scale, qweight, group_scales, group_zeros, channel_scales, bias, group_size, out_dtype):
    from qcompile.lowering.w4a8 import w4a8_linear_quantized_act_cuda

    args = (qweight, group_scales, group_zeros, channel_scales, bias, group_size)
    check_w4a8_quantized_act_args(xq, x_scale, *args, out_dtype)
    k, n = xq.shape[-1], qweight.shape[1]
    if out_dtype not in KERNEL_DTYPES or k % KERNEL_K_MULTIPLE:
        return w4a8_linear_quantized_act_reference(xq, x_scale, *args, out_dtype)
    xq2 = xq.reshape(-1, k)
    if xq2.shape[0] == 0:
        return xq.new_empty((*xq.shape[:-1], n), dtype=out_dtype)
    out = w4a8_linear_quantized_act_cuda(xq2, x_scale.reshape(-1), *args, out_dtype)
    return out.reshape(*xq.shape[:-1], n)


def _no_backward(ctx, grad_out):
    raise RuntimeError(
        "qcompile.w4a8_linear_quantized_act is inference-only (its input is already rounded); "
        "use qcompile.w4a8_linear (straight-through gradient for x) or run under torch.no_grad()"
    )


w4a8_linear_quantized_act.register_autograd(_no_backward)


# --------------------------------------------------------------------------- float x
@torch.library.custom_op("qcompile::w4a8_linear", mutates_args=())
def w4a8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    group_scales: torch.Tensor,
    group_zeros: torch.Tensor,
    channel_scales: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    act_dtype: str,
) -> torch.Tensor:
    """Quantize x [..., K] per token to `act_dtype`, then `w4a8_linear_quantized_act`."""
    return w4a8_linear_reference(
        x, qweight, group_scales, group_zeros, channel_scales, bias, group_size, act_dtype
    )


def w4a8_linear_reference(
    x, qweight, group_scales, group_zeros, channel_scales, bias, group_size, act_dtype
) -> torch.Tensor:
    check_w4a8_args(
        x, qweight, group_scales, group_zeros, channel_scales, bias, group_size, act_dtype
    )
    xq, x_scale = quantize_activations_per_token(x, act_dtype)
    return w4a8_linear_quantized_act_reference(
        xq, x_scale, qweight, group_scales, group_zeros, channel_scales, bias, group_size, x.dtype
    )


@w4a8_linear.register_fake
def _(x, qweight, group_scales, group_zeros, channel_scales, bias, group_size, act_dtype):
    from qcompile.lowering.w4a8 import reserve_lane_buffers

    check_w4a8_args(
        x, qweight, group_scales, group_zeros, channel_scales, bias, group_size, act_dtype
    )
    reserve_lane_buffers(x.device, qweight.shape[1])  # the lane kernel's split-K buffers
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


@w4a8_linear.register_kernel("cuda")
def _(x, qweight, group_scales, group_zeros, channel_scales, bias, group_size, act_dtype):
    from qcompile.lowering.w4a8 import w4a8_linear_cuda

    args = (qweight, group_scales, group_zeros, channel_scales, bias, group_size)
    check_w4a8_args(x, *args, act_dtype)
    k, n = x.shape[-1], qweight.shape[1]
    if x.dtype not in KERNEL_DTYPES or k % KERNEL_K_MULTIPLE:
        # The pass never emits this; a hand-built call gets the reference math, not an error.
        return w4a8_linear_reference(x, *args, act_dtype)
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], n))
    out = w4a8_linear_cuda(x2, *args, act_dtype)
    return out.reshape(*x.shape[:-1], n)


def _setup_context(ctx, inputs, output):
    _, qweight, group_scales, group_zeros, channel_scales, bias, group_size, _ = inputs
    ctx.save_for_backward(qweight, group_scales, group_zeros, channel_scales)
    ctx.group_size = group_size
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    """Straight-through for x: d/dx = grad_out @ W (dequantized); the weight is frozen."""
    packed = PackedW4A8(*ctx.saved_tensors, ctx.group_size)
    w = dequantize_w4a8(packed, grad_out.dtype).to(grad_out.device)
    grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_out @ w, None, None, None, None, grad_bias, None, None


w4a8_linear.register_autograd(_backward, setup_context=_setup_context)
