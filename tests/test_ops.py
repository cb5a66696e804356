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
from qcompile.quant.int4 import dequantize_int4
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


def test_non_contiguous_packed_tensors_are_rejected():
    x, qw, s, o, b, g = _args()
    with pytest.raises(ValueError, match="scales must be contiguous"):
        OP(x, qw, s.t().contiguous().t(), o, b, g)
