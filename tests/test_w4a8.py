"""W4A8: QoQ numerics vs float64, the ops, the Triton kernels (interpreter on CPU, natively on
a GPU) held bit-exact on the integer accumulator, and the pass on a tiny transformers Llama."""

from __future__ import annotations

import copy
import dataclasses

import helpers
import pytest
import torch
from conftest import KERNEL_DEVICE
from helpers import assert_close_rel, record_row_chunks, rel_error, tune_with_default
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from strategies import W4A8Problem, w4a8_problems

import qcompile
from qcompile import QuantConfig, Scheme
from qcompile.backend import _fresh_graph_module
from qcompile.lowering.autotune import KernelConfig, TuneKey
from qcompile.lowering.w4a8 import (
    candidate_configs,
    default_config,
    launch,
    quantize_and_launch,
    quantize_per_token,
    tune_key,
    valid_config,
)
from qcompile.ops.w4a8 import w4a8_accumulator_reference
from qcompile.passes.linear import (
    W4A8_OP,
    W4A8_QUANTIZED_ACT_OP,
    GraphConstants,
    rewrite_linears,
    unsupported_reason,
)
from qcompile.quant.gptq import gptq_quantize_weight
from qcompile.quant.int4 import to_even_odd, to_planes
from qcompile.quant.w4a8 import (
    ABSMAX_FLOOR,
    CHANNEL_STRETCH,
    PackedW4A8,
    dequantize_w4a8,
    int8_weight,
    quantize_activations_per_token,
    quantize_weight_w4a8,
)
from qcompile.report import CompileReport

OP = torch.ops.qcompile.w4a8_linear
QOP = torch.ops.qcompile.w4a8_linear_quantized_act
W4A8 = Scheme(name="w4a8", group_size=32)
SETTINGS = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _packed(n=32, k=64, g=32, seed=1) -> PackedW4A8:
    gen = torch.Generator().manual_seed(seed)
    return quantize_weight_w4a8(torch.randn(n, k, generator=gen), Scheme(name="w4a8", group_size=g))


