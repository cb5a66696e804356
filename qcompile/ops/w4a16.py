"""`qcompile::w4a16_linear`: int4 group-wise weight x 16-bit activation linear layer.

The reference implementation below (dequantize, then matmul) is the CPU path, the test
oracle and the definition of the math; on CUDA the op runs the Triton kernels of
`qcompile.lowering.w4a16`. The op is opaque to Inductor, which fuses everything around it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qcompile.quant.int4 import (
    NIBBLES_PER_WORD,
    PLANE_CHUNK,
    PackedInt4,
    dequantize_int4,
    from_planes,
    to_planes,
)

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
# The kernels tile K in steps of at least 32 (tl.dot needs K-tiles >= 16; groups are >= 32).
KERNEL_K_MULTIPLE = 32


def check_w4a16_args(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    x_planes: int = 0,
) -> None:
    """Shape/dtype contract of the op; raises ValueError saying what is wrong and how to fix it."""
    k = x.shape[-1]
    if x_planes not in (0, PLANE_CHUNK) or (x_planes and k % x_planes):
        raise ValueError(
            f"qcompile.w4a16_linear: x_planes={x_planes} must be 0 (x in natural k order) or "
            f"{PLANE_CHUNK} with K={k} a multiple of it (x from `to_planes`)"
        )
    words, n = qweight.shape
    if qweight.dtype != torch.int32 or words * NIBBLES_PER_WORD != k:
        raise ValueError(
            f"qcompile.w4a16_linear: qweight must be [K/8, N] int32 for x with K={k}, "
            f"got {tuple(qweight.shape)} {qweight.dtype}"
        )
    if group_size <= 0 or k % group_size:
        raise ValueError(
            f"qcompile.w4a16_linear: K={k} is not divisible by group_size={group_size}"
        )
    groups = (k // group_size, n)
    for name, t in (("scales", scales), ("offsets", offsets)):
        if tuple(t.shape) != groups:
            raise ValueError(
                f"qcompile.w4a16_linear: {name} must be [K/group_size, N] = {groups}, got {tuple(t.shape)}"
            )
    check_packed_strides(qweight, scales, offsets)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"qcompile.w4a16_linear: bias must be [N]={n}, got {tuple(bias.shape)}")


def check_packed_strides(
    qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor
) -> None:
    """Each packed tensor is row-major with unit column stride, and all three share one row
    stride >= N: contiguous, or column slices of wider [rows, N_total] tensors (co-located
    siblings, `qcompile.passes.fuse`). A stride of a size-1 dimension is never used."""
    n = qweight.shape[1]
    named = (("qweight", qweight), ("scales", scales), ("offsets", offsets))
    bad_columns = [name for name, t in named if t.shape[1] > 1 and t.stride(1) != 1]
    row_strides = [t.stride(0) for _, t in named if t.shape[0] > 1]  # may be SymInts
    if (
        bad_columns
        or any(s != row_strides[0] for s in row_strides)
        or any(s < n for s in row_strides)
    ):
        strides = ", ".join(f"{name} {tuple(t.stride())}" for name, t in named)
        problem = (
            f"{bad_columns[0]} has column stride != 1"
            if bad_columns
            else f"row strides differ or are < N={n}"
        )
        raise ValueError(
            f"qcompile.w4a16_linear: {problem} (strides: {strides}); qweight, scales and offsets "
            "must be contiguous or column slices of row-major tensors sharing one row stride "
            ">= N; call .contiguous() on them"
        )


@torch.library.custom_op("qcompile::w4a16_linear", mutates_args=())
def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    x_planes: int = 0,
) -> torch.Tensor:
    """x [..., K] @ dequant(qweight, scales, offsets)^T [K, N] (+ bias) -> [..., N] in x.dtype.

    x_planes: 0, or `PLANE_CHUNK` when x's K axis comes plane-major (`to_planes`): what the
    M <= 64 tensor-core kernels read, written for free by the producer when the pass emits
    the permutation in the graph (the kernels otherwise copy x themselves)."""
    return w4a16_linear_reference(x, qweight, scales, offsets, bias, group_size, x_planes)


def w4a16_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    x_planes: int = 0,
) -> torch.Tensor:
    """Dequantize in float32, cast to x's dtype, then `F.linear`: clear, not fast."""
    check_w4a16_args(x, qweight, scales, offsets, bias, group_size, x_planes)
    if x_planes:
        x = from_planes(x, x_planes)
    w = dequantize_int4(PackedInt4(qweight, scales, offsets, group_size), x.dtype)
    return F.linear(x, w, bias)


@w4a16_linear.register_fake
def _(x, qweight, scales, offsets, bias, group_size, x_planes=0):
    from qcompile.lowering.w4a16 import reserve_tile_counters

    check_w4a16_args(x, qweight, scales, offsets, bias, group_size, x_planes)
    reserve_tile_counters(x.device)  # split-K's counters, outside any CUDA-graph pool
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


@w4a16_linear.register_kernel("cuda")
def _(x, qweight, scales, offsets, bias, group_size, x_planes=0):
    from qcompile.lowering.w4a16 import w4a16_linear_cuda

    check_w4a16_args(x, qweight, scales, offsets, bias, group_size, x_planes)
    k = x.shape[-1]
    n = qweight.shape[1]
    if x.dtype not in KERNEL_DTYPES or k % KERNEL_K_MULTIPLE:
        # The pass never emits this; a hand-built call gets the reference math, not an error.
        return w4a16_linear_reference(x, qweight, scales, offsets, bias, group_size, x_planes)
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], n))
    out = w4a16_linear_cuda(x2, qweight, scales, offsets, bias, group_size, bool(x_planes))
    return out.reshape(*x.shape[:-1], n)


def _setup_context(ctx, inputs, output):
    _, qweight, scales, offsets, bias, group_size, *rest = inputs
    ctx.save_for_backward(qweight, scales, offsets)
    ctx.group_size = group_size
    ctx.x_planes = rest[0] if rest else 0
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    """d/dx = grad_out @ W (dequantized); d/dbias = sum of grad_out. The int4 weight is frozen."""
    qweight, scales, offsets = ctx.saved_tensors
    w = dequantize_int4(PackedInt4(qweight, scales, offsets, ctx.group_size), grad_out.dtype)
    grad_x = grad_out @ w
    if ctx.x_planes:  # the gradient of x in x's own (plane-major) order
        grad_x = to_planes(grad_x, ctx.x_planes)
    grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, grad_bias, None, None


w4a16_linear.register_autograd(_backward, setup_context=_setup_context)
