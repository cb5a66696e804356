"""The `qcompile::w4a16_linear` op: reference math, fake impl, registration, autograd."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rel
from hypothesis import given, settings
from strategies import linear_problems

import qcompile  # noqa: F401
from qcompile.config import Scheme
from qcompile.ops.w4a16 import w4a16_linear_reference
from qcompile.quant.int4 import PLANE_CHUNK, dequantize_int4, to_planes
from qcompile.quant.rtn import quantize_weight_int4

OP = torch.ops.qcompile.w4a16_linear


def _args(m=4, n=32, k=64, g=32, dtype=torch.float32, bias=True, lead=()):
    gen = torch.Generator().manual_seed(1)
    p = quantize_weight_int4(torch.randn(n, k, generator=gen), Scheme(group_size=g), dtype)
    x = torch.randn(*lead, m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    return x, p.qweight, p.scales, p.offsets, b, p.group_size


@settings(max_examples=25, deadline=None)
@given(problem=linear_problems())
def test_reference_matches_float64(problem):
    p = problem.packed
    out = OP(problem.x, p.qweight, p.scales, p.offsets, problem.bias, p.group_size)
    assert_close_rel(out, problem.reference64(), problem.dtype)


def test_reference_float32_is_exact_to_rounding():
    x, qw, s, o, b, g = _args(dtype=torch.float32)
    out = OP(x, qw, s, o, b, g)
    w = _dq(qw, s, o, g)
    assert_close_rel(out, x.double() @ w.t() + b.double(), torch.float32)


def _dq(qw, s, o, g):
    from qcompile.quant.int4 import PackedInt4

    return dequantize_int4(PackedInt4(qw, s, o, g), torch.float64)


def test_three_d_input_and_no_bias():
    x, qw, s, o, _, g = _args(lead=(2,), bias=False)
    out = OP(x, qw, s, o, None, g)
    assert out.shape == (2, 4, 32)
    assert_close_rel(out, x.double() @ _dq(qw, s, o, g).t(), torch.float32)


def test_fake_impl_gives_shape_and_dtype_without_computing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in _args(lead=(3,))]
        out = OP(*args)
    assert out.shape == (3, 4, 32) and out.dtype == torch.float32


def test_opcheck():
    torch.library.opcheck(OP.default, _args(dtype=torch.float32))
    torch.library.opcheck(OP.default, _args(dtype=torch.float32, bias=False, lead=(2,)))
    x, *rest = _args(dtype=torch.float32, k=256)
    torch.library.opcheck(OP.default, (to_planes(x), *rest, PLANE_CHUNK))


def test_plane_major_x_gives_the_same_output_and_its_gradient_in_its_order():
    x, qw, s, o, b, g = _args(k=256, lead=(2,))
    xp = to_planes(x).requires_grad_()
    x.requires_grad_()
    out_p = OP(xp, qw, s, o, b, g, PLANE_CHUNK)
    out = OP(x, qw, s, o, b, g)
    assert torch.equal(out_p, out)
    grad = torch.randn_like(out)
    out_p.backward(grad)
    out.backward(grad)
    assert torch.equal(xp.grad, to_planes(x.grad))
    assert not torch.equal(xp.grad, x.grad)


@pytest.mark.parametrize(("k", "x_planes"), [(256, 64), (192, 128)])
def test_plane_major_x_needs_k_a_multiple_of_the_chunk(k, x_planes):
    x, *rest = _args(k=k)
    with pytest.raises(ValueError, match=rf"x_planes={x_planes} must be 0 .* or 128 with K={k}"):
        OP(x, *rest, x_planes)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: (a[0][..., :-8], *a[1:]), "qweight must be"),
        (lambda a: (*a[:2], a[2][:-1], *a[3:]), "scales must be"),
        (lambda a: (*a[:4], a[4][:-1], a[5]), "bias must be"),
        (lambda a: (*a[:5], 48), "K=64 is not divisible by group_size=48"),
    ],
)
def test_bad_arguments_name_the_problem(change, match):
    with pytest.raises(ValueError, match=match):
        OP(*change(_args()))


def test_backward_through_activations():
    x, qw, s, o, b, g = _args()
    x.requires_grad_(True)
    bias = b.clone().requires_grad_(True)
    out = OP(x, qw, s, o, bias, g)
    grad = torch.randn_like(out)
    out.backward(grad)
    w = _dq(qw, s, o, g)
    assert_close_rel(x.grad, grad.double() @ w, torch.float32)
    assert_close_rel(bias.grad, grad.double().sum(0), torch.float32)


def test_reference_is_what_the_op_runs_on_cpu():
    args = _args(dtype=torch.bfloat16)
    assert torch.equal(OP(*args), w4a16_linear_reference(*args))


def _column_slice(t: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """`t` [rows, N] as columns before:before+N of a wider [rows, before + N + after] tensor."""
    wide = torch.cat([torch.zeros_like(t[:, :1]).expand(-1, before), t], 1)
    wide = torch.cat([wide, torch.zeros_like(t[:, :1]).expand(-1, after)], 1)
    return wide[:, before : before + t.shape[1]]


@pytest.mark.parametrize("g", [32, 64])  # g=64: scales/offsets have one row
def test_column_slices_of_wider_tensors_give_the_contiguous_result(g):
    x, qw, s, o, b, _ = _args(g=g)
    views = [_column_slice(t, 16, 8) for t in (qw, s, o)]
    assert not views[0].is_contiguous() and views[0].stride() == (56, 1)
    out = OP(x, *views, b, g)
    assert torch.equal(out, OP(x, qw, s, o, b, g))
    torch.library.opcheck(OP.default, (x, *views, b, g))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda qw, s, o: (qw, s.t().contiguous().t(), o), "scales has column stride != 1"),
        (lambda qw, s, o: (_column_slice(qw, 8, 0), s, o), "row strides differ"),
        (
            lambda qw, s, o: tuple(torch.as_strided(t, t.shape, (16, 1)) for t in (qw, s, o)),
            r"row strides differ or are < N=32",
        ),
    ],
)
def test_badly_strided_packed_tensors_are_rejected_with_the_fix(change, match):
    x, qw, s, o, b, g = _args()
    with pytest.raises(ValueError, match=match) as info:
        OP(x, *change(qw, s, o), b, g)
    assert "call .contiguous() on them" in str(info.value)