# --------------------------------------------------------------------------- numerics
@settings(max_examples=30, deadline=None)
@given(
    n=st.sampled_from([1, 8, 24]),
    groups=st.integers(1, 3),
    group=st.sampled_from([32, 64, None]),
    outliers=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_progressive_quantization_stays_in_int8_and_within_half_steps(
    n, groups, group, outliers, seed
):
    """QoQ's protective range: every (q - z) * s2 fits int8; each level errs by half a step."""
    k = (group or 64) * groups
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    if outliers:
        w.view(-1)[torch.randint(0, n * k, (max(1, n * k // 50),), generator=gen)] *= 100
    w[0, : k // 2] = 0  # a half-zero row (a one-sided group when G <= K / 2)
    p = quantize_weight_w4a8(w, Scheme(name="w4a8", group_size=group))
    g = p.group_size
    w8q = int8_weight(p.qweight, p.group_scales, p.group_zeros, g)
    assert w8q.abs().max() <= 127
    assert p.group_scales.min() >= 1 and p.group_scales.max() <= 16
    assert p.group_zeros.max() <= 15
    s1 = p.channel_scales.double()
    assert torch.allclose(s1, w.abs().amax(1).float().double() / 119, rtol=1e-6)
    s2 = p.group_scales.double().t().repeat_interleave(g, dim=1)
    # |w / s1 - w8'| <= 1/2 (level 1) + s2/2 (level 2), in float64
    err = (w / s1[:, None] - w8q.double()).abs()
    assert (err <= 0.5 + s2 / 2 + 1e-6).all()
    torch.testing.assert_close(
        dequantize_w4a8(p, torch.float64), w8q.double() * s1[:, None], rtol=0, atol=0
    )


def test_layout_on_a_hand_written_group():
    """One group: s1 = 1 (max 119), lo/hi = -119/119 -> s2 = ceil(238/15) = 16, z = 7."""
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1] = 119.0, -119.0
    p = quantize_weight_w4a8(w, W4A8)
    assert p.channel_scales.tolist() == [1.0]
    assert p.group_scales.tolist() == [[16]] and p.group_zeros.tolist() == [[7]]
    # codes k=0..7: round(119/16)+7 = 14, round(-119/16)+7 = 0, zeros -> 7; low nibble first
    assert p.qweight[0, 0].item() == 0x7777770E
    assert int8_weight(p.qweight, p.group_scales, p.group_zeros, 32)[0, :3].tolist() == [
        112,
        -112,
        0,
    ]


def test_all_zero_weight_is_exact():
    p = quantize_weight_w4a8(torch.zeros(4, 64), W4A8)
    assert (dequantize_w4a8(p) == 0).all() and torch.isfinite(p.channel_scales).all()


@pytest.mark.parametrize("act_dtype", ["int8", "float8_e4m3fn"])
def test_activation_quantization_per_token(act_dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 96, generator=gen).half()
    x[1, 7] = 300.0  # an outlier only widens its own token's scale
    x[2] = 0  # an all-zero token
    xq, scale = quantize_activations_per_token(x, act_dtype)
    qmax = 127.0 if act_dtype == "int8" else 448.0
    assert xq.dtype == (torch.int8 if act_dtype == "int8" else torch.float8_e4m3fn)
    absmax = x.float().abs().amax(1)
    assert torch.equal(scale, absmax.clamp_min(ABSMAX_FLOOR) / qmax)
    assert (xq.float().abs().amax(1)[[0, 1, 3]] == qmax).all() and (xq[2].float() == 0).all()
    deq = xq.double() * scale.double()[:, None]
    step = scale.double()[:, None] * (1.0 if act_dtype == "int8" else 32.0)  # e4m3: 2**5 near 448
    assert ((deq - x.double()).abs() <= step / 2 + 1e-12).all()


@settings(max_examples=25, deadline=None)
@given(problem=w4a8_problems())
def test_reference_op_is_the_exact_integer_math(problem: W4A8Problem):
    """The op (CPU reference) equals acc * x_scale * s1 (+ bias) in float64, rounded once."""
    p = problem.packed
    out = OP(problem.x, *p.tensors(), problem.bias, p.group_size, problem.act_dtype)
    assert torch.equal(out, problem.reference64().to(problem.dtype))
    xq, xs = problem.quantized_x()
    acc = w4a8_accumulator_reference(xq, p.qweight, p.group_scales, p.group_zeros, p.group_size)
    assert torch.equal(acc, problem.accumulator64())
    ulp = 1.0 if problem.act_dtype == "int8" else 2.0**-9  # e4m3's smallest subnormal step
    assert torch.equal(acc / ulp, (acc / ulp).round())  # exact: far below 2**53 ulps
    if problem.act_dtype == "int8":
        assert acc.abs().max() <= 127 * 127 * xq.shape[1]


@pytest.mark.parametrize("act_dtype", ["int8", "float8_e4m3fn"])
def test_w4a8_error_is_quantization_sized(act_dtype):
    gen = torch.Generator().manual_seed(3)
    w, x = torch.randn(64, 256, generator=gen), torch.randn(8, 256, generator=gen)
    p = quantize_weight_w4a8(w, Scheme(name="w4a8", group_size=64))
    out = OP(x, *p.tensors(), None, 64, act_dtype)
    err = rel_error(out, x.double() @ w.double().t())
    assert 1e-3 < err < 0.12, err


def test_three_d_input_fake_impl_and_opcheck():
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = _packed()
    x = torch.randn(2, 3, 64)
    out = OP(x, *p.tensors(), None, 32, "int8")
    assert out.shape == (2, 3, 32)
    assert torch.equal(out[1], OP(x[1], *p.tensors(), None, 32, "int8"))
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        ft = [mode.from_tensor(t) for t in p.tensors()]
        assert OP(fx, *ft, None, 32, "int8").shape == (2, 3, 32)
        xq, xs = quantize_activations_per_token(fx, "int8")
        fake = QOP(xq, xs, *ft, None, 32, torch.bfloat16)
        assert fake.shape == (2, 3, 32) and fake.dtype == torch.bfloat16
    bias = torch.randn(32)
    torch.library.opcheck(OP.default, (x, *p.tensors(), bias, 32, "float8_e4m3fn"))
    xq, xs = quantize_activations_per_token(x, "int8")
    torch.library.opcheck(QOP.default, (xq, xs, *p.tensors(), None, 32, torch.float32))


def test_backward_is_straight_through_for_x():
    p = _packed()
    x = torch.randn(3, 64, requires_grad=True)
    g = torch.randn(3, 32)
    OP(x, *p.tensors(), None, 32, "int8").backward(g)
    torch.testing.assert_close(x.grad, g @ dequantize_w4a8(p))


def _bad(change):
    p = _packed()
    args = [torch.randn(4, 64), *p.tensors(), None, 32, "int8"]
    change(args)
    return args


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: a.__setitem__(0, a[0].to(torch.int8)), "x must be float16/bfloat16/float32"),
        (lambda a: a.__setitem__(0, a[0][:, :-8]), "qweight must be"),
        (lambda a: a.__setitem__(2, a[2].int()), r"group_scales must be \[K/group_size, N\]"),
        (lambda a: a.__setitem__(3, a[3][:1]), "group_zeros must be"),
        (lambda a: a.__setitem__(4, a[4].half()), "channel_scales must be"),
        (lambda a: a.__setitem__(1, a[1].t().contiguous().t()), "qweight must be contiguous"),
        (lambda a: a.__setitem__(5, torch.randn(31)), "bias must be"),
        (lambda a: a.__setitem__(6, 48), "K=64 is not divisible by group_size=48"),
        (lambda a: a.__setitem__(7, "int4"), "act_dtype='int4' is not supported"),
    ],
)
def test_bad_arguments_name_the_problem(change, match):
    with pytest.raises(ValueError, match=match):
        OP(*_bad(change))


def test_quantized_act_op_checks_its_activations():
    p = _packed()
    xq, xs = quantize_activations_per_token(torch.randn(4, 64), "int8")
    with pytest.raises(ValueError, match="xq must be int8 or float8_e4m3fn"):
        QOP(xq.float(), xs, *p.tensors(), None, 32, torch.float16)
    with pytest.raises(ValueError, match=r"x_scale must be float32 of shape xq.shape\[:-1\]"):
        QOP(xq, xs[:2], *p.tensors(), None, 32, torch.float16)
    with pytest.raises(ValueError, match="K=96 is not divisible by group_size=64"):
        quantize_weight_w4a8(torch.randn(8, 96), Scheme(name="w4a8", group_size=64))


# --------------------------------------------------------------------------- kernels
def _on_device(*tensors):
    return [t.to(KERNEL_DEVICE) if isinstance(t, torch.Tensor) else t for t in tensors]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.sampled_from([1, 3]),
    k=st.sampled_from([64, 256, 320]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    act_dtype=st.sampled_from(["int8", "float8_e4m3fn"]),
    order=st.sampled_from(["natural", "planes", "even_odd"]),
    strided=st.booleans(),
    one_pass=st.sampled_from([None, True, False, 4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantize_kernel_is_bit_exact(m, k, dtype, act_dtype, order, strided, one_pass, seed):
    """The eager path's Triton kernel agrees with the torch formula the compiled path uses,
    with the row read twice (two loops), held in registers (one pass), or held by 4 programs
    that each round a quarter of it (one pass, 4 slices)."""
    slices = 1
    if one_pass == 4:
        one_pass, slices = True, 4
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(k, m, generator=gen) * torch.rand(k, 1, generator=gen) * 30).t()
    x[0] = 0
    x = x.to(dtype)
    if not strided:
        x = x.contiguous()
    planes_bk = 64 if order == "planes" and k % 64 == 0 else 0
    even_odd_bk = 64 if order == "even_odd" and k % 64 == 0 else 0
    xq, scale = quantize_per_token(
        *_on_device(x), act_dtype, planes_bk, even_odd_bk, one_pass, slices
    )
    ref_q, ref_s = quantize_activations_per_token(x, act_dtype)
    if planes_bk:
        ref_q = to_planes(ref_q.view(torch.uint8), planes_bk).view(ref_q.dtype)
    if even_odd_bk:
        ref_q = to_even_odd(ref_q.view(torch.uint8), even_odd_bk).view(ref_q.dtype)
    assert torch.equal(xq.cpu().view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(scale.cpu(), ref_s)


@pytest.mark.parametrize("act_dtype", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize(("k", "slices"), [(320, 4), (256, 8), (64, 2)])
def test_quantize_kernel_slices_agree_with_one_program_per_row(act_dtype, k, slices):
    """Rows split over several programs (each takes the absmax, rounds its slice): the same
    bytes and scales as one program per row, in natural and even/odd order, K not a power of
    two included; bad slice counts are refused."""
    gen = torch.Generator().manual_seed(k * slices)
    x = (torch.randn(3, k, generator=gen) * 20).to(torch.float16)
    x[1, 5] = 900.0  # an outlier sets the row's scale
    for order in (0, 64 if k % 64 == 0 else 0):
        one = quantize_per_token(*_on_device(x), act_dtype, 0, order, True)
        split = quantize_per_token(*_on_device(x), act_dtype, 0, order, True, slices)
        assert torch.equal(split[0].view(torch.uint8), one[0].view(torch.uint8))
        assert torch.equal(split[1], one[1])
    with pytest.raises(ValueError, match="slices=3 needs one_pass and a power of two"):
        quantize_per_token(*_on_device(x), act_dtype, 0, 0, True, 3)
    with pytest.raises(ValueError, match="needs one_pass"):
        quantize_per_token(*_on_device(x), act_dtype, 0, 0, False, 2)


def test_quantize_kernel_rounds_e4m3_ties_to_even():
    """Values that sit exactly between two e4m3 numbers (absmax 448 makes the multiplier 1)."""
    ties = [25.0, 27.0, -25.0, 272.0, 304.0, 3.5 * 2**-9, 2.5 * 2**-9, 13.0, 0.0, -(2**-12)]
    x = torch.tensor([[448.0, *ties]], dtype=torch.float16).repeat(2, 1)
    x = torch.cat([x, torch.zeros(2, 64 - x.shape[1], dtype=torch.float16)], dim=1)
    xq, _ = quantize_per_token(*_on_device(x), "float8_e4m3fn")
    expected = x.float().to(torch.float8_e4m3fn)  # torch's cast rounds to nearest even
    assert torch.equal(xq.cpu().view(torch.uint8), expected.view(torch.uint8))
    assert xq.cpu().float()[0, 1:5].tolist() == [24.0, 28.0, -24.0, 256.0]


def _check_config(problem: W4A8Problem, cfg: KernelConfig) -> None:
    p = problem.packed
    xq, xs = _on_device(*problem.quantized_x())
    args = (xq, xs, *p.tensors(), problem.bias, p.group_size, problem.dtype)
    raw = cfg.kernel not in ("fp8_mm", "mma_f16")
    acc = launch(cfg, *args, accumulator=True).cpu().double() if raw else None
    if acc is None:  # these rescale inside (cuBLASLt, the epilogue): only the output is checked
        pass
    elif problem.act_dtype == "int8":  # the integer part is exact
        assert torch.equal(acc, problem.accumulator64())
    else:  # fp8 products are exact; the sums round. Hopper's fp8 MMA keeps fewer accumulator
        # bits than fp32 inside one dot (Triton leaves sm_90 fp8 dots in that fast mode):
        # measured 2.2e-5 on the H100, far below fp8's own ~6% quantization step.
        tol = 1e-4 if KERNEL_DEVICE == "cuda" else 1e-6
        assert_close_rel(acc, problem.accumulator64(), torch.float32, tol=tol)
    m, n = xq.shape[0], p.shape[0]
    out = torch.full((m, n), float("nan"), dtype=problem.dtype, device=KERNEL_DEVICE)  # poison
    assert_close_rel(launch(cfg, *args, out=out), problem.reference64(), problem.dtype)


@SETTINGS
@given(problem=w4a8_problems(device=KERNEL_DEVICE), data=st.data())
def test_every_candidate_config_is_exact_on_the_accumulator(problem, data):
    """Any config autotuning may pick (GEMV, GEMM, planes, split-K, BLOCK_K vs group)."""
    m, k = problem.x.shape
    p = problem.packed
    configs = candidate_configs(m, p.shape[0], k, p.group_size, problem.act_dtype)
    assert configs, f"no valid config for M={m} K={k} G={p.group_size} {problem.act_dtype}"
    _check_config(problem, data.draw(st.sampled_from(configs), label="config"))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=w4a8_problems(device=KERNEL_DEVICE))
def test_default_config_is_exact(problem):
    """The untuned config (CUDA-graph capture, QCOMPILE_AUTOTUNE=0) fits every shape."""
    m, k = problem.x.shape
    p = problem.packed
    _check_config(problem, default_config(m, p.shape[0], k, p.group_size, problem.act_dtype))


@pytest.mark.parametrize(
    ("cfg", "act_dtype"),
    [
        (KernelConfig("gemv", 1, 32, 64, 2, 2, 1), "int8"),
        (KernelConfig("gemv", 1, 32, 256, 1, 2, 1), "int8"),  # BLOCK_K > group: row scales
        (KernelConfig("gemv", 1, 32, 64, 1, 2, 1), "float8_e4m3fn"),
        (KernelConfig("gemm", 16, 32, 64, 2, 4, 2), "int8"),
        (KernelConfig("gemm", 16, 32, 256, 1, 4, 2), "int8"),  # BLOCK_K > group: column scales
        (KernelConfig("gemm", 16, 32, 64, 2, 4, 2), "float8_e4m3fn"),
        (KernelConfig("gemm_planes", 16, 32, 256, 2, 4, 2), "int8"),  # row scales
        (KernelConfig("gemm_planes", 64, 32, 256, 2, 4, 2), "int8"),  # large-M candidate shape
        (KernelConfig("gemm_swar", 16, 32, 64, 1, 4, 2), "int8"),
        (KernelConfig("gemm_swar", 64, 32, 128, 2, 4, 2, True), "int8"),  # row scales, split
        (KernelConfig("mma", 8, 32, 64, 1, 1, 1), "int8"),  # lane MMA, one B tile
        (KernelConfig("mma", 32, 64, 128, 2, 2, 1), "int8"),  # 4 B tiles, groups per step, split
        (KernelConfig("int_mm", 0, 32, 128, 1, 4, 1), "int8"),  # unpack + torch._int_mm
    ],
    ids=lambda v: v if isinstance(v, str) else f"{v.kernel}-bk{v.block_k}-sk{v.split_k}",
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_each_kernel_kind_with_bias_through_the_eager_path(cfg, act_dtype, dtype):
    """quantize_and_launch is what the CUDA op runs: quantize kernel (plane-major for the
    planes kernel), GEMM, split-K epilogue with bias."""
    gen = torch.Generator().manual_seed(7)
    if cfg.kernel == "mma":
        m, n = cfg.block_m - 3, 40  # rows past M read row M - 1 and are not stored
    else:
        m, n = (2 if cfg.kernel == "gemv" else 130 if cfg.block_m == 64 else 19), 40
    k = 512 if cfg.kernel == "gemm_planes" else 256
    w = torch.randn(n, k, generator=gen)
    p = quantize_weight_w4a8(w, Scheme(name="w4a8", group_size=64))
    p = PackedW4A8(*_on_device(*p.tensors()), p.group_size)
    x = (torch.randn(m, k, generator=gen) * 4).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    problem = W4A8Problem(x, w, p, bias, dtype, act_dtype)
    assert valid_config(cfg, n, k, 64, act_dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=KERNEL_DEVICE)
    got = quantize_and_launch(cfg, *_on_device(x), *p.tensors(), *_on_device(bias), 64, act_dtype, out=out)  # fmt: skip
    assert_close_rel(got, problem.reference64(), dtype)


def _pow2(v):
    return v > 0 and v & (v - 1) == 0


@pytest.mark.parametrize("act_dtype", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize(
    ("m", "n", "k", "g"),
    [(1, 28672, 4096, 128), (16, 8192, 28672, 128), (256, 4096, 14336, 64), (1024, 512, 4096, 4096), (3, 96, 96, 32), (16, 64, 32, 32)],
)  # fmt: skip
def test_configs_have_power_of_two_tiles_aligned_to_groups(m, n, k, g, act_dtype):
    """Triton needs power-of-two ranges and 8-bit dots need K tiles >= 32; the interpreter
    checks neither, so this must."""
    candidates = candidate_configs(m, n, k, g, act_dtype)
    assert candidates, "every shape the pass lets through needs a candidate"
    for cfg in [*candidates, default_config(m, n, k, g, act_dtype)]:
        assert cfg.kernel == "int_mm" or _pow2(cfg.block_m), cfg  # int_mm: no M tile
        assert _pow2(cfg.block_n) and _pow2(cfg.block_k), cfg
        assert k % cfg.split_k == 0 and (k // cfg.split_k) % cfg.block_k == 0, cfg
        assert g % cfg.block_k == 0 or cfg.block_k % g == 0, cfg
        lane = cfg.kernel in ("mma", "mma_f16")  # B tiles of 8 rows, 32 columns per warp
        assert cfg.block_k >= 32 and (
            cfg.kernel in ("gemv", "int_mm") or lane or min(cfg.block_m, cfg.block_n) >= 16
        )
        assert not lane or m <= cfg.block_m and cfg.block_n == 32 * cfg.num_warps
        if act_dtype != "int8":
            assert cfg.kernel in ("gemv", "gemm", "mma_f16", "fp8_mm"), cfg
            assert cfg.kernel == "mma_f16" or g % cfg.block_k == 0, cfg  # one s2 per tile
        assert cfg.kernel != "gemv" or m <= 8
    assert not valid_config(KernelConfig("gemm", 16, 48, 64), n, k, g, act_dtype)


def test_tune_key_has_its_own_family():
    key = tune_key(5, 4096, 14336, 128, "int8", torch.bfloat16)
    assert key == TuneKey("w4a8", 8, 4096, 14336, 128, "int8:bfloat16")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_model_cast_moves_channel_scales_without_rounding_them(dtype):
    """`model.to(dtype)` after `quantize_`: channel_scales stay float32 (the layout's contract,
    which the op checks), the integer tensors are untouched, and the cast model's logits are
    the float32 model's to within the activation dtype."""
    model = helpers.tiny_llama(num_layers=1)
    qcompile.quantize_(model, QuantConfig(Scheme(name="w4a8", group_size=32)))
    down = model.model.layers[0].mlp.down_proj
    before = {name: b.clone() for name, b in down.named_buffers()}
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        model.to(dtype)
        out = model(ids).logits
    assert down.channel_scales.dtype == torch.float32
    for name, b in down.named_buffers():
        assert torch.equal(b, before[name]), name
    assert_close_rel(out.float(), ref, dtype, tol=3e-2)


# --------------------------------------------------------------------------- the pass
@pytest.fixture(scope="module")
def tiny_llama():
    return helpers.tiny_llama(num_layers=1)


def _rewrite_only(config: QuantConfig):
    """A backend that runs the qcompile pass and then the rewritten graph as is (no Inductor):
    the graph and its numerics without compile time."""
    report, graphs = CompileReport(), []

    def backend(gm, example_inputs):
        new = _fresh_graph_module(gm)
        constants = GraphConstants()
        rewrite_linears(new, list(example_inputs), config, report, constants)
        graphs.append(new)
        return lambda *args: new(*args, *constants.tensors)

    return backend, report, graphs


def _ids(seed=0):
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(seed))


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def test_pass_quantizes_each_input_once_and_reports_fusion(tiny_llama):
    config = QuantConfig(W4A8)
    backend, report, graphs = _rewrite_only(config)
    with torch.no_grad():
        out = torch.compile(tiny_llama, backend=backend)(_ids()).logits
        ref = tiny_llama(_ids()).logits
        eager = copy.deepcopy(tiny_llama)
        qcompile.quantize_(eager, config)
        assert isinstance(eager.model.layers[0].mlp.down_proj, qcompile.W4A8Linear)
        eager_out = eager(_ids()).logits
    gm = graphs[-1]
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert sum(n.target is W4A8_QUANTIZED_ACT_OP for n in calls) == 7
    assert not [n for n in calls if n.target is W4A8_OP]
    # one quantization per distinct input: q/k/v share one, gate/up share one
    quantizations = [n for n in calls if n.target is quantize_activations_per_token]
    assert len(quantizations) == 4
    by_name = {r.name: r for r in report.records}
    assert by_name["lm_head"].status == "skipped"
    fusion = {name.rpartition(".")[2]: r.fusion for name, r in by_name.items() if ".0." in name}
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert fusion[proj] == "fused into mul of model.layers.0.input_layernorm (LlamaRMSNorm)"
    assert fusion["gate_proj"].startswith(
        "fused into mul of model.layers.0.post_attention_layernorm"
    )
    assert fusion["down_proj"] == "fused into mul of model.layers.0.mlp (LlamaMLP)"
    assert fusion["o_proj"].startswith("not fused: producer scaled_dot_product_attention")
    assert "fused into its producer for 6/7" in report.summary()
    assert "w4a8 int4 (QoQ progressive) g32, int8 per-token activations" in str(report)
    assert_close_rel(out, eager_out, torch.float32)  # pass == quantize_ + eager op
    err = rel_error(out, ref)
    assert 1e-3 < err < 0.3, f"W4A8 logits error {err:.3g} outside the quantization range"


class _NormMLP(torch.nn.Module):
    """A Llama block's MLP half: RMSNorm -> gate/up -> SiLU * up -> down (transformers')."""

    def __init__(self, **overrides):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

        config = helpers.tiny_llama(num_layers=1, **overrides).config
        self.norm = LlamaRMSNorm(config.hidden_size)
        self.mlp = LlamaMLP(config)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


@pytest.mark.parametrize("hidden", [128, 80], ids=["whole-groups", "K-padded"])
def test_inductor_fuses_the_quantization_into_rmsnorm_and_silu_mul(hidden):
    """On CPU Inductor's C++ kernels: the RMSNorm kernel (sqrt) and the SiLU * up kernel (exp)
    also write the int8 activations; no kernel of its own quantizes. Hidden 80 at g32 with
    `pad_k` (gate/up K = 80 stored as 96): the zero padding joins the RMSNorm kernel too."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    scheme = dataclasses.replace(W4A8, pad_k=True)
    model = _NormMLP(hidden_size=hidden).eval()
    x = torch.randn(2, 5, model.norm.weight.shape[0])
    be = qcompile.backend(QuantConfig(scheme))
    with torch.no_grad():
        out, code = run_and_get_code(torch.compile(model, backend=be), x)
        ref = copy.deepcopy(model)
        qcompile.quantize_(ref, QuantConfig(scheme))
        assert_close_rel(out, ref(x), torch.float32, tol=1e-4)
    assert [r.fusion.split(" of ")[0] for r in be.report.records] == ["fused into mul"] * 3
    kernels = "\n".join(code).split("async_compile.cpp_pybinding(")[1:]
    quantizing = [kern for kern in kernels if "convert<int8_t>" in kern]
    assert len(quantizing) == 2  # one per distinct input: norm(x) for gate/up, silu * up
    assert sum("std::sqrt" in kern for kern in quantizing) == 1
    assert sum(".exp()" in kern for kern in quantizing) == 1


def test_autograd_on_keeps_the_float_op_and_its_backward(tiny_llama):
    backend, report, graphs = _rewrite_only(QuantConfig(W4A8))
    model = copy.deepcopy(tiny_llama)
    out = torch.compile(model, backend=backend)(_ids()).logits
    out.float().pow(2).mean().backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0  # straight through the op
    assert sum(n.target is W4A8_OP for n in graphs[-1].graph.nodes) == 7
    quantized = [r for r in report.records if r.status == "quantized"]
    assert all(r.fusion.startswith("not fused: autograd is on") for r in quantized)


def test_prequantized_layers_get_the_fused_form(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    qcompile.quantize_(model, QuantConfig(Scheme(name="w4a8", group_size=64)))
    backend, report, graphs = _rewrite_only(QuantConfig(W4A8))
    with torch.no_grad():
        eager = model(_ids()).logits
        compiled = torch.compile(model, backend=backend)(_ids()).logits
    assert [r.status for r in report.records].count("prequantized") == 7
    assert sum(n.target is W4A8_QUANTIZED_ACT_OP for n in graphs[-1].graph.nodes) == 7
    by_name = {r.name: r for r in report.records}
    assert (
        by_name["model.layers.0.self_attn.q_proj"].fusion
        == "fused into mul of model.layers.0.input_layernorm (LlamaRMSNorm)"
    )
    assert_close_rel(compiled, eager, torch.float32)


def test_unsupported_layers_fall_back_with_w4a8_reasons():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(80, 64)  # K=80: not divisible by 32
            self.b = torch.nn.Linear(64, 16)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    backend, report, _ = _rewrite_only(QuantConfig(W4A8, skip=()))
    with torch.no_grad():
        torch.compile(Net(), backend=backend)(torch.randn(3, 80))
    status = {r.name: (r.status, r.detail) for r in report.records}
    assert (
        status["a"][0] == "fallback" and "K=80 is not divisible by group_size=32" in status["a"][1]
    )
    assert status["b"][0] == "quantized"
    reason = unsupported_reason((64, 4096), torch.float32, "cuda", W4A8)
    assert "the W4A8 kernels take float16/bfloat16" in reason
    assert "no W4A8 kernel" in unsupported_reason((64, 4096), torch.float16, "mps", W4A8)


def test_w4a8_module_refuses_w4a16_codes():
    from qcompile.quant.rtn import quantize_weight_int4

    linear = torch.nn.Linear(64, 32)
    codes = quantize_weight_int4(linear.weight, Scheme(group_size=32))
    with pytest.raises(TypeError, match="W4A8 takes a PackedW4A8"):
        qcompile.W4A8Linear.from_linear(linear, W4A8, codes)


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("act_dtype", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("m", [1, 16, 256])
def test_gpu_op_matches_exact_reference(m, act_dtype):
    gen = torch.Generator().manual_seed(m)
    w = torch.randn(512, 1024, generator=gen)
    p = quantize_weight_w4a8(w, Scheme(name="w4a8", group_size=128))
    x = torch.randn(m, 1024, generator=gen).half()
    ref = OP(x, *p.tensors(), None, 128, act_dtype)
    out = OP(x.cuda(), *(t.cuda() for t in p.tensors()), None, 128, act_dtype)
    assert_close_rel(out, ref, torch.float16)
    xq, xs = quantize_activations_per_token(x.cuda(), act_dtype)
    cfg = default_config(m, 512, 1024, 128, act_dtype)
    if act_dtype == "int8":  # (FP8 at M = 256 is fp8_mm: cuBLASLt keeps no raw accumulator)
        acc = launch(cfg, xq, xs, *(t.cuda() for t in p.tensors()), None, 128, torch.float16, accumulator=True)  # fmt: skip
        acc_ref = w4a8_accumulator_reference(xq.cpu(), p.qweight, p.group_scales, p.group_zeros, 128)  # fmt: skip
        assert torch.equal(acc.cpu().double(), acc_ref)


@pytest.mark.gpu
def test_gpu_pdl_lane_kernel_equals_the_plain_launch_eagerly_and_in_a_cuda_graph():
    """Programmatic dependent launch (quantize kernel -> lane GEMM): the same bits as the
    plain launch, eagerly and replayed in a CUDA graph, with and without the prefetch, split
    K reduced in one launch or two."""
    gen = torch.Generator().manual_seed(5)
    n, k = 512, 4096
    p = quantize_weight_w4a8(torch.randn(n, k, generator=gen), Scheme(name="w4a8", group_size=128))
    w = tuple(t.cuda() for t in p.tensors())
    for m, cfg in (
        (1, KernelConfig("mma", 8, 128, 128, 8, 4, 1)),
        (1, KernelConfig("mma", 8, 128, 128, 8, 4, 1, True)),
        (16, KernelConfig("mma", 16, 64, 128, 4, 2, 1, True)),
        (16, KernelConfig("mma", 16, 128, 128, 8, 4, 1, True, "unroll8")),
    ):
        x = torch.randn(m, k, generator=gen).half().cuda()
        plain = quantize_and_launch(cfg, x, *w, None, 128, "int8")
        assert torch.equal(quantize_and_launch(cfg, x, *w, None, 128, "int8", pdl=True), plain)
        out = torch.empty_like(plain)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            quantize_and_launch(cfg, x, *w, None, 128, "int8", out=out, pdl=True)
        for _ in range(3):
            out.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, plain), cfg


@pytest.mark.gpu
def test_gpu_inductor_fuses_quantization_into_rmsnorm():
    from torch._inductor.utils import run_and_get_code

    model = helpers.tiny_llama(num_layers=1).half().cuda()
    be = qcompile.backend(QuantConfig(W4A8))
    with torch.no_grad():
        _, code = run_and_get_code(torch.compile(model, backend=be), _ids().cuda())
    kernels = "\n".join(code).split("@triton.jit")[1:]
    assert any("rsqrt" in kern and "tl.int8" in kern for kern in kernels)


@pytest.mark.gpu
def test_gpu_lane_atomic_reduction_under_cuda_graphs(monkeypatch):
    """16 rows on a long K: the default lane config sums split K by atomics into the
    workspace the op reserved while tracing; CUDA-graph replays (`reduce-overhead`) agree
    exactly and leave the workspace zeroed."""
    from qcompile.lowering import w4a8 as w4a8_mod

    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "0")
    assert default_config(16, 256, 4096, 32, "int8").reduce == "atomic"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4096, 256, bias=False)).half().cuda()
    x = torch.randn(16, 4096, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        eager = model(x).float()
        step = torch.compile(model, backend=qcompile.backend(QuantConfig(W4A8)), mode="reduce-overhead")  # fmt: skip
        outs = [step(x).clone() for _ in range(4)]  # warm-up, record, replays
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    assert int(w4a8_mod._atomic_workspaces[x.device].abs().sum()) == 0
    # int4 (RTN, g32, nn.Linear's uniform init) x int8 quantization error: 6.3% on the H100;
    # the sums themselves are held exact by the lane tests (`..._rearms_its_counters`)
    assert rel_error(outs[0].float(), eager) < 0.1


def test_large_m_candidates_include_the_planes_kernel():
    """Large M tries the planes kernel (W as wgmma's register operand) beside the natural GEMM."""
    cands = candidate_configs(1024, 8192, 28672, 128, "int8")
    assert {c.block_m for c in cands if c.kernel == "gemm_planes"} == {64, 128, 256}
    assert not any(
        c.kernel == "gemm_planes"
        for c in candidate_configs(1024, 8192, 28672, 128, "float8_e4m3fn")
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=w4a8_problems(device=KERNEL_DEVICE, max_m=70, act_dtypes=("int8",)), data=st.data())
def test_swar_gemm_is_exact_on_the_accumulator(problem, data):
    """The SWAR GEMM (4 codes per 32-bit op, xq in even/odd order): any M and N (partial
    tiles), BLOCK_K at, above or below the group, split or not, with the prefetch."""
    m, k = problem.x.shape
    g = problem.packed.group_size
    fits = [
        (bk, sk) for bk in (64, 128, 256) for sk in (1, 2)
        if valid_config(KernelConfig("gemm_swar", 16, 32, bk, sk, 4, 2), 64, k, g, "int8")
    ]  # fmt: skip
    assume(fits)  # K = 32: below the SWAR kernel's smallest BLOCK_K
    bk, split = data.draw(st.sampled_from(fits), label="block_k, split")
    bm = data.draw(st.sampled_from([16, 32, 64]), label="block_m")
    bn = data.draw(st.sampled_from([32, 64]), label="block_n")  # (16: refused, below)
    cfg = KernelConfig("gemm_swar", bm, bn, bk, split, 4, 2, data.draw(st.booleans()))
    _check_config(problem, cfg)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=w4a8_problems(device=KERNEL_DEVICE, max_m=64, act_dtypes=("int8",)), data=st.data())
def test_lane_mma_is_exact_on_the_accumulator(problem, data):
    """The int8 lane-MMA kernel (mma.sync m16n8k32 fed by SWAR-unpacked words): 8 to 64
    rows per program (rows past M read row M - 1 and are not stored), 1 to 4 warps, BLOCK_K
    at, above or below the group, split or not, the next BLOCK_K's loads issued ahead or
    not."""
    m, k = problem.x.shape
    g = problem.packed.group_size
    rows = data.draw(st.sampled_from([r for r in (8, 16, 32, 64) if r >= m]), label="rows")
    warps = data.draw(st.sampled_from([1, 2, 4]), label="warps")
    fits = [
        (bk, sk) for bk in (32, 64, 128) for sk in (1, 2)
        if valid_config(KernelConfig("mma", rows, 32 * warps, bk, sk, warps, 1), 64, k, g, "int8")
    ]  # fmt: skip
    assume(fits)
    bk, split = data.draw(st.sampled_from(fits), label="block_k, split")
    prefetch = data.draw(st.booleans(), label="prefetch")
    _check_config(problem, KernelConfig("mma", rows, 32 * warps, bk, split, warps, 1, prefetch))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=w4a8_problems(device=KERNEL_DEVICE, max_m=40, act_dtypes=("int8",)), data=st.data())
def test_int_mm_path_is_exact_on_the_accumulator(problem, data):
    """Unpack to int8 [N, K] + torch._int_mm: any M (fewer than 17 rows are padded for
    cuBLASLt), unpacking tiles at, above or below the group, partial N tiles."""
    m, k = problem.x.shape
    n, g = problem.packed.shape[0], problem.packed.group_size
    fits = [
        (bn, bk) for bn in (16, 32, 64) for bk in (32, 64, 128, 256)
        if valid_config(KernelConfig("int_mm", 0, bn, bk, 1, 4, 1), n, k, g, "int8")
    ]  # fmt: skip
    assume(fits)  # N not a multiple of 8: cuBLASLt's int8 GEMM refuses it
    bn, bk = data.draw(st.sampled_from(fits), label="block_n, block_k")
    _check_config(problem, KernelConfig("int_mm", 0, bn, bk, 1, 4, 1))


def test_int_mm_is_int8_only_and_needs_n_a_multiple_of_8():
    cfg = KernelConfig("int_mm", 0, 64, 128, 1, 4, 1)
    assert valid_config(cfg, 4096, 4096, 128, "int8")
    assert not valid_config(cfg, 4100, 4096, 128, "int8")
    assert not valid_config(cfg, 4096, 4096, 128, "float8_e4m3fn")
    assert not valid_config(KernelConfig("int_mm", 0, 64, 128, 2, 4, 1), 4096, 4096, 128, "int8")
    assert not valid_config(KernelConfig("int_mm", 0, 64, 96, 1, 4, 1), 4096, 4096, 32, "int8")
    p = quantize_weight_w4a8(torch.randn(32, 128), Scheme(name="w4a8", group_size=64))
    args = (torch.zeros(4, 128, dtype=torch.int8), torch.ones(4), *p.tensors(), None, 64)
    with pytest.raises(ValueError, match="int_mm path takes int8 activations in natural k order"):
        launch(cfg, *args, torch.float16, xq_even_odd=True)


@pytest.mark.parametrize(
    ("m", "n", "k", "split"), [(1, 8192, 28672, 16), (16, 8192, 28672, 8), (16, 28672, 4096, 4)]
)
def test_lane_mma_is_the_small_m_default_with_the_measured_splits(m, n, k, split):
    """The H100's leaders (`results/session17/probe_w4a8_lane.json`, and
    `session19/atomic/`: split 8 summed by atomics at 16 rows on 8192x28672)."""
    cfg = default_config(m, n, k, 128, "int8")
    assert (cfg.kernel, cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k) == (
        "mma", max(8, m), 128, 128, split,
    )  # fmt: skip
    assert default_config(m, n, k, 128, "float8_e4m3fn").kernel != "mma"
    assert "mma" in {c.kernel for c in candidate_configs(64, n, k, 128, "int8")}
    assert "mma" not in {c.kernel for c in candidate_configs(128, n, k, 128, "int8")}


@pytest.mark.parametrize(("rows", "bk", "split"), [(8, 64, 1), (16, 128, 2), (32, 32, 1)])
def test_lane_mma_reads_natural_and_even_odd_xq_alike(rows, bk, split):
    """A compiled graph hands the lane kernel natural-order xq (the kernel PRMTs each lane's
    8 k's apart); the eager path's quantize kernel writes even/odd order. Same accumulator."""
    gen = torch.Generator().manual_seed(rows + bk)
    m, n, k = rows - 3, 64, 256
    p = quantize_weight_w4a8(torch.randn(n, k, generator=gen), Scheme(name="w4a8", group_size=64))
    p = PackedW4A8(*_on_device(*p.tensors()), p.group_size)
    xq = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    cfg = KernelConfig("mma", rows, 64, bk, split, 2, 1)
    args = (torch.ones(m, device=KERNEL_DEVICE), *p.tensors(), None, 64, torch.float16)
    natural = launch(cfg, *_on_device(xq), *args, accumulator=True)
    even_odd = launch(
        cfg, *_on_device(to_even_odd(xq, bk)), *args, accumulator=True, xq_even_odd=True
    )  # fmt: skip
    expected = xq.long() @ int8_weight(*(t.cpu() for t in p.tensors()[:3]), 64).long().t()
    assert torch.equal(natural.cpu(), expected)
    assert torch.equal(even_odd.cpu(), expected)
    # a view starting mid-word (storage offset 1) is copied, not read misaligned
    shifted = torch.zeros(m * k + 1, dtype=torch.int8)
    shifted[1:] = xq.flatten()
    view = _on_device(shifted)[0][1:].view(m, k)
    assert torch.equal(launch(cfg, view, *args, accumulator=True).cpu(), expected)


def test_channel_search_never_raises_a_rows_rtn_error_and_lowers_the_total():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 256, generator=gen)
    w[::7, 5] *= 12  # outlier columns set some rows' s1
    scheme = Scheme(name="w4a8", group_size=64)

    def row_errors(p):
        return (dequantize_w4a8(p) - w).pow(2).sum(1)

    plain = quantize_weight_w4a8(w, scheme)
    searched = quantize_weight_w4a8(w, scheme, channel_search=True)
    assert (row_errors(searched) <= row_errors(plain) + 1e-9).all()
    assert row_errors(searched).sum() < 0.97 * row_errors(plain).sum()
    ratio = searched.channel_scales / plain.channel_scales
    assert ((ratio >= 1 - 1e-6) & (ratio <= max(CHANNEL_STRETCH) + 1e-6)).all()
    assert (ratio > 1.001).any()
    with pytest.raises(ValueError, match="channel_search is W4A8's"):
        gptq_quantize_weight(w, torch.eye(256), Scheme(group_size=64), channel_search=True)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    problem=w4a8_problems(device=KERNEL_DEVICE, max_m=40, act_dtypes=("float8_e4m3fn",)),
    data=st.data(),
)
def test_lane_f16_on_fp8_activations_matches_the_reference(problem, data):
    """ "mma_f16": W4A16's lane kernel on the e4m3 xq as fp16, weights (q - z) * s2 from the
    uint8 s2 and z, rescaled in its epilogue: 1-8 B tiles (M past them in row blocks), 2 or 4
    tiles per warp, BLOCK_K at, above or below the group, split K (one launch or two),
    prefetch. Launched directly: untimed, it is not yet a valid tuning config."""
    from qcompile.lowering.w4a16 import valid_config as w4a16_valid

    m, k = problem.x.shape
    g = problem.packed.group_size
    rows = data.draw(st.sampled_from((8, 16, 32, 64)), label="rows")  # M > rows: row blocks
    fits = [
        (warps, tiles, bk, sk)
        for warps in (1, 2) for tiles in (2, 4) for bk in (32, 64, 128) for sk in (1, 2, 3)
        if w4a16_valid(KernelConfig("mma", rows, 16 * tiles * warps, bk, sk, warps, 1), k, g)
    ]  # fmt: skip
    assume(fits)
    warps, tiles, bk, split = data.draw(st.sampled_from(fits), label="warps, tiles, bk, split")
    pf = data.draw(st.booleans(), label="prefetch")
    _check_config(
        problem, KernelConfig("mma_f16", rows, 16 * tiles * warps, bk, split, warps, 1, pf)
    )


@pytest.mark.parametrize("one_pass", [False, True])
def test_quantize_kernel_writes_e4m3_values_as_fp16_for_mma_f16(one_pass):
    """`as_fp16`: the same e4m3 values, as fp16 (exact), so "mma_f16" needs no cast kernel;
    launched either way it gives the same bits; other kernels and int8 refuse fp16 xq."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(5, 256, generator=gen) * 3).to(torch.float16)
    x[2, 9] = -700.0  # an outlier sets its row's scale
    xq8, s8 = quantize_per_token(*_on_device(x), "float8_e4m3fn", one_pass=one_pass)
    xq16, s16 = quantize_per_token(*_on_device(x), "float8_e4m3fn", one_pass=one_pass, as_fp16=True)  # fmt: skip
    assert xq16.dtype == torch.float16 and torch.equal(s16, s8)
    assert torch.equal(xq16, xq8.to(torch.float16))
    p = quantize_weight_w4a8(torch.randn(64, 256, generator=gen), Scheme(name="w4a8", group_size=128))  # fmt: skip
    w = (*_on_device(*p.tensors()), None, 128, torch.float16)
    cfg = KernelConfig("mma_f16", 8, 64, 128, 2, 2, 1)
    assert torch.equal(launch(cfg, xq16, s16, *w), launch(cfg, xq8, s8, *w))
    with pytest.raises(ValueError, match="fp16 xq .e4m3 values. is for mma_f16, not gemm"):
        launch(KernelConfig("gemm", 16, 32, 64, 1, 4, 2), xq16, s16, *w)
    with pytest.raises(ValueError, match="as_fp16 is for e4m3 activations only"):
        quantize_per_token(*_on_device(x), "int8", as_fp16=True)


def test_lane_fp8_is_the_fp8_default_at_small_m():
    """FP8 at M <= 16 takes "mma_f16" split as the H100 probe's leaders (never the int8-only
    atomic sum) and the lane candidates; int8 kernels refuse fp8."""
    fp8 = "float8_e4m3fn"
    cfg = default_config(16, 8192, 28672, 128, fp8)
    assert (cfg.kernel, cfg.block_m, cfg.block_n, cfg.split_k, cfg.reduce) == (
        "mma_f16",
        16,
        128,
        8,
        "",
    )
    one = default_config(1, 8192, 28672, 128, fp8)
    assert (one.kernel, one.block_m, one.split_k) == ("mma_f16", 8, 16)
    assert default_config(1, 28672, 4096, 128, fp8).split_k == 4
    assert default_config(32, 8192, 28672, 128, fp8).kernel != "mma_f16"  # a candidate there
    kinds = {(c.kernel, c.reduce) for c in candidate_configs(16, 8192, 28672, 128, fp8)}
    assert ("mma_f16", "") in kinds and not any(r for _, r in kinds)
    assert not valid_config(dataclasses.replace(cfg, reduce="atomic"), 8192, 28672, 128, fp8)
    assert not valid_config(cfg, 8192, 28672, 128, "int8")
    p = quantize_weight_w4a8(torch.randn(64, 256), Scheme(name="w4a8", group_size=128))
    args = (torch.ones(4), *p.tensors(), None, 128, torch.float16)
    with pytest.raises(ValueError, match="mma kernel takes int8 activations only"):
        launch(KernelConfig("mma", 8, 64, 128, 2, 2, 1), torch.zeros(4, 256, dtype=torch.float8_e4m3fn), *args)  # fmt: skip
    with pytest.raises(ValueError, match="mma_f16 takes e4m3 activations"):
        launch(KernelConfig("mma_f16", 8, 64, 128, 2, 2, 1), torch.zeros(4, 256, dtype=torch.int8), *args)  # fmt: skip


def test_lane_mma_refuses_more_rows_than_its_b_tiles_and_fp8():
    assert not valid_config(
        KernelConfig("mma", 16, 128, 128, 1, 4, 1), 64, 4096, 128, "float8_e4m3fn"
    )
    assert not valid_config(
        KernelConfig("mma", 16, 64, 128, 1, 4, 1), 64, 4096, 128, "int8"
    )  # 32/warp
    assert not valid_config(KernelConfig("mma", 16, 128, 128, 1, 4, 1), 64, 4096, 48, "int8")
    p = quantize_weight_w4a8(torch.randn(32, 128), Scheme(name="w4a8", group_size=64))
    xq = torch.zeros(20, 128, dtype=torch.int8)
    with pytest.raises(ValueError, match="M=20 rows but BLOCK_M=16"):
        launch(
            KernelConfig("mma", 16, 32, 64, 1, 1, 1), xq, torch.ones(20), *p.tensors(), None, 64,
            torch.float16,
        )  # fmt: skip


def test_swar_refuses_block_n_16():
    """BLOCK_N = 16 with two groups of 128 per K tile is wrong on the H100 (Triton 3.6)."""
    assert not valid_config(KernelConfig("gemm_swar", 16, 16, 256, 1, 4, 2), 64, 512, 128, "int8")
    assert valid_config(KernelConfig("gemm_swar", 16, 32, 256, 1, 4, 2), 64, 512, 128, "int8")


def test_swar_is_the_default_and_a_candidate_at_large_m_for_int8_only():
    from qcompile.lowering.w4a8 import _block_scaled_fp8

    fp8 = "fp8_mm" if _block_scaled_fp8() else "gemm"  # (cuBLASLt's FP8 GEMM on an H100)
    for m in (128, 256, 1024):
        expected = "int_mm" if m >= 1024 else "gemm_swar"
        assert default_config(m, 8192, 28672, 128, "int8").kernel == expected
        assert default_config(m, 8192, 28672, 128, "float8_e4m3fn").kernel == fp8
        kinds = {c.kernel for c in candidate_configs(m, 8192, 28672, 128, "int8")}
        assert {"gemm_swar", "int_mm"} <= kinds
        assert "int_mm" not in {c.kernel for c in candidate_configs(m, 8196, 28672, 128, "int8")}
    assert default_config(64, 8192, 28672, 128, "int8").kernel != "gemm_swar"
    # K split in two where the SWAR grid is under two programs per SM (measured on the H100)
    assert default_config(256, 8192, 28672, 128, "int8").split_k == 2
    assert default_config(256, 28672, 4096, 128, "int8").split_k == 1
    assert default_config(512, 28672, 4096, 128, "int8").split_k == 1
    assert default_config(256, 8192, 28672, 128, "int8").prefetch  # group scales one tile ahead
    swar = [c for c in candidate_configs(256, 8192, 28672, 128, "int8") if c.kernel == "gemm_swar"]
    assert swar and all(c.prefetch for c in swar)
    # the natural-order GEMM, dominated there by both, is no longer tuned at large M for int8
    assert "gemm" not in {c.kernel for c in candidate_configs(256, 8192, 28672, 128, "int8")}
    assert "gemm" in {c.kernel for c in candidate_configs(256, 8192, 28672, 128, "float8_e4m3fn")}
    assert "gemm" in {c.kernel for c in candidate_configs(64, 8192, 28672, 128, "int8")}
    # K not a multiple of 128: the SWAR default does not fit, the natural-order GEMM does
    assert default_config(256, 64, 96, 32, "int8").kernel == "gemm"


def test_launch_refuses_an_xq_order_its_kernel_does_not_read():
    p = quantize_weight_w4a8(torch.randn(32, 128), Scheme(name="w4a8", group_size=64))
    xq = torch.zeros(4, 128, dtype=torch.int8)
    args = (xq, torch.ones(4), *p.tensors(), None, 64, torch.float16)
    with pytest.raises(ValueError, match="even/odd order is for the SWAR and lane kernels"):
        launch(KernelConfig("gemm", 16, 32, 64, 1, 4, 2), *args, xq_even_odd=True)
    with pytest.raises(ValueError, match="not plane-major"):
        launch(KernelConfig("gemm_swar", 16, 32, 64, 1, 4, 2), *args, xq_plane_major=True)


def test_swar_and_lane_kernels_take_int8_only():
    """(The FP8 SWAR variant was removed: no faster than int8 on the H100, and wrong there.)"""
    fp8 = "float8_e4m3fn"
    swar = KernelConfig("gemm_swar", 64, 64, 128, 1, 4, 2)
    for cfg in (swar, KernelConfig("mma", 8, 128, 128, 1, 4, 1)):
        assert not valid_config(cfg, 64, 4096, 128, fp8)
        assert valid_config(cfg, 64, 4096, 128, "int8")
    assert not valid_config(KernelConfig("gemm_swar", 64, 64, 32, 1, 4, 2), 64, 4096, 128, "int8")
    for m in (1, 16, 128, 256, 1024):
        assert default_config(m, 8192, 28672, 128, fp8).kernel not in ("gemm_swar", "mma")
        kinds = {c.kernel for c in candidate_configs(m, 8192, 28672, 128, fp8)}
        assert kinds <= {"gemv", "gemm", "fp8_mm", "mma_f16"}  # mma_f16: W4A16's lane kernel


def test_fp8_mm_is_the_fp8_large_m_default_only_where_cublaslt_takes_it(monkeypatch):
    """G = 128, K a multiple of 512, N of 16, an sm_90 GPU with torch's 1x128 recipe (never
    the interpreter); elsewhere FP8 keeps the Triton GEMM. int8 never takes it."""
    from qcompile.lowering import w4a8 as w4a8_mod

    fp8 = "float8_e4m3fn"
    if KERNEL_DEVICE != "cuda":
        assert not w4a8_mod._block_scaled_fp8()
    monkeypatch.setattr(w4a8_mod, "_block_scaled_fp8", lambda: True)
    fp8_mm = KernelConfig("fp8_mm", 0, 128, 128, 1, 4, 1)
    assert default_config(256, 8192, 28672, 128, fp8) == fp8_mm
    assert default_config(1024, 28672, 4096, 128, fp8).kernel == "fp8_mm"
    assert "fp8_mm" in {c.kernel for c in candidate_configs(32, 28672, 4096, 128, fp8)}
    assert default_config(64, 28672, 4096, 128, fp8).kernel != "fp8_mm"  # (a candidate only)
    for n, k, g in ((8192, 28672, 64), (8200, 4096, 128), (4096, 4224, 128)):
        assert default_config(256, n, k, g, fp8).kernel == "gemm", (n, k, g)
    assert default_config(1024, 8192, 28672, 128, "int8").kernel != "fp8_mm"
    assert not valid_config(fp8_mm, 8192, 28672, 128, "int8")
    monkeypatch.setattr(w4a8_mod, "_block_scaled_fp8", lambda: False)
    assert default_config(256, 8192, 28672, 128, fp8).kernel == "gemm"


def test_launch_refuses_int8_or_a_raw_accumulator_on_fp8_mm():
    p = quantize_weight_w4a8(torch.randn(32, 512), Scheme(name="w4a8", group_size=128))
    cfg = KernelConfig("fp8_mm", 0, 64, 128, 1, 4, 1)
    for act in (torch.int8, torch.float8_e4m3fn):
        xq = torch.zeros(4, 512, dtype=act)
        args = (xq, torch.ones(4), *p.tensors(), None, 128, torch.float16)
        with pytest.raises(ValueError, match="fp8_mm takes e4m3 activations"):
            launch(cfg, *args, accumulator=act != torch.int8)


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "bias"), [(1, False), (37, True), (256, False)])
def test_gpu_fp8_mm_matches_the_reference(m, bias):
    """cuBLASLt's block-scaled FP8 GEMM on the e4m3 (q - z) weight: rows padded to 16 and
    sliced back, bias added, the output written into a given buffer."""
    from qcompile.lowering.w4a8 import _block_scaled_fp8

    if not _block_scaled_fp8():
        pytest.skip("needs an sm_90 GPU and torch's F.scaled_mm 1x128 recipe")
    gen = torch.Generator().manual_seed(m)
    n, k = 96, 1024
    w = torch.randn(n, k, generator=gen)
    w[3, 100] = 40.0  # an outlier weight
    p = quantize_weight_w4a8(w, Scheme(name="w4a8", group_size=128))
    x = torch.randn(m, k, generator=gen).to(torch.float16)
    x[0, 7] = 300.0  # an outlier activation
    xq, xs = quantize_activations_per_token(x, "float8_e4m3fn")
    b = torch.randn(n, generator=gen).to(torch.float16) if bias else None
    expected = (xq.double() * xs.double()[:, None]) @ dequantize_w4a8(p).double().t()
    if b is not None:
        expected += b.double()
    args = _on_device(xq, xs, *p.tensors(), b)
    cfg = KernelConfig("fp8_mm", 0, 64, 128, 1, 4, 1)
    out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
    got = launch(cfg, *args, 128, torch.float16, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert_close_rel(out.cpu(), expected, torch.float16)


@pytest.mark.parametrize(
    ("rows", "warps", "split", "reduce", "unroll"),
    [(8, 1, 2, None, 1), (8, 2, 4, None, 1), (16, 2, 4, None, 1), (16, 2, 4, True, 1),
     (8, 1, 3, True, 2), (16, 2, 4, True, 8), (16, 2, 4, "atomic", 1), (8, 1, 3, "atomic", 1)],
)  # fmt: skip
def test_lane_mma_split_k_reduces_in_one_launch_and_rearms_its_counters(
    rows, warps, split, reduce, unroll
):
    """With tile counters the last split of each column tile sums the int32 partials and
    rescales (no second launch), by default at 8 rows, forced at 16, with the partials'
    loads unrolled (split counts not a multiple of the unroll included); the counters
    return to zero, so repeated calls (CUDA-graph replays) agree exactly."""
    from qcompile.lowering.w4a16 import _tile_counters

    gen = torch.Generator().manual_seed(rows * split)
    m, n, k = rows - 1, 32 * warps * 3, 128 * split
    p = quantize_weight_w4a8(torch.randn(n, k, generator=gen), Scheme(name="w4a8", group_size=128))
    x = torch.randn(m, k, generator=gen, dtype=torch.float32).to(torch.float16)
    xq, xs = quantize_activations_per_token(x, "int8")
    args = _on_device(xq, xs, *p.tensors(), None)
    cfg = KernelConfig("mma", rows, 32 * warps, 128, split, warps, 1)
    ref = launch(cfg, *args, 128, torch.float16, accumulator=True).double()
    outs = [
        launch(cfg, *args, 128, torch.float16, self_reduce=reduce, reduce_unroll=unroll)
        for _ in range(2)
    ]
    expected = (
        ref
        * xs.double()[:, None].to(ref.device)
        * p.channel_scales.double()[None, :].to(ref.device)
    )
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0], launch(cfg, *args, 128, torch.float16, self_reduce=False))
    assert_close_rel(outs[0].cpu(), expected.cpu(), torch.float16)
    assert int(_tile_counters(outs[0].device).abs().sum()) == 0
    if reduce == "atomic":  # the workspace is left zeroed for the next call
        from qcompile.lowering.w4a8 import _atomic_workspaces

        assert int(_atomic_workspaces[outs[0].device].abs().sum()) == 0


def test_atomic_workspace_grows_without_freeing_what_graphs_may_hold(monkeypatch):
    """A larger layer reallocates the workspace (zeroed); the old buffer stays alive, since a
    CUDA graph captured before may still write through its address."""
    from qcompile.lowering import w4a8 as w4a8_mod

    monkeypatch.setattr(w4a8_mod, "_atomic_workspaces", {})
    monkeypatch.setattr(w4a8_mod, "_outgrown_workspaces", [])
    dev = torch.device("cpu")
    small = w4a8_mod._atomic_workspace(dev, 16)
    assert small.numel() >= 16 and int(small.abs().sum()) == 0
    assert w4a8_mod._atomic_workspace(dev, 100) is small  # big enough: reused
    big = w4a8_mod._atomic_workspace(dev, small.numel() + 1)
    assert big.numel() > small.numel() and int(big.abs().sum()) == 0
    assert w4a8_mod._outgrown_workspaces == [small]


def test_lane_default_sums_a_long_split_by_atomics_at_16_rows_only():
    """9-16 rows where the lane default would split K 16 ways: split 8, summed by atomics
    (timed on 8192x28672); fewer splits (28672x4096) and 8 rows keep their reduction."""
    atomic = default_config(16, 8192, 28672, 128, "int8")
    assert atomic == KernelConfig("mma", 16, 128, 128, 8, 4, 1, reduce="atomic")
    assert default_config(16, 28672, 4096, 128, "int8").reduce == ""
    assert default_config(1, 8192, 28672, 128, "int8").reduce == ""
    assert valid_config(atomic, 8192, 28672, 128, "int8")
    for bad in (
        KernelConfig("mma", 16, 128, 128, 1, 4, 1, reduce="atomic"),  # nothing to sum
        KernelConfig("gemm", 16, 64, 64, 2, 4, 3, reduce="atomic"),
        KernelConfig("mma", 16, 128, 128, 8, 4, 1, reduce="tree"),
    ):
        assert not valid_config(bad, 8192, 28672, 128, "int8"), bad
    kinds = {(c.split_k, c.reduce) for c in candidate_configs(16, 8192, 28672, 128, "int8")}
    assert {(4, "atomic"), (8, "atomic")} <= kinds


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=w4a8_problems(device=KERNEL_DEVICE, max_m=16, act_dtypes=("int8",)), data=st.data())
def test_lane_pdl_prologue_gives_the_plain_result(problem, data):
    """With `pdl` the lane kernel loads its first BLOCK_K's weights before waiting for xq and
    its x after (in the interpreter there is nothing to wait for: this holds the split
    prologue to the plain kernel's bits), with and without the prefetch."""
    m, k = problem.x.shape
    g = problem.packed.group_size
    rows = next(r for r in (8, 16, 32) if r >= m)  # (the strategy's M may pass max_m by one)
    fits = [
        (bk, sk) for bk in (32, 64, 128) for sk in (1, 2)
        if valid_config(KernelConfig("mma", rows, 64, bk, sk, 2, 1), 64, k, g, "int8")
    ]  # fmt: skip
    assume(fits)
    bk, split = data.draw(st.sampled_from(fits), label="block_k, split")
    pf = data.draw(st.booleans(), label="prefetch")
    cfg = KernelConfig("mma", rows, 64, bk, split, 2, 1, pf)
    w = (*problem.packed.tensors(), None, g, "int8")
    plain = quantize_and_launch(cfg, problem.x, *w)
    assert torch.equal(quantize_and_launch(cfg, problem.x, *w, pdl=True), plain)


def test_pdl_is_for_the_lane_kernel():
    """`launch(pdl=True)` on another kernel is refused; `quantize_and_launch` ignores it
    there (the quantize kernel's early signal then has no dependent)."""
    p = quantize_weight_w4a8(torch.randn(64, 256), Scheme(name="w4a8", group_size=128))
    x = torch.randn(4, 256).half()
    xq, xs = quantize_activations_per_token(x, "int8")
    gemv = KernelConfig("gemv", 1, 64, 64, 1, 2, 1)
    args = _on_device(xq, xs, *p.tensors(), None)
    with pytest.raises(ValueError, match="pdl is for the int8 lane kernel"):
        launch(gemv, *args, 128, torch.float16, pdl=True)
    xd = x.to(args[0].device)
    w = (*(t.to(args[0].device) for t in p.tensors()), None, 128, "int8")
    assert torch.equal(
        quantize_and_launch(gemv, xd, *w, pdl=True), quantize_and_launch(gemv, xd, *w)
    )


def test_lane_unrolled_sum_at_16_rows_is_a_candidate_and_sums_in_one_launch():
    """`reduce="unroll8"` (split K summed by the last split, 8 partials' loads in flight) is
    valid with a split and offered at 16 rows, with and without the prefetch; its result
    equals the two-launch epilogue's bit for bit."""
    unroll = KernelConfig("mma", 16, 128, 128, 8, 4, 1, True, "unroll8")
    assert valid_config(unroll, 8192, 28672, 128, "int8")
    assert not valid_config(dataclasses.replace(unroll, split_k=1), 8192, 28672, 128, "int8")
    cands = candidate_configs(16, 8192, 28672, 128, "int8")
    assert {(c.prefetch, c.split_k) for c in cands if c.reduce == "unroll8"} >= {
        (False, 8),
        (True, 8),
        (False, 16),
        (True, 16),
    }
    assert not any(c.reduce == "unroll8" for c in candidate_configs(1, 8192, 28672, 128, "int8"))
    gen = torch.Generator().manual_seed(3)
    m, n, k = 13, 256, 1024
    p = quantize_weight_w4a8(torch.randn(n, k, generator=gen), Scheme(name="w4a8", group_size=128))
    xq, xs = quantize_activations_per_token(torch.randn(m, k, generator=gen).half(), "int8")
    args = _on_device(xq, xs, *p.tensors(), None)
    cfg = KernelConfig("mma", 16, 64, 128, 8, 2, 1, True, "unroll8")
    one = launch(cfg, *args, 128, torch.float16)
    two = launch(cfg, *args, 128, torch.float16, self_reduce=False)
    assert torch.equal(one, two)


@pytest.mark.parametrize(("n", "k", "block_n", "block_k"), [(24, 256, 16, 128), (64, 512, 64, 256)])
def test_fp8_unpacking_writes_e4m3_q_minus_z_in_k_order(n, k, block_n, block_k):
    """The block-scaled FP8 path's unpacking: [N, K] e4m3 codes of (q - z), exactly torch's
    cast of the integers (|q - z| <= 15 is exact in e4m3), K-contiguous, natural k order."""
    from qcompile.lowering.w4a8 import _unpacked_weight

    gen = torch.Generator().manual_seed(n + k)
    p = quantize_weight_w4a8(torch.randn(n, k, generator=gen), Scheme(name="w4a8", group_size=128))
    qw, s2, z = _on_device(p.qweight, p.group_scales, p.group_zeros)
    w = _unpacked_weight(qw, s2, z, 128, block_n, block_k, fp8=True)
    codes = torch.stack([(p.qweight >> (4 * i)) & 0xF for i in range(8)], 1).reshape(k, n).t()
    zeros = p.group_zeros.t().to(torch.int64).repeat_interleave(128, dim=1)
    expected = (codes - zeros).float().to(torch.float8_e4m3fn)
    assert torch.equal(w.cpu().view(torch.uint8), expected.view(torch.uint8))
    assert (codes - zeros).abs().max() <= 15


@pytest.mark.skipif(KERNEL_DEVICE != "cpu", reason="the limit is lowered in the interpreter")
@pytest.mark.parametrize("quantized_act", [False, True])
def test_rows_past_the_32_bit_index_limit_run_in_chunks(cpu_tuner, monkeypatch, quantized_act):
    """As W4A16's: row chunks into slices of one out past 2**31 elements, for the op on
    16-bit x (each chunk quantized per token on its own: the same codes) and on int8 x; the
    tuner times on the first chunk's rows."""
    from qcompile.lowering import w4a8 as lowering

    calls = record_row_chunks(monkeypatch, lowering, 40, 256)
    tune_with_default(monkeypatch, lowering)
    gen = torch.Generator().manual_seed(0)
    p = quantize_weight_w4a8(
        torch.randn(64, 256, generator=gen), Scheme(name="w4a8", group_size=64)
    )
    x = torch.randn(100, 256, generator=gen).half()
    ref = OP(x, *p.tensors(), None, 64, "int8")  # the reference (CPU dispatch)
    if quantized_act:
        xq, xs = quantize_activations_per_token(x, "int8")
        out = lowering.w4a8_linear_quantized_act_cuda(xq, xs, *p.tensors(), None, 64, torch.float16)
    else:
        out = lowering.w4a8_linear_cuda(x, *p.tensors(), None, 64, "int8")
    assert calls == [39, 39, 39, 22]  # the tuner's run, then the chunks
    assert_close_rel(out, ref, torch.float16)


@pytest.mark.gpu
def test_gpu_output_past_2_to_the_31_elements_runs_in_row_chunks():
    """As W4A16's: 16400 tokens through a 128k-wide W4A8 layer (2.15e9 output elements) run in
    row chunks; the first and last rows against the reference."""
    m, n, k = 16400, 131072, 1024
    gen = torch.Generator(device="cuda").manual_seed(4)
    p = quantize_weight_w4a8(
        torch.randn(n, k, device="cuda", generator=gen), Scheme(name="w4a8", group_size=128)
    )
    x = torch.randn(m, k, device="cuda", generator=gen).half()
    out = OP(x, *p.tensors(), None, 128, "int8")
    for rows in (slice(0, 8), slice(m - 8, m)):
        ref = OP(x[rows].cpu(), *(t.cpu() for t in p.tensors()), None, 128, "int8")
        assert_close_rel(out[rows], ref, torch.float16)


# ------------------------------------------------------------- wgmma_rs (int8, Hopper)
def test_wgmma_rs_rules_and_candidates(monkeypatch):
    """W4A16's Gluon kernel in its int8 mode: W4A16's tile rules, int8 activations only, N a
    multiple of 16 (TMA reads the uint8 s2 / z rows in place); offered on Hopper only."""
    import qcompile.lowering.w4a8 as lowering8

    cfg = KernelConfig("wgmma_rs", 16, 64, 128, 2, 4, 4)
    assert valid_config(cfg, 4096, 4096, 128, "int8")
    assert not valid_config(cfg, 4096, 4096, 128, "float8_e4m3fn")
    assert not valid_config(cfg, 4104, 4096, 128, "int8")  # (N % 16)
    # two groups a K tile (W4A16's SUB = 2), not four
    assert valid_config(KernelConfig("wgmma_rs", 16, 64, 128, 2, 4, 4), 4096, 4096, 64, "int8")
    assert not valid_config(KernelConfig("wgmma_rs", 16, 64, 128, 2, 4, 4), 4096, 4096, 32, "int8")
    assert not valid_config(
        KernelConfig("wgmma_rs", 16, 128, 128, 1, 4, 4), 4096, 4096, 128, "int8"
    )
    # (Triton 3.6 has no s8 wgmma with N = 256: 256 x rows do not compile)
    assert not valid_config(
        KernelConfig("wgmma_rs", 256, 128, 64, 1, 8, 4), 4096, 4096, 128, "int8"
    )
    monkeypatch.setattr(lowering8, "_wgmma_device", lambda: False)
    assert not [
        c for c in candidate_configs(16, 28672, 4096, 128, "int8") if c.kernel == "wgmma_rs"
    ]
    monkeypatch.setattr(lowering8, "_wgmma_device", lambda: True)
    for m in (16, 64, 256, 1024):
        rs = [c for c in candidate_configs(m, 28672, 4096, 128, "int8") if c.kernel == "wgmma_rs"]
        assert rs and all(valid_config(c, 28672, 4096, 128, "int8") for c in rs), m
        assert {c.block_m for c in rs} == {min(m, 128)}, m
    assert not [c for c in candidate_configs(8, 28672, 4096, 128, "int8") if c.kernel == "wgmma_rs"]
    fp8 = candidate_configs(16, 28672, 4096, 128, "float8_e4m3fn")
    assert not [c for c in fp8 if c.kernel == "wgmma_rs"]
    # the producer-warp kernel: offered with `_WGMMA_RS_WS` (on), capped at 96 registers
    # below 128 x rows, uncapped at 128
    monkeypatch.setattr(lowering8, "_WGMMA_RS_WS", False)
    assert not [c for c in candidate_configs(16, 4096, 14336, 128, "int8") if "ws" in c.kernel]
    monkeypatch.setattr(lowering8, "_WGMMA_RS_WS", True)
    for m in (16, 64, 256, 1024):
        ws = [c for c in candidate_configs(m, 4096, 14336, 128, "int8") if "ws" in c.kernel]
        assert ws and all(valid_config(c, 4096, 14336, 128, "int8") for c in ws), m
        assert {c.max_registers for c in ws} == ({96} if m < 128 else {0}), m
        assert {c.block_m for c in ws} == {min(m, 128)}, m
        assert {c.block_k for c in ws} == {128 if m <= 64 else 64}, m  # one group a tile
    # K tiles of two groups (`_SUBTILES`, on): wgmma_rs only, up to 64 x rows, 2 and 3 stages
    for m in (16, 64, 256):
        cands = candidate_configs(m, 4096, 14336, 128, "int8")
        two = [c for c in cands if c.kernel.startswith("wgmma") and c.block_k == 256]
        assert all(valid_config(c, 4096, 14336, 128, "int8") for c in two), m
        if m > 64:
            assert not two, m
        else:
            assert {c.kernel for c in two} == {"wgmma_rs"}, m
            assert {c.num_stages for c in two} == {2, 3}, m
    monkeypatch.setattr(lowering8, "_SUBTILES", False)
    assert not [
        c for c in candidate_configs(16, 4096, 14336, 128, "int8")
        if c.kernel.startswith("wgmma") and c.block_k == 256
    ]  # fmt: skip


@pytest.mark.parametrize("chunk", [8, 64])
def test_from_even_odd_inverts_to_even_odd(chunk):
    """`from_even_odd` (the wgmma_rs launcher's way back to natural order for the lane kernel)
    undoes `to_even_odd`, and position p * chunk / 2 + c of the even / odd order is k = 2c + p."""
    from qcompile.quant.int4 import from_even_odd

    x = torch.arange(3 * 128).reshape(3, 128)
    eo = to_even_odd(x, chunk)
    assert torch.equal(from_even_odd(eo, chunk), x)
    assert eo[0, 1].item() == 2 and eo[0, chunk // 2].item() == 1


def test_wgmma_rs_refuses_what_it_cannot_read():
    """FP8 or plane-major activations and a strided `out` get a clear error before any launch."""
    p = _packed(n=64, k=256, g=128)
    cfg = KernelConfig("wgmma_rs", 16, 64, 128, 1, 4, 4)
    xs = torch.ones(2)
    args = (*p.tensors(), None, 128, torch.float16)
    fp8 = torch.zeros(2, 256, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="wgmma_rs takes int8 activations"):
        launch(cfg, fp8, xs, *args)
    xq = torch.zeros(2, 256, dtype=torch.int8)
    with pytest.raises(ValueError, match="wgmma_rs takes int8 activations"):
        launch(cfg, xq, xs, *args, xq_plane_major=True)
    with pytest.raises(ValueError, match="out must be contiguous"):
        launch(cfg, xq, xs, *args, out=torch.empty(64, 2, dtype=torch.float16).t())


@pytest.mark.gpu
@pytest.mark.parametrize(
    "m,n,k,g,bias,tile",
    [
        (16, 512, 4096, 128, False, (16, 64, 128, 1, 4, 4)),
        (16, 512, 4096, 128, True, (16, 64, 128, 4, 4, 4)),
        (13, 336, 640, 64, True, (16, 128, 64, 1, 8, 4)),  # odd M, N past the tile, 10 tiles
        (200, 384, 768, 128, False, (128, 128, 64, 2, 8, 3)),
        (16, 512, 4096, 128, True, (16, 64, 256, 2, 4, 2)),  # two groups a K tile
    ],
)
@pytest.mark.parametrize("kind,regs", [("wgmma_rs", 0), ("wgmma_rs_ws", 96)])
@pytest.mark.parametrize("pairs,pipe", [(False, False), (True, False), (True, True)])
def test_gpu_wgmma_rs_int8_is_exact_on_the_accumulator(
    monkeypatch, m, n, k, g, bias, tile, kind, regs, pairs, pipe
):
    """The int8 mode of W4A16's Gluon kernel, with and without its producer warp (capped at 96
    registers below 128 x rows, as offered), with W's rows loaded one at a time or in pairs
    (`_W4A8_PAIRS`, on) and with each wgmma left in flight past its step (`_PIPE`, off until
    timed): the raw int32 accumulator equals the exact
    integer reference (split or not), the rescaled output the float64 reference, from xq in
    natural order and from the quantize kernel's even / odd order alike."""
    gen = torch.Generator().manual_seed(m + n)
    w = torch.randn(n, k, generator=gen)
    w[:, 5] *= 30  # an outlier input channel
    p = quantize_weight_w4a8(w, Scheme(name="w4a8", group_size=g))
    x = torch.randn(m, k, generator=gen).half()
    x[:, 7] *= 20
    b = torch.randn(n, generator=gen).half() if bias else None
    problem = W4A8Problem(x, w, p, b, torch.float16, "int8")
    from qcompile.lowering import w4a16_wgmma

    monkeypatch.setattr(w4a16_wgmma, "_W4A8_PAIRS", pairs)
    monkeypatch.setattr(w4a16_wgmma, "_PIPE", pipe)
    cfg = KernelConfig(kind, *tile, max_registers=regs if tile[0] < 128 else 0)
    assert valid_config(cfg, n, k, g, "int8")
    xq, xs = _on_device(*problem.quantized_x())
    args = (xq, xs, *(t.cuda() for t in p.tensors()), _on_device(b)[0] if bias else None, g)
    acc = launch(cfg, *args, torch.float16, accumulator=True)
    assert torch.equal(acc.cpu().double(), problem.accumulator64())
    out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
    got = launch(cfg, *args, torch.float16, out=out)
    assert_close_rel(got, problem.reference64(), torch.float16)
    eo = launch(cfg, to_even_odd(xq, 8), *args[1:], torch.float16, xq_even_odd=True)
    assert torch.equal(eo, got)
    fused = quantize_and_launch(
        cfg, x.cuda(), *(t.cuda() for t in p.tensors()), args[-2], g, "int8"
    )
    assert_close_rel(fused, problem.reference64(), torch.float16)


# ------------------------------------------------------ absmax over chunks (`_ABSMAX_CHUNK`)
@SETTINGS
@given(
    rows=st.integers(1, 5),
    chunk=st.sampled_from([8, 32, 64]),
    chunks=st.integers(2, 6),
    act_dtype=st.sampled_from(["int8", "float8_e4m3fn"]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    outlier=st.floats(1.0, 1e3),
    seed=st.integers(0, 2**16),
)
def test_absmax_over_chunks_quantizes_identically(
    rows, chunk, chunks, act_dtype, dtype, outlier, seed
):
    """The chunked absmax (a max of per-chunk maxima) is exactly the row's absmax, so xq and
    the scale are the same bits; an all-zero row still takes the floor."""
    gen = torch.Generator().manual_seed(seed)
    k = chunk * chunks
    x = torch.randn(rows, k, generator=gen)
    x[0, int(torch.randint(0, k, (1,), generator=gen))] *= outlier
    if rows > 1:
        x[-1] = 0.0
    x = x.to(dtype)
    xq, xs = quantize_activations_per_token(x, act_dtype)
    cq, cs = quantize_activations_per_token(x, act_dtype, chunks)
    assert torch.equal(xs, cs)
    assert torch.equal(xq.view(torch.int8), cq.view(torch.int8))


def test_absmax_chunks_rule(monkeypatch):
    """2048-column chunks by default (0: one reduction a row); K must be a multiple of the
    chunk and hold at least two chunks."""
    from qcompile.quant import w4a8 as quant8

    assert quant8.absmax_chunks(28672) == 14
    monkeypatch.setattr(quant8, "_ABSMAX_CHUNK", 0)
    assert quant8.absmax_chunks(28672) == 1
    monkeypatch.setattr(quant8, "_ABSMAX_CHUNK", 2048)
    assert quant8.absmax_chunks(4096) == 2
    assert quant8.absmax_chunks(2048) == 1  # one chunk: nothing to split
    assert quant8.absmax_chunks(5000) == 1  # not a multiple


def test_pass_takes_the_absmax_over_chunks(monkeypatch, tiny_llama):
    """With `_ABSMAX_CHUNK` set the pass's quantize calls carry K // chunk, and the rewritten
    graph gives the same logits as with one reduction a row, bit for bit."""
    from qcompile.quant import w4a8 as quant8

    monkeypatch.setattr(quant8, "_ABSMAX_CHUNK", 0)

    def run():
        backend, _, graphs = _rewrite_only(QuantConfig(W4A8))
        with torch.no_grad():
            out = torch.compile(copy.deepcopy(tiny_llama), backend=backend)(_ids()).logits
        torch._dynamo.reset()
        calls = [n for n in graphs[-1].graph.nodes if n.target is quantize_activations_per_token]
        return out, calls

    plain, plain_calls = run()
    monkeypatch.setattr(quant8, "_ABSMAX_CHUNK", 32)
    chunked, calls = run()
    widths = [n.args[0].meta["example_value"].shape[-1] for n in calls]
    assert calls and [n.args[2] for n in calls] == [w // 32 for w in widths], widths
    assert all(n.args[2] == 1 for n in plain_calls)
    assert torch.equal(plain, chunked)
