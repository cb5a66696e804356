"""int4 packing and round-to-nearest quantization against independent float64 math."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.config import Scheme
from qcompile.quant.int4 import (
    PackedInt4,
    dequantize_int4,
    pack_int4_along_k,
    unpack_int4_along_k,
)
from qcompile.quant.rtn import quantize_weight_int4

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GROUP_SIZES = (32, 64, 128, None)


# --- packing -------------------------------------------------------------------------------


@st.composite
def int4_codes(draw: st.DrawFn) -> torch.Tensor:
    """[N, K] int64 codes in [0, 15], K a multiple of 8; biased towards top nibbles >= 8."""
    n = draw(st.integers(1, 5))
    k = 8 * draw(st.integers(1, 6))
    values = draw(st.lists(st.integers(0, 15), min_size=n * k, max_size=n * k))
    return torch.tensor(values, dtype=torch.int64).reshape(n, k)


@settings(max_examples=30, deadline=None)
@given(codes=int4_codes())
def test_pack_unpack_round_trip(codes: torch.Tensor) -> None:
    n, k = codes.shape
    qweight = pack_int4_along_k(codes)
    assert qweight.dtype == torch.int32
    assert tuple(qweight.shape) == (k // 8, n)
    # The word is negative exactly when its last (highest) nibble has its top bit set.
    assert torch.equal(qweight < 0, (codes[:, 7::8] >= 8).t())
    unpacked = unpack_int4_along_k(qweight)
    assert unpacked.dtype == torch.uint8
    assert torch.equal(unpacked.to(torch.int64), codes)


@pytest.mark.parametrize("code_dtype", [torch.uint8, torch.int32, torch.int64, torch.float32])
def test_pack_layout_matches_contract(code_dtype: torch.dtype) -> None:
    # code of w[n, k] = (qweight[k // 8, n] >> (4 * (k % 8))) & 0xF, low nibble first.
    codes = torch.tensor(
        [
            [1, 2, 3, 4, 5, 6, 7, 8, 15, 0, 15, 0, 15, 0, 15, 15],
            [0, 0, 0, 0, 0, 0, 0, 0, 9, 10, 11, 12, 13, 14, 15, 15],
        ]
    )
    qweight = pack_int4_along_k(codes.to(code_dtype))

    expected = torch.zeros(2, 2, dtype=torch.int64)
    for n in range(2):
        for k in range(16):
            expected[k // 8, n] |= int(codes[n, k]) << (4 * (k % 8))
    # As unsigned 32-bit words, read from the high nibble down; rows are K/8, columns N.
    assert expected.tolist() == [[0x87654321, 0x00000000], [0xFF0F0F0F, 0xFFEDCBA9]]
    assert torch.equal(qweight.to(torch.int64) & 0xFFFFFFFF, expected)
    assert qweight.tolist() == [
        [0x87654321 - 2**32, 0],
        [0xFF0F0F0F - 2**32, 0xFFEDCBA9 - 2**32],
    ]

    for n in range(2):
        for k in range(16):
            assert (int(qweight[k // 8, n]) >> (4 * (k % 8))) & 0xF == int(codes[n, k])


def test_pack_all_fifteen_is_minus_one() -> None:
    qweight = pack_int4_along_k(torch.full((3, 16), 15, dtype=torch.uint8))
    assert torch.equal(qweight, torch.full((2, 3), -1, dtype=torch.int32))
    assert torch.equal(unpack_int4_along_k(qweight), torch.full((3, 16), 15, dtype=torch.uint8))


def test_pack_rejects_k_not_multiple_of_8() -> None:
    with pytest.raises(ValueError, match=r"K=12 is not divisible by 8"):
        pack_int4_along_k(torch.zeros(2, 12, dtype=torch.uint8))


# --- RTN quantization ----------------------------------------------------------------------


def _groups64(weight: torch.Tensor, g: int) -> torch.Tensor:
    """[N, K] -> [N, K // G, G] float64."""
    n, k = weight.shape
    return weight.to(torch.float64).reshape(n, k // g, g)


def _dequantize64(packed: PackedInt4) -> torch.Tensor:
    """Independent float64 dequantization: [N, K // G, G] of code * scale + offset."""
    codes = unpack_int4_along_k(packed.qweight).to(torch.float64)
    n, k = codes.shape
    g = packed.group_size
    scales = packed.scales.to(torch.float64).t()[..., None]  # [N, K // G, 1]
    offsets = packed.offsets.to(torch.float64).t()[..., None]
    return codes.reshape(n, k // g, g) * scales + offsets


def _check_rtn(
    weight: torch.Tensor, scheme: Scheme, dtype: torch.dtype | None = None
) -> PackedInt4:
    """Shapes, code range, fitted scales/offsets and the per-element error bound."""
    n, k = weight.shape
    packed = quantize_weight_int4(weight, scheme, dtype)
    dtype = dtype or weight.dtype
    g = k if scheme.group_size is None else scheme.group_size

    assert packed.group_size == g
    assert packed.qweight.dtype == torch.int32
    assert tuple(packed.qweight.shape) == (k // 8, n)
    assert tuple(packed.scales.shape) == (k // g, n)
    assert tuple(packed.offsets.shape) == (k // g, n)
    assert packed.scales.dtype == dtype and packed.offsets.dtype == dtype
    assert packed.shape == (n, k)
    codes = unpack_int4_along_k(packed.qweight)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15

    w = _groups64(weight, g)
    eps = torch.finfo(dtype).eps
    scale = packed.scales.to(torch.float64).t()  # [N, K // G]
    offset = packed.offsets.to(torch.float64).t()
    absmax = w.abs().amax(dim=-1)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    if scheme.symmetric:
        ideal = torch.where(absmax > 0, absmax / 7, torch.ones_like(absmax))
        torch.testing.assert_close(scale, ideal, rtol=eps, atol=0)
        assert torch.equal(offset, -8 * scale)
    else:
        ideal = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi))
        torch.testing.assert_close(scale, ideal, rtol=eps, atol=0)
        torch.testing.assert_close(offset, lo, rtol=eps, atol=0)

    # Round to nearest: within half a step, plus the slack from rounding scale and offset to
    # `dtype` (the code grid may fall short of the group's range by a few ulps at either end)
    # and the float32 arithmetic of the code computation.
    err = (_dequantize64(packed) - w).abs()
    bound = scale / 2 + 2 * eps * absmax + 1e-5 * scale
    assert bool((err <= bound[..., None]).all()), f"max excess {(err - bound[..., None]).max()}"

    # dequantize_int4 (one float32 FMA per element) agrees with the float64 dequantization
    # up to float32 rounding of code * scale + offset.
    deq32 = dequantize_int4(packed, torch.float32).to(torch.float64).reshape(n, k // g, g)
    fma_bound = 2 * torch.finfo(torch.float32).eps * (15 * scale + offset.abs())
    assert bool(((deq32 - _dequantize64(packed)).abs() <= fma_bound[..., None]).all())
    return packed


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_rtn_error_within_half_step(
    dtype: torch.dtype, group_size: int | None, symmetric: bool
) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 256, generator=gen).to(dtype)
    _check_rtn(weight, Scheme(group_size=group_size, symmetric=symmetric))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_rtn_float32_weight_to_half_scales(dtype: torch.dtype, symmetric: bool) -> None:
    # A float32 checkpoint quantized for a half-precision model: only scales/offsets round.
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(4, 128, generator=gen) * 3
    _check_rtn(weight, Scheme(group_size=64, symmetric=symmetric), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_rtn_outliers_stay_within_their_group(
    dtype: torch.dtype, group_size: int | None, symmetric: bool
) -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(4, 256, generator=gen)
    weight[0, 3] *= 100
    weight[1, 200] = -100 * weight[1, 200].abs() - 100
    weight[3, 64] = 250.0
    weight = weight.to(dtype)
    packed = _check_rtn(weight, Scheme(group_size=group_size, symmetric=symmetric))

    # A group without an outlier keeps its own small step: row 2 has none.
    g = packed.group_size
    row2_absmax = _groups64(weight, g)[2].abs().amax(dim=-1)
    assert bool((packed.scales[:, 2].to(torch.float64) <= row2_absmax / 6).all())


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 4),
    groups=st.integers(1, 3),
    group_size=st.sampled_from(GROUP_SIZES),
    symmetric=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
    magnitude=st.sampled_from([1e-3, 1.0, 30.0]),
    n_outliers=st.integers(0, 3),
)
def test_rtn_error_bound_hypothesis(
    n: int,
    groups: int,
    group_size: int | None,
    symmetric: bool,
    dtype: torch.dtype,
    seed: int,
    magnitude: float,
    n_outliers: int,
) -> None:
    k = groups * (group_size or 32)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * magnitude
    rows = torch.randint(0, n, (n_outliers,), generator=gen)
    cols = torch.randint(0, k, (n_outliers,), generator=gen)
    weight[rows, cols] *= 100
    _check_rtn(weight.to(dtype), Scheme(group_size=group_size, symmetric=symmetric))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [0.0, 1.0, -3.25, 0.1, 1234.5])
def test_rtn_asymmetric_constant_groups_are_exact(dtype: torch.dtype, value: float) -> None:
    weight = torch.full((3, 64), value).to(dtype)
    weight[1] = 0.5  # another constant group, in another row
    packed = quantize_weight_int4(weight, Scheme(group_size=32))
    assert torch.equal(_dequantize64(packed).reshape(3, 64), weight.to(torch.float64))
    assert torch.equal(dequantize_int4(packed), weight)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [0.0, 7.0, -7.0, -3.5, 0.4375])
def test_rtn_symmetric_constant_groups_are_exact(dtype: torch.dtype, value: float) -> None:
    # Symmetric codes sit on a grid through 0 with scale absmax / 7, so a constant group is
    # exact when that scale is representable (value = 7 * 2**e) or the group is all zeros.
    weight = torch.full((2, 64), value).to(dtype)
    packed = quantize_weight_int4(weight, Scheme(group_size=64, symmetric=True))
    assert torch.equal(_dequantize64(packed).reshape(2, 64), weight.to(torch.float64))
    assert torch.equal(dequantize_int4(packed), weight)


def test_rtn_symmetric_float16_near_max() -> None:
    weight = torch.linspace(-60000, 60000, 64).to(torch.float16).reshape(2, 32)
    packed = quantize_weight_int4(weight, Scheme(group_size=32, symmetric=True))
    assert bool(torch.isfinite(packed.offsets).all())
    assert bool(torch.isfinite(dequantize_int4(packed)).all())


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_rtn_float16_subnormal_group(symmetric: bool) -> None:
    weight = torch.zeros(1, 32, dtype=torch.float16)
    weight[0, 0] = 2**-24  # the smallest float16 subnormal
    packed = quantize_weight_int4(weight, Scheme(group_size=32, symmetric=symmetric))
    assert bool((packed.scales > 0).all())
    assert torch.equal(dequantize_int4(packed), weight)


def test_rtn_k_not_divisible_by_group_size() -> None:
    with pytest.raises(ValueError, match=r"K=96 is not divisible by group_size=128"):
        quantize_weight_int4(torch.randn(4, 96), Scheme(group_size=128))


def test_rtn_rejects_non_2d_weight() -> None:
    with pytest.raises(ValueError, match=r"weight must be \[N, K\], got \(2, 4, 32\)"):
        quantize_weight_int4(torch.randn(2, 4, 32), Scheme(group_size=32))


def test_rtn_per_channel_has_one_group_per_row() -> None:
    weight = torch.randn(5, 96, generator=torch.Generator().manual_seed(2))
    packed = quantize_weight_int4(weight, Scheme(group_size=None))
    assert packed.group_size == 96
    assert tuple(packed.scales.shape) == (1, 5)
    torch.testing.assert_close(packed.offsets[0], weight.amin(dim=1), rtol=0, atol=0)
    torch.testing.assert_close(
        packed.scales[0], (weight.amax(dim=1) - weight.amin(dim=1)) / 15, rtol=1e-6, atol=0
    )


# --- PackedInt4 ----------------------------------------------------------------------------


def test_packed_shape_and_nbytes() -> None:
    n, k = 64, 512
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    packed = quantize_weight_int4(weight, Scheme(group_size=128))
    assert packed.shape == (n, k)
    # qweight: N * K / 2 bytes; scales and offsets: 2 * (K / 128) * N fp16 values.
    assert packed.nbytes() == n * k // 2 + 2 * (k // 128) * n * 2
    fp16_bytes = weight.numel() * weight.element_size()
    assert packed.nbytes() <= 0.3 * fp16_bytes


@pytest.mark.parametrize("symmetric", [False, True])
def test_clip_search_never_worse_and_sometimes_better(symmetric: bool) -> None:
    from qcompile.quant.rtn import fit_groups, round_to_codes

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 4, 32, generator=gen)
    w[:, 0, 0] = 12.0  # one outlier in the first group of every row

    def err(scales, offsets):
        q = round_to_codes(w, scales[..., None], offsets[..., None])
        return (q * scales[..., None] + offsets[..., None] - w).abs().pow(2.4).sum(-1)

    plain = err(*fit_groups(w, symmetric, torch.float32))
    clipped = err(*fit_groups(w, symmetric, torch.float32, clip_search=True))
    assert (clipped <= plain + 1e-5).all()  # the grid includes no clipping
    assert (clipped < plain - 1e-3).float().mean() > 0.1  # and it helps a share of groups
    assert clipped.mean() < plain.mean()


