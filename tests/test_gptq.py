"""GPTQ against RTN: identical without input correlation, better output error with it, on
W4A16's grid and on W4A8's progressive (QoQ) grid."""

from __future__ import annotations

import copy
import random
import statistics

import pytest
import torch
from helpers import assert_close_rel
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import HessianProblem, hessian_problems, make_hessian_problem
from torch import nn

import qcompile
from qcompile import QuantConfig, Scheme
from qcompile.quant.calibration import collect_input_hessians
from qcompile.quant.gptq import gptq_quantize_weight, gptq_quantizer
from qcompile.quant.int4 import dequantize_int4, unpack_int4_along_k
from qcompile.quant.rtn import quantize_weight_int4
from qcompile.quant.w4a8 import (
    PackedW4A8,
    dequantize_activations,
    dequantize_w4a8,
    int8_weight,
    quantize_activations_per_token,
    quantize_weight_w4a8,
)


def _inputs(rows: int, k: int, seed: int) -> torch.Tensor:
    """Samples (by `seed`) of one fixed distribution of correlated activations with a few
    outlier channels, like a transformer's."""
    fixed = torch.Generator().manual_seed(1234)
    mixing = torch.randn(k // 4, k, generator=fixed)
    outliers = torch.randperm(k, generator=fixed)[: k // 32]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k // 4, generator=gen) @ mixing
    x[:, outliers] *= 8
    return x + 0.1 * torch.randn(rows, k, generator=gen)


def _output_error(packed, weight, x) -> float:
    w_q = dequantize_int4(packed, torch.float32)
    return ((x @ (weight - w_q).t()).norm() / (x @ weight.t()).norm()).item()


def test_identity_hessian_gives_rtn_codes():
    """No correlation between inputs: nothing to compensate, so GPTQ is exactly RTN."""
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    for scheme in (Scheme(group_size=64), Scheme(group_size=32, symmetric=True)):
        g = gptq_quantize_weight(w, torch.eye(256), scheme, damp=0.0)
        r = quantize_weight_int4(w, scheme)
        assert torch.equal(g.qweight, r.qweight)
        assert torch.equal(g.scales, r.scales) and torch.equal(g.offsets, r.offsets)


@pytest.mark.parametrize("group", [32, 64, 128, None])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(group, symmetric, act_order):
    k, n = 256, 64
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    x_cal, x_test = _inputs(2048, k, seed=2), _inputs(512, k, seed=3)
    h = 2 * x_cal.t() @ x_cal / x_cal.shape[0]
    scheme = Scheme(group_size=group, symmetric=symmetric)
    gptq = _output_error(gptq_quantize_weight(w, h, scheme, act_order=act_order), w, x_test)
    rtn = _output_error(quantize_weight_int4(w, scheme), w, x_test)
    # Measured: 0.37-0.41 x RTN's error (0.18-0.20 with act-order); without the error
    # propagation across blocks it would be ~0.6.
    bound = 0.3 if act_order else 0.5
    assert gptq < bound * rtn, f"GPTQ {gptq:.4f} vs RTN {rtn:.4f}"


def test_gptq_layout_matches_rtn_and_dead_inputs():
    w = torch.randn(32, 128)
    h = torch.eye(128)
    h[5, 5] = 0  # an input that is never active
    p = gptq_quantize_weight(w.half(), h, Scheme(group_size=64))
    assert (
        p.qweight.shape == (16, 32)
        and p.scales.shape == (2, 32)
        and p.scales.dtype == torch.float16
    )
    with pytest.raises(ValueError, match="Hessian \\(64, 64\\) does not match K=128"):
        gptq_quantize_weight(w, torch.eye(64), Scheme(group_size=64))


def test_collect_input_hessians_matches_definition():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    batches = [torch.randn(5, 16), torch.randn(3, 16)]
    hs = collect_input_hessians(model, batches, progress=False)
    x0 = torch.cat(batches)
    torch.testing.assert_close(hs["0"], 2 * x0.t() @ x0 / 8)
    x2 = torch.relu(model[0](x0))
    torch.testing.assert_close(hs["2"], 2 * x2.t() @ x2 / 8)
    assert not any(h._forward_hooks for h in model.modules())  # hooks removed


def test_quantize_with_gptq_quantizer_lowers_model_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128))
    cal = [_inputs(256, 128, seed=s) for s in range(4)]
    test = _inputs(256, 128, seed=9)
    with torch.no_grad():
        ref = model(test)
    config = QuantConfig(Scheme(group_size=32))
    errors = {}
    for method in ("rtn", "gptq"):
        m = copy.deepcopy(model)
        quantizer = (
            gptq_quantizer(collect_input_hessians(m, cal, progress=False))
            if method == "gptq"
            else None
        )
        report = qcompile.quantize_(m, config, quantizer=quantizer)
        assert len(report.by_status("quantized")) == 2
        with torch.no_grad():
            errors[method] = ((m(test) - ref).norm() / ref.norm()).item()
    assert errors["gptq"] < 0.9 * errors["rtn"], errors


