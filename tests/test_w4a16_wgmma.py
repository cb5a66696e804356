"""The W4A16 "wgmma_rs" kernels (Gluon, Hopper). Gluon does not run in Triton's interpreter, so
on CPU: their unpacking bit for bit in torch against the float64 dequantization, and when they
are offered; `test_offline_compile.py` compiles them for sm_90. On the H100 (gpu marker): their
outputs against the float64 reference, and `test_lowering_w4a16.py`'s candidate-config test
draws them too."""

from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_DEVICE
from helpers import assert_close_rel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcompile.lowering import w4a16 as lowering
from qcompile.lowering import w4a16_wgmma
from qcompile.lowering.autotune import KernelConfig
from qcompile.lowering.w4a16 import candidate_configs, launch, valid_config
from qcompile.lowering.w4a16_wgmma import unpack_pairs_reference
from qcompile.quant.int4 import PackedInt4, dequantize_int4, pack_int4_along_k, to_planes


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    words=st.sampled_from([8, 16]),
    n=st.sampled_from([8, 24, 128]),
    outliers=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_unpacking_matches_the_dequantized_weight(dtype, words, n, outliers, seed):
    """The kernel's unpacking (per lane quad t, byte t of each word permuted under two magic
    exponents, masked, minus the magic, then one FMA with the scale and offset) gives each
    weight at its k, within one 16-bit rounding of the float64 value."""
    gen = torch.Generator().manual_seed(seed)
    k = 8 * words
    codes = torch.randint(0, 16, (n, k), generator=gen)
    codes[0, :16] = torch.arange(16)  # every code
    scales = torch.rand(1, n, generator=gen) * 0.02 + 1e-3
    if outliers:
        scales[0, : max(1, n // 8)] *= 300
    scales = scales.to(dtype)
    offsets = (-(torch.randint(0, 16, (1, n), generator=gen)) * scales.float()).to(dtype)
    packed = PackedInt4(pack_int4_along_k(codes), scales, offsets, k)
    got = unpack_pairs_reference(packed.qweight, scales[0], offsets[0])
    want = dequantize_int4(packed, torch.float64)
    assert got.shape == (n, k)
    eps = {torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    bound = eps * (codes * scales.double().t() + offsets.double().t()).abs()
    assert ((got.double() - want).abs() <= bound).all()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    words=st.sampled_from([8, 16]),
    n=st.sampled_from([8, 24, 128]),
    outliers=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_int8_unpacking_gives_qoq_integer_weight_bit_for_bit(words, n, outliers, seed):
    """W4A8's unpacking (`_RS8_ASM`: a word's even or odd nibbles as bytes, times s2, minus
    z * s2 byte by byte with no borrows between bytes) gives each weight's (q - z) * s2 exactly,
    in the kernel's k order (`to_even_odd` per 8), for weights the QoQ quantizer made: every
    group scale and zero it produces, outlier rows included."""
    from qcompile.config import Scheme
    from qcompile.lowering.w4a16_wgmma import unpack_int8_reference
    from qcompile.quant.int4 import to_even_odd
    from qcompile.quant.w4a8 import int8_weight, quantize_weight_w4a8

    gen = torch.Generator().manual_seed(seed)
    k = 8 * words
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)
    if outliers:
        w[:, 3] *= 50  # one large input channel: s2 = 16 in its groups
        w[0] = torch.linspace(-1, 1, k)  # codes from 0 to 15
    p = quantize_weight_w4a8(w, Scheme(name="w4a8", group_size=k))
    got = unpack_int8_reference(p.qweight, p.group_scales[0], p.group_zeros[0])
    want = to_even_odd(int8_weight(p.qweight, p.group_scales, p.group_zeros, k), 8)
    assert got.dtype == torch.int8 and torch.equal(got.to(torch.int32), want)
    assert int(p.group_scales.max()) > 1  # (the multiply is exercised)


RS = ("wgmma_rs", "wgmma_rs_ws")


def test_wgmma_rs_is_offered_only_on_hopper_from_16_rows(monkeypatch):
    monkeypatch.setattr(lowering, "_wgmma_device", lambda: False)
    assert not [c for c in candidate_configs(64, 28672, 4096, 128) if c.kernel in RS]
    monkeypatch.setattr(lowering, "_wgmma_device", lambda: True)
    for m in (16, 32, 64, 256, 512, 1024):
        cands = [c for c in candidate_configs(m, 28672, 4096, 128) if c.kernel in RS]
        assert cands and all(valid_config(c, 4096, 128) for c in cands), m
        assert all(c.block_m == min(lowering.m_bucket(m), 256) for c in cands), m
        # the producer-warp variant everywhere, capped at 96 registers below 128 x rows
        ws = [c for c in cands if c.kernel == "wgmma_rs_ws"]
        assert ws and {c.max_registers for c in ws} == ({0} if m >= 128 else {96}), m
        one = [c for c in cands if c.block_k <= 128]
        two = [c for c in cands if c.block_k == 256]  # `_SUBTILES` (on): wgmma_rs only
        assert len(one) <= 12 and len(one) + len(two) == len(cands), m
        assert all(c.kernel == "wgmma_rs" for c in two) and bool(two) == (m <= 64), m
    # K-long shapes get split-K candidates (8192x28672 at M = 16 took 62.4 us split in 4)
    assert {c.split_k for c in candidate_configs(16, 8192, 28672, 128) if c.kernel in RS} == {
        1,
        2,
        4,
    }
    # group 64: 64-k tiles (one scale row per tile), and wgmma_rs tiles of two groups
    assert {
        (c.block_k, c.kernel == "wgmma_rs" or c.block_k == 64)
        for c in candidate_configs(64, 8192, 28672, 64)
        if c.kernel in RS
    } == {(64, True), (128, True)}
    # `_SUBTILES` (on): up to 64 x rows, also wgmma_rs tiles of two groups at 2 and 3 stages
    for m, g in ((16, 128), (64, 128), (64, 64), (256, 128)):
        rs = [c for c in candidate_configs(m, 8192, 28672, g) if c.kernel in RS]
        two = [c for c in rs if c.block_k == 2 * g]
        assert all(valid_config(c, 28672, g) for c in rs), (m, g)
        assert {(c.kernel, c.block_k, c.num_stages) for c in two} == (
            {("wgmma_rs", 2 * g, 2), ("wgmma_rs", 2 * g, 3)} if m <= 64 else set()
        ), (m, g)
    monkeypatch.setattr(lowering, "_SUBTILES", False)
    assert not [
        c for c in candidate_configs(16, 8192, 28672, 128) if c.kernel in RS and c.block_k == 256
    ]
    for m in (1, 8):
        assert not [c for c in candidate_configs(m, 28672, 4096, 128) if c.kernel in RS]


def test_pipe_only_where_it_was_timed_faster(monkeypatch):
    """`_pipe`: by default each wgmma is left in flight only in W4A16's producer-warp kernel at
    256 x rows (6-10% faster there on the H200, level or slower elsewhere); `_PIPE` True /
    False forces it for every wgmma kernel (tests, probes)."""
    ws256 = KernelConfig("wgmma_rs_ws", 256, 128, 64, 1, 8, 4)
    others = [
        KernelConfig("wgmma_rs", 256, 128, 64, 1, 8, 4),
        KernelConfig("wgmma_rs_ws", 128, 128, 64, 1, 8, 4),
        KernelConfig("wgmma_rs_ws", 16, 64, 128, 1, 4, 4, max_registers=96),
    ]
    assert w4a16_wgmma._PIPE is None
    assert w4a16_wgmma._pipe(ws256, False) and not w4a16_wgmma._pipe(ws256, True)
    assert not any(w4a16_wgmma._pipe(c, False) for c in others)
    for forced in (True, False):
        monkeypatch.setattr(w4a16_wgmma, "_PIPE", forced)
        assert all(w4a16_wgmma._pipe(c, w) == forced for c in [ws256, *others] for w in (0, 1))


@pytest.mark.parametrize("kind", RS)
def test_wgmma_rs_config_rules(kind):
    ok = KernelConfig(kind, 64, 128, 128, 1, 8, 4)
    assert valid_config(ok, 4096, 128)
    assert valid_config(ok, 4096, 4096)  # per channel: one scale row
    # a K tile of two groups (SUB = 2: two sub-tiles a stage, `_SUBTILES`), not of four; 256
    # k only that way, and each sub-tile counts against the registers as a K tile would
    assert valid_config(ok, 4096, 64) and not valid_config(ok, 4096, 32)
    assert valid_config(KernelConfig(kind, 16, 64, 256, 1, 4, 2), 4096, 128)
    assert valid_config(KernelConfig(kind, 64, 64, 256, 2, 4, 3), 4096, 128)
    assert not valid_config(KernelConfig(kind, 16, 64, 256, 1, 4, 2), 4096, 256)
    assert not valid_config(KernelConfig(kind, 16, 64, 256, 1, 4, 2), 4096, 4096)
    assert not valid_config(KernelConfig(kind, 256, 128, 256, 1, 8, 2), 4096, 128)
    assert valid_config(KernelConfig(kind, 16, 64, 128, 4, 4, 4), 4096, 128)
    assert not valid_config(KernelConfig(kind, 64, 128, 128, 3, 8, 4), 4096, 128)  # K % 3
    assert not valid_config(KernelConfig(kind, 64, 128, 128, 64, 8, 4), 4096, 128)  # 64 k
    assert not valid_config(KernelConfig(kind, 64, 128, 128, 1, 4, 4), 4096, 128)  # 32 rows/warp
    assert not valid_config(KernelConfig(kind, 48, 128, 128, 1, 8, 4), 4096, 128)  # wgmma N
    assert not valid_config(KernelConfig(kind, 64, 128, 128, 1, 8, 7), 4096, 128)  # stages
    assert not valid_config(KernelConfig(kind, 64, 128, 128, 1, 8, 4, True), 4096, 128)
    # 256 x rows with 128-k tiles would not fit the registers (accumulator + two W tiles)
    assert not valid_config(KernelConfig(kind, 256, 128, 128, 1, 8, 3), 4096, 128)
    # a register cap, not below 64 more than the accumulator (256 x rows: 128 fp32 a thread)
    assert valid_config(KernelConfig(kind, 16, 64, 128, 2, 4, 4, max_registers=96), 4096, 128)
    assert not valid_config(KernelConfig(kind, 16, 64, 128, 2, 4, 4, max_registers=32), 4096, 128)
    assert not valid_config(KernelConfig(kind, 256, 64, 64, 1, 4, 4, max_registers=160), 4096, 128)
    assert valid_config(KernelConfig(kind, 256, 64, 64, 1, 4, 4, max_registers=192), 4096, 128)
    # 8 warps + the producer's warpgroup = 384 threads: 168 registers each at most (65536),
    # a multiple of 8 (Triton refused 256 x rows at 192: "out of resource: threads"); 8 warps
    # alone take up to 255
    for regs, ok in ((168, True), (176, False), (132, False)):
        c = KernelConfig(kind, 128, 128, 64, 1, 8, 4, max_registers=regs)
        assert valid_config(c, 4096, 128) == (ok or (kind == "wgmma_rs" and regs == 176)), regs
    c = KernelConfig(kind, 256, 128, 64, 1, 8, 4, max_registers=192)
    assert valid_config(c, 4096, 128) == (kind == "wgmma_rs")  # (256 threads: 64K fits)
    big = KernelConfig(kind, 256, 128, 64, 1, 8, 4)
    assert valid_config(big, 4096, 128)
    assert lowering._wgmma_smem_bytes(big) <= lowering._SMEM_BYTES


def test_tma_reads_per_channel_scales_in_place():
    """Per-channel scales are one row, which torch may stride as (1, 1): TMA is handed the
    row's length rounded up to 16 bytes instead, so they need no fallback; a column slice
    that starts off 16 bytes does."""
    from qcompile.config import Scheme
    from qcompile.quant.rtn import quantize_weight_int4

    p = quantize_weight_int4(torch.randn(256, 512), Scheme(group_size=None), torch.float16)
    assert p.scales.shape == (1, 256)
    assert w4a16_wgmma.fits(p.qweight, p.scales, p.offsets)
    assert w4a16_wgmma._row_stride(p.scales[:, :250]) == 256
    assert not w4a16_wgmma.fits(p.qweight[:, 4:], p.scales[:, 4:], p.offsets[:, 4:])


def _problem(m, n, k, group, dtype, bias, seed=0):
    from strategies import LinearProblem

    from qcompile.config import Scheme
    from qcompile.quant.rtn import quantize_weight_int4

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    w[:, 5] *= 40  # an outlier input channel
    p = quantize_weight_int4(w, Scheme(group_size=group), dtype)
    p = type(p)(*(t.to(KERNEL_DEVICE) for t in (p.qweight, p.scales, p.offsets)), p.group_size)
    x = torch.randn(m, k, generator=gen)
    x[:, 7] *= 30
    x = x.to(dtype).to(KERNEL_DEVICE)
    b = torch.randn(n, generator=gen).to(dtype).to(KERNEL_DEVICE) if bias else None
    return LinearProblem(x, w, p, b, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", RS)
@pytest.mark.parametrize(
    "m,n,k,group,dtype,bias,cfg",
    [
        (64, 256, 1024, 128, torch.float16, False, (64, 128, 128, 1, 8, 4)),
        (33, 320, 512, 128, torch.float16, True, (64, 64, 128, 1, 4, 4)),  # N past the tile
        (200, 384, 768, 64, torch.bfloat16, True, (128, 128, 64, 1, 8, 4)),  # M past the tile
        (256, 256, 2048, None, torch.float16, True, (256, 128, 64, 2, 8, 3)),  # per channel
        (64, 512, 4096, 128, torch.bfloat16, False, (16, 64, 128, 4, 4, 4)),  # M > BLOCK_M
        (1, 128, 256, 128, torch.float16, True, (16, 128, 64, 2, 8, 2)),  # one row
        (300, 192, 512, 128, torch.bfloat16, False, (256, 64, 64, 1, 4, 4)),  # 2 M tiles
    ],
)
def test_wgmma_rs_on_cuda_matches_float64_reference(kind, m, n, k, group, dtype, bias, cfg):
    problem = _problem(m, n, k, group, dtype, bias)  # group None: per channel
    p = problem.packed
    c = KernelConfig(kind, *cfg)
    assert valid_config(c, k, p.group_size)
    assert w4a16_wgmma.fits(p.qweight, p.scales, p.offsets)  # (no fallback to dequant_mm)
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    launch(c, problem.x, p.qweight, p.scales, p.offsets, problem.bias, p.group_size, out=out)
    assert_close_rel(out, problem.reference64(), dtype)
    # x as a column slice of a wider tensor (TMA reads its row stride), and plane-major x
    wide = torch.zeros(m, k + 64, dtype=dtype, device="cuda")
    wide[:, 32 : 32 + k] = problem.x
    out2 = launch(c, wide[:, 32 : 32 + k], p.qweight, p.scales, p.offsets, problem.bias,
                  p.group_size)  # fmt: skip
    assert torch.equal(out2, out)
    if k % 128 == 0:
        out3 = launch(c, to_planes(problem.x), p.qweight, p.scales, p.offsets, problem.bias,
                      p.group_size, x_planes=True)  # fmt: skip
        assert torch.equal(out3, out)
    # the producer-warp variant computes the same sums in the same order
    other = KernelConfig(RS[1 - RS.index(kind)], *cfg)
    out4 = launch(other, problem.x, p.qweight, p.scales, p.offsets, problem.bias, p.group_size)
    assert torch.equal(out4, out)


@pytest.mark.gpu
def test_wgmma_rs_on_unaligned_weight_slices_falls_back_to_dequant_mm():
    """Column slices of a wider packed weight (sibling fusion) whose start TMA cannot read
    (not 16-byte aligned) run dequantize + cuBLAS instead: the same numbers."""
    problem = _problem(64, 260, 512, 128, torch.float16, False)
    p = problem.packed
    sl = slice(4, 260)  # qweight starts 16 bytes in, scales 8: scales are not aligned
    q, s, o = p.qweight[:, sl], p.scales[:, sl], p.offsets[:, sl]
    c = KernelConfig("wgmma_rs", 64, 128, 64, 1, 8, 4)
    out = launch(c, problem.x, q, s, o, None, 128)
    ref = launch(lowering._dequant_mm_config(512), problem.x, q, s, o, None, 128)
    assert torch.equal(out, ref)


def test_launch_layouts_are_built_once_and_match_what_the_gpu_ran():
    """The descriptors' layouts are cached per (BLOCK_M, BLOCK_K, dtype). x's tile is 128-byte
    swizzled; the words and scale rows are unswizzled (the layouts the H100 runs used)."""
    x_layout, flat32, flat16 = w4a16_wgmma._layouts(128, 64, torch.float16)
    assert w4a16_wgmma._layouts(128, 64, torch.float16)[0] is x_layout
    assert x_layout.swizzle_byte_width == 128 and x_layout.element_bitwidth == 16
    assert (flat32.swizzle_byte_width, flat32.element_bitwidth) == (0, 32)
    assert (flat16.swizzle_byte_width, flat16.element_bitwidth) == (0, 16)
    assert w4a16_wgmma._layouts(64, 128, torch.bfloat16)[0].swizzle_byte_width == 128


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kind,cfg",
    [
        ("wgmma_rs_ws", (33, 320, 512, None, torch.float16, True, (64, 128, 128, 1, 8, 4))),
        ("wgmma_rs_ws", (16, 512, 4096, 128, torch.float16, False, (16, 64, 128, 2, 4, 4))),
        ("wgmma_rs_ws", (64, 512, 640, 128, torch.bfloat16, True, (64, 64, 128, 1, 4, 4))),
        # (uncapped, ptxas gives this one 118 registers; at 96 it serializes the wgmmas for
        # 72. Caps of 80 / 88, which keep them asynchronous, were no faster: session 38)
        ("wgmma_rs", (16, 512, 4096, 128, torch.float16, False, (16, 64, 128, 2, 4, 4))),
        ("wgmma_rs", (13, 320, 640, 128, torch.bfloat16, True, (16, 64, 128, 1, 4, 4))),
    ],
)
def test_wgmma_rs_register_cap_changes_no_bits(kind, cfg):
    """Both kernels capped (Triton's maxnreg; 96 as the producer-warp kernel's small-M
    candidates are): the same sums in the same order as uncapped, bit for bit (the 5-tile K
    loops end on the unrolled loop's odd step)."""
    m, n, k, group, dtype, bias, tile = cfg
    problem = _problem(m, n, k, group, dtype, bias)
    p = problem.packed
    args = (problem.x, p.qweight, p.scales, p.offsets, problem.bias, p.group_size)
    plain = launch(KernelConfig(kind, *tile), *args)
    c = KernelConfig(kind, *tile, max_registers=96)
    assert valid_config(c, k, p.group_size)
    out = launch(c, *args)
    assert_close_rel(out, problem.reference64(), dtype)
    assert torch.equal(out, plain)


def test_pair_rows_relabel_and_the_epilogue_mapping_invert_each_other():
    """`PAIRS` (W4A16's wgmma_rs): the loads' relabel (`_pairs_to_rows`, done here with the same reshape and
    permute in torch) calls actual row 16a + 2g + b "16a + 8b + g"; the epilogue's index
    formula must send each accumulator row back to the row it holds."""
    n = 128
    actual = torch.arange(n)
    logical = actual.reshape(n // 16, 8, 2).permute(0, 2, 1).reshape(n)  # row n' holds this
    rows = torch.arange(n)
    back = rows // 16 * 16 + rows % 8 * 2 + rows // 8 % 2  # (the kernel's epilogue)
    assert torch.equal(back, logical)
    # lane 4g + t holds wgmma rows g and g + 8 of each 16: actual rows 2g and 2g + 1
    g = torch.arange(8)
    assert torch.equal(logical[g], 2 * g) and torch.equal(logical[g + 8], 2 * g + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", RS)
@pytest.mark.parametrize(
    "cfg",
    [
        (16, 512, 4096, 128, torch.float16, False, (16, 64, 128, 2, 4, 4)),
        (13, 320, 640, 128, torch.bfloat16, True, (16, 64, 128, 1, 4, 4)),  # odd K loop
        (200, 384, 768, 64, torch.bfloat16, True, (128, 128, 64, 1, 8, 4)),
        (300, 192, 512, None, torch.float16, False, (256, 64, 64, 1, 4, 2)),  # 2 stages
        (512, 256, 2048, 128, torch.float16, False, (256, 128, 64, 1, 8, 4)),
    ],
)
def test_wgmma_rs_pipe_changes_no_bits(monkeypatch, kind, cfg):
    """`_PIPE` (each wgmma left in flight while the next is issued; a stage handed back one
    step later): the same wgmmas in the same order, so the same bits as without it, with
    and without the producer warp (2 stages: the tightest hand-back)."""
    m, n, k, group, dtype, bias, tile = cfg
    problem = _problem(m, n, k, group, dtype, bias)
    p = problem.packed
    args = (problem.x, p.qweight, p.scales, p.offsets, problem.bias, p.group_size)
    c = KernelConfig(
        kind, *tile, max_registers=96 if kind == "wgmma_rs_ws" and tile[0] < 128 else 0
    )
    assert valid_config(c, k, p.group_size)
    plain = launch(c, *args)
    monkeypatch.setattr(w4a16_wgmma, "_PIPE", True)
    out = launch(c, *args)
    assert_close_rel(out, problem.reference64(), dtype)
    assert torch.equal(out, plain)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", RS)
@pytest.mark.parametrize("pipe", [False, True])
@pytest.mark.parametrize(
    "cfg",
    [
        (16, 512, 4096, 128, torch.float16, False, (16, 64, 256, 2, 4, 2)),
        (13, 320, 1280, 128, torch.bfloat16, True, (16, 64, 256, 1, 4, 3)),  # 5 K tiles
        (64, 384, 768, 64, torch.float16, True, (64, 128, 128, 1, 8, 2)),  # group 64
    ],
)
def test_wgmma_rs_two_group_tiles_change_no_bits(monkeypatch, kind, pipe, cfg):
    """K tiles of two groups (`_SUBTILES`: one TMA stage, two sub-tiles): the same wgmmas in
    the same order as tiles of one group, so the same bits, with and without the producer
    warp and `_PIPE`."""
    m, n, k, group, dtype, bias, tile = cfg
    problem = _problem(m, n, k, group, dtype, bias)
    p = problem.packed
    args = (problem.x, p.qweight, p.scales, p.offsets, problem.bias, p.group_size)
    regs = 96 if kind == "wgmma_rs_ws" and tile[0] < 128 else 0
    two = KernelConfig(kind, *tile, max_registers=regs)
    bm, bn, bk, split, warps, stages = tile
    one = KernelConfig(kind, bm, bn, bk // 2, split, warps, 2 * stages, max_registers=regs)
    assert valid_config(two, k, group) and valid_config(one, k, group)
    monkeypatch.setattr(w4a16_wgmma, "_PIPE", pipe)
    out = launch(two, *args)
    assert_close_rel(out, problem.reference64(), dtype)
    assert torch.equal(out, launch(one, *args))