# --- co-located storage (quant/colocate.py) ---------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    widths=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    rows=st.sampled_from([None, 1, 3]),  # None: 1-D tensors (biases)
    seed=st.integers(0, 2**16),
)
def test_colocated_views_share_one_storage_and_span_back(widths, rows, seed) -> None:
    from qcompile.quant.colocate import colocated_views, spanning_view

    gen = torch.Generator().manual_seed(seed)
    shapes = [(w,) if rows is None else (rows, w) for w in widths]
    tensors = [
        torch.randint(-(2**31), 2**31 - 1, s, generator=gen, dtype=torch.int32) for s in shapes
    ]
    views = colocated_views(tensors)
    assert all(torch.equal(v, t) for v, t in zip(views, tensors, strict=True))
    assert len({v.untyped_storage().data_ptr() for v in views}) == 1
    span = spanning_view(views)
    assert span is not None and torch.equal(span, torch.cat(tensors, -1))
    assert span.data_ptr() == views[0].data_ptr()  # a view, not a copy
    if len(views) > 1:
        assert spanning_view(views[::-1]) is None  # not adjacent in this order
        assert spanning_view([views[0], tensors[1]]) is None  # another storage
    if len(views) > 2:
        assert spanning_view([views[0], views[2]]) is None  # views[1] lies between


def test_spanning_view_needs_one_row_stride_and_unit_columns() -> None:
    from qcompile.quant.colocate import spanning_view

    base = torch.arange(24.0).reshape(4, 6)
    assert torch.equal(spanning_view([base[:, :2], base[:, 2:5]]), base[:, :5])
    assert spanning_view([base[:, 0:2], base[:, 3:5]]) is None  # a gap
    assert spanning_view([base[:2, :2], base[2:, 2:4]]) is None  # other rows
    assert spanning_view([base.t()[:2], base.t()[2:4]]) is None  # column stride 6
    assert spanning_view([base.flatten()[:2], base.flatten()[2:3]]) is not None