# --------------------------------------------------------------------------- W4A8 (QoQ grid)
def _hessian_error(packed: PackedW4A8, weight: torch.Tensor, h: torch.Tensor) -> float:
    """tr(dW H dW^T): the output error GPTQ minimizes (||X dW^T||^2 up to 2 / rows)."""
    d = dequantize_w4a8(packed, torch.float64) - weight.double()
    return ((d @ h.double()) * d).sum().item()


def _assert_valid_w4a8(p: PackedW4A8, n: int, k: int) -> None:
    """RTN's layout and ranges: codes 0..15, s2 integers 1..16, z 0..15, |(q - z) s2| <= 127."""
    g = p.group_size
    assert p.qweight.shape == (k // 8, n) and p.qweight.dtype == torch.int32
    assert p.group_scales.shape == p.group_zeros.shape == (k // g, n)
    assert p.group_scales.dtype == p.group_zeros.dtype == torch.uint8
    assert p.channel_scales.shape == (n,) and p.channel_scales.dtype == torch.float32
    assert all(t.is_contiguous() for t in p.tensors())
    assert p.group_scales.min() >= 1 and p.group_scales.max() <= 16
    assert p.group_zeros.max() <= 15 and unpack_int4_along_k(p.qweight).max() <= 15
    assert int8_weight(p.qweight, p.group_scales, p.group_zeros, g).abs().max() <= 127


@pytest.mark.parametrize("group", [32, 64, None])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("clip_search", [False, True])
def test_w4a8_identity_hessian_gives_rtn_exactly(group, act_order, clip_search):
    """Nothing to compensate: every code, s2, z and s1 is RTN's (with the same clip search)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 256, generator=gen)
    w.view(-1)[torch.randint(0, w.numel(), (40,), generator=gen)] *= 20  # outliers
    scheme = Scheme(name="w4a8", group_size=group)
    g = gptq_quantize_weight(w, torch.eye(256), scheme, damp=0.0, act_order=act_order,
                             clip_search=clip_search)  # fmt: skip
    r = quantize_weight_w4a8(w, scheme, clip_search=clip_search)
    assert g.group_size == r.group_size
    for got, want in zip(g.tensors(), r.tensors(), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("group", [32, 64, 128, None])
@pytest.mark.parametrize("act_order", [False, True])
def test_w4a8_gptq_beats_rtn_on_correlated_inputs(group, act_order):
    k, n = 256, 64
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    x = _inputs(2048, k, seed=2)
    h = 2 * x.t() @ x / x.shape[0]
    scheme = Scheme(name="w4a8", group_size=group)
    p = gptq_quantize_weight(w, h, scheme, act_order=act_order)
    _assert_valid_w4a8(p, n, k)
    assert torch.equal(p.channel_scales, quantize_weight_w4a8(w, scheme).channel_scales)
    gptq = _hessian_error(p, w, h)
    rtn = _hessian_error(quantize_weight_w4a8(w, scheme), w, h)
    # Measured: 0.14-0.17 x RTN's error, 0.035-0.037 x with act-order.
    bound = 0.06 if act_order else 0.25
    assert gptq < bound * rtn, f"GPTQ {gptq:.4g} vs RTN {rtn:.4g}"
    # ... and on held-out inputs of the same distribution, relative output error
    x_test = _inputs(512, k, seed=3)
    held_out = {
        name: ((x_test @ (w - dequantize_w4a8(q)).t()).norm() / (x_test @ w.t()).norm()).item()
        for name, q in (("gptq", p), ("rtn", quantize_weight_w4a8(w, scheme)))
    }
    assert held_out["gptq"] < 0.5 * held_out["rtn"], held_out


def _objective_ratio(problem: HessianProblem, name: str, act_order: bool, clip: bool) -> float:
    """GPTQ's tr(dW H dW^T) over RTN's on the same grid (with the same clip search)."""
    w, h = problem.weight, problem.hessian
    n, k = w.shape
    scheme = Scheme(name=name, group_size=problem.group)
    p = gptq_quantize_weight(w, h, scheme, act_order=act_order, clip_search=clip)
    if name == "w4a8":
        _assert_valid_w4a8(p, n, k)
        rtn = quantize_weight_w4a8(w, scheme, clip_search=clip)
        dequant = dequantize_w4a8
    else:
        rtn = quantize_weight_int4(w, scheme, clip_search=clip)
        dequant = dequantize_int4

    def error(packed) -> float:
        d = dequant(packed, torch.float64) - w.double()
        return ((d @ h.double()) * d).sum().item()

    return error(p) / max(error(rtn), 1e-12)


@settings(max_examples=40, deadline=None)
@given(
    problem=hessian_problems(),
    name=st.sampled_from(["w4a8", "w4a16"]),
    clip_search=st.booleans(),
)
def test_gptq_with_act_order_never_worse_than_rtn_on_its_objective(
    problem: HessianProblem, name, clip_search
):
    """With act-order, GPTQ's tr(dW H dW^T) on the Hessian it was given does not exceed RTN's
    on the same grid: not a theorem (GPTQ is greedy), but in 120 seeded draws of these
    problems the worst ratio was 0.47 (W4A8) / 0.31 (W4A16). Outlier channels, singular
    Hessians (rows < K) and dead inputs included."""
    assert _objective_ratio(problem, name, True, clip_search) <= 1 + 1e-3


@pytest.mark.parametrize("name", ["w4a8", "w4a16"])
def test_gptq_without_act_order_beats_rtn_on_almost_every_problem(name):
    """Without act-order, greedy column order can lose to RTN on an ill-conditioned Hessian
    with outliers (in 400 draws the worst case was 2.3x RTN's error: one row, 20x outlier
    inputs); on 40 seeded problems it must still win on at least 36 with a median ratio
    under 0.3 (measured: wins on 99% of 120 draws, median 0.14-0.15)."""
    rng = random.Random(7)
    ratios = []
    for seed in range(40):
        group = rng.choice([32, 64])
        k = group * rng.randint(1, 3)
        problem = make_hessian_problem(
            rng.choice([1, 8, 24]), group, k, rng.choice([k // 2, 2 * k, 8 * k]), seed,
            rng.random() < 0.5, rng.choice([1, 20]), rng.random() < 0.5,
        )  # fmt: skip
        ratios.append(_objective_ratio(problem, name, False, False))
    assert sum(r < 1 for r in ratios) >= 36, sorted(ratios)[-5:]
    assert statistics.median(ratios) < 0.3, statistics.median(ratios)


def test_w4a8_gptq_round_trips_through_dequantize_and_the_reference_op():
    k, n = 128, 40
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(n, k, generator=gen)
    h = 2 * _inputs(1024, k, seed=5).t() @ _inputs(1024, k, seed=5) / 1024
    h[3, :] = h[:, 3] = 0  # a dead input: its weight column is quantized as 0
    p = gptq_quantize_weight(w, h, Scheme(name="w4a8", group_size=32), act_order=True)
    _assert_valid_w4a8(p, n, k)
    w_q = dequantize_w4a8(p, torch.float64)
    assert (w_q[:, 3] == 0).all()
    s1 = p.channel_scales.double()[:, None]
    w8 = int8_weight(p.qweight, p.group_scales, p.group_zeros, p.group_size)
    torch.testing.assert_close(w_q, w8.double() * s1, rtol=0, atol=0)
    x, bias = torch.randn(7, k, generator=gen), torch.randn(n, generator=gen)
    out = torch.ops.qcompile.w4a8_linear(x, *p.tensors(), bias, p.group_size, "int8")
    xq = dequantize_activations(*quantize_activations_per_token(x, "int8"))
    assert_close_rel(out, xq @ w_q.t() + bias.double(), torch.float32)
    # the module `quantize_` swaps in takes the pack unchanged
    linear = nn.Linear(k, n)
    q = qcompile.W4A8Linear.from_linear(linear, Scheme(name="w4a8", group_size=32), p)
    assert_close_rel(q(x), xq @ w_q.t() + linear.bias.double(), torch.float32)


def test_w4a8_gptq_checks_the_shape():
    with pytest.raises(ValueError, match="K=36 is not divisible by group_size=36 and 8"):
        gptq_quantize_weight(
            torch.randn(4, 36), torch.eye(36), Scheme(name="w4a8", group_size=None)
        )


def test_w4a8_gptq_quantizer_swaps_in_w4a8_linears():
    """`quantize_` with `gptq_quantizer`: W4A8Linear holding GPTQ's codes where a Hessian
    exists, RTN's where none does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128))
    cal = [_inputs(256, 128, seed=s) for s in range(4)]
    scheme = Scheme(name="w4a8", group_size=32)
    hessians = collect_input_hessians(model, cal, progress=False)
    m = copy.deepcopy(model)
    report = qcompile.quantize_(
        m, QuantConfig(scheme), quantizer=gptq_quantizer({"0": hessians["0"]}, act_order=True)
    )
    assert len(report.by_status("quantized")) == 2
    assert all(isinstance(m[i], qcompile.W4A8Linear) for i in (0, 2))
    expected = gptq_quantize_weight(model[0].weight, hessians["0"], scheme, act_order=True)
    assert torch.equal(m[0].qweight, expected.qweight)
    assert torch.equal(m[2].qweight, quantize_weight_w4a8(model[2].weight, scheme).qweight)
