"""W4A16 Triton kernels vs the float64 reference: in the interpreter on CPU, natively on a GPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import KERNEL_DEVICE
from helpers import assert_close_rel, record_row_chunks, tune_with_default
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from strategies import linear_problems

from qcompile.lowering import w4a16 as lowering
from qcompile.lowering.autotune import KernelConfig
from qcompile.lowering.w4a16 import candidate_configs, default_config, launch, valid_config
from qcompile.quant.int4 import PLANE_CHUNK, to_planes

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _run(problem, cfg: KernelConfig, x_planes: bool = False) -> torch.Tensor:
    p = problem.packed
    m, n = problem.x.shape[0], p.shape[0]
    out = torch.full((m, n), float("nan"), dtype=problem.dtype, device=KERNEL_DEVICE)  # poison
    x = to_planes(problem.x) if x_planes else problem.x
    return launch(
        cfg, x, p.qweight, p.scales, p.offsets, problem.bias, p.group_size, out=out,
        x_planes=x_planes,
    )  # fmt: skip


@SETTINGS
@given(problem=linear_problems(device=KERNEL_DEVICE), data=st.data())
def test_every_candidate_config_matches_float64_reference(problem, data):
    """Any config autotuning may pick (GEMV, GEMM, split-K, BLOCK_K above/below the group),
    with x in natural or (K a multiple of PLANE_CHUNK) plane-major order."""
    m, k = problem.x.shape
    n = problem.packed.shape[0]
    configs = candidate_configs(m, n, k, problem.packed.group_size)
    assert configs, f"no valid config for M={m} N={n} K={k} G={problem.packed.group_size}"
    cfg = data.draw(st.sampled_from(configs), label="config")
    x_planes = k % PLANE_CHUNK == 0 and data.draw(st.booleans(), label="x_planes")
    assert_close_rel(_run(problem, cfg, x_planes), problem.reference64(), problem.dtype)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=linear_problems(device=KERNEL_DEVICE))
def test_default_config_matches_float64_reference(problem):
    """The untuned fallback config (used during CUDA-graph capture) is valid for every shape."""
    m, k = problem.x.shape
    n = problem.packed.shape[0]
    cfg = default_config(m, n, k, problem.packed.group_size)
    assert_close_rel(_run(problem, cfg), problem.reference64(), problem.dtype)


@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_strided_activations(kernel):
    """x may be a non-contiguous view (row stride != K, column stride != 1)."""
    from strategies import LinearProblem

    from qcompile.config import Scheme
    from qcompile.quant.rtn import quantize_weight_int4

    gen = torch.Generator().manual_seed(0)
    m, n, k = 3, 32, 64
    w = torch.randn(n, k, generator=gen)
    base = torch.randn(k, 2 * m, generator=gen).to(torch.float16).to(KERNEL_DEVICE)
    x = base[:, ::2].t()  # [M, K] with strides (2, 2M)
    assert not x.is_contiguous()
    p = quantize_weight_int4(w, Scheme(group_size=32), torch.float16)
    p = type(p)(*(t.to(KERNEL_DEVICE) for t in (p.qweight, p.scales, p.offsets)), p.group_size)
    problem = LinearProblem(x, w, p, None, torch.float16)
    cfg = KernelConfig(kernel, 16, 16, 32, 2, 4, 1)
    assert_close_rel(_run(problem, cfg), problem.reference64(), torch.float16)


def _pow2(v):
    return v > 0 and v & (v - 1) == 0


@pytest.mark.parametrize(
    ("m", "k", "g"), [(1, 4096, 128), (64, 576, 64), (1024, 1536, 32), (1, 4096, 4096), (3, 96, 96)]
)
def test_configs_have_power_of_two_tiles_aligned_to_groups(m, k, g):
    """Triton needs power-of-two ranges; the interpreter does not enforce it, so we must."""
    for cfg in [*candidate_configs(m, 512, k, g), default_config(m, 512, k, g)]:
        assert _pow2(cfg.block_n) and _pow2(cfg.block_k), cfg
        if cfg.kernel == "dequant_mm":
            assert (k // 8) % cfg.block_k == 0
            continue
        assert _pow2(cfg.block_m)
        assert k % cfg.split_k == 0 and (k // cfg.split_k) % cfg.block_k == 0
        assert g % cfg.block_k == 0 or cfg.block_k % g == 0
        assert (
            cfg.kernel in ("gemm", "gemm_swap", *lowering._PLANES_KINDS, *lowering._WGMMA_KINDS)
            or m <= 4
            or (cfg.kernel == "mma" and m <= 64)
        )
        assert cfg.kernel != "gemm_planes_direct" or cfg.block_m >= 64


@pytest.mark.parametrize("group", [32, 128])
def test_dequantize_then_matmul_strategy(group):
    """The large-M strategy (dequantize to [K, N], then cuBLAS/CPU matmul) is exact."""
    from strategies import LinearProblem

    from qcompile.config import Scheme
    from qcompile.quant.rtn import quantize_weight_int4

    gen = torch.Generator().manual_seed(group)
    m, n, k = 5, 48, 256
    w = torch.randn(n, k, generator=gen)
    p = quantize_weight_int4(w, Scheme(group_size=group), torch.float16)
    p = type(p)(*(t.to(KERNEL_DEVICE) for t in (p.qweight, p.scales, p.offsets)), p.group_size)
    x = torch.randn(m, k, generator=gen).to(torch.float16).to(KERNEL_DEVICE)
    bias = torch.randn(n, generator=gen).to(torch.float16).to(KERNEL_DEVICE)
    problem = LinearProblem(x, w, p, bias, torch.float16)
    cfg = KernelConfig("dequant_mm", 0, 16, 8, 1, 4, 1)
    assert_close_rel(_run(problem, cfg), problem.reference64(), torch.float16)


@pytest.mark.parametrize(
    "cfg",
    [
        KernelConfig("gemv", 1, 64, 64, 2, 2, 1),
        KernelConfig("gemv", 1, 32, 32, 2, 1, 1),  # BLOCK_K a quarter of a plane chunk
        KernelConfig("gemm", 16, 32, 64, 2, 4, 2),
        KernelConfig("gemm_swap", 16, 32, 64, 2, 4, 2),
        KernelConfig("gemm_swap", 16, 32, 128, 1, 4, 2),  # BLOCK_K > group: per-column scales
        KernelConfig("gemm_planes", 16, 32, 128, 2, 4, 2),  # BLOCK_K > group: per-row scales
        KernelConfig("gemm_planes", 16, 32, 128, 1, 4, 2),
        KernelConfig("gemm_planes", 16, 32, 256, 1, 4, 2),  # BLOCK_K two plane chunks
        KernelConfig("gemm_planes_xreg", 16, 32, 128, 2, 4, 2),  # per-row scales, split
        KernelConfig("gemm_planes_xreg", 16, 32, 128, 1, 4, 2),
        KernelConfig("gemm_planes_direct", 16, 32, 128, 2, 4, 2),  # per-row scales, split
        KernelConfig("gemm_planes_direct", 16, 32, 128, 1, 4, 2),
        KernelConfig("dequant_mm", 0, 32, 4, 1, 4, 1),
        KernelConfig("mma", 16, 64, 128, 2, 2, 1),  # 2 tiles per warp; BLOCK_K > group at g64
        KernelConfig("mma", 16, 64, 64, 1, 1, 1),  # 4 tiles per warp
        KernelConfig("mma", 8, 32, 32, 2, 1, 1),  # one B tile, one 32-k step per iteration
        KernelConfig("mma", 32, 64, 64, 2, 2, 1),  # 4 B tiles (32 rows), split
        KernelConfig("mma", 64, 32, 128, 1, 1, 1),  # 8 B tiles (64 rows), BLOCK_K > group at g64
        KernelConfig("mma", 16, 64, 128, 2, 2, 1, True),  # next BLOCK_K loaded first, split
        KernelConfig("mma", 32, 64, 64, 1, 2, 1, True),
        KernelConfig("mma", 16, 64, 64, 1, 2, 1, 2),  # prefetch of words and scales only
    ],
    ids=lambda c: f"{c.kernel}-bn{c.block_n}-bk{c.block_k}-sk{c.split_k}-pf{int(c.prefetch)}",
)
@pytest.mark.parametrize("x_planes", [False, True])
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_each_kernel_kind_with_bias(cfg, dtype, group, x_planes):
    from strategies import LinearProblem

    from qcompile.config import Scheme
    from qcompile.quant.rtn import quantize_weight_int4

    gen = torch.Generator().manual_seed(7)
    m, n, k = {"gemv": 3, "mma": cfg.block_m - 3}.get(cfg.kernel, 19), 40, 256
    w = torch.randn(n, k, generator=gen)
    p = quantize_weight_int4(w, Scheme(group_size=group), dtype)
    p = type(p)(*(t.to(KERNEL_DEVICE) for t in (p.qweight, p.scales, p.offsets)), p.group_size)
    x = torch.randn(m, k, generator=gen).to(dtype).to(KERNEL_DEVICE)
    bias = torch.randn(n, generator=gen).to(dtype).to(KERNEL_DEVICE)
    problem = LinearProblem(x, w, p, bias, dtype)
    assert_close_rel(_run(problem, cfg, x_planes), problem.reference64(), dtype)


SPLIT_CONFIGS = [
    KernelConfig("gemv", 1, 32, 32, 4, 1, 1),
    KernelConfig("gemv", 1, 64, 64, 2, 2, 1, True),
    KernelConfig("gemv", 1, 32, 16, 16, 1, 1),  # two chunks of the 8-wide unrolled sum
    KernelConfig("gemm", 16, 32, 64, 2, 4, 2),
    KernelConfig("gemm_swap", 16, 16, 32, 8, 4, 2),
    KernelConfig("gemm_planes", 16, 32, 128, 2, 4, 2),
    KernelConfig("gemm_planes_xreg", 16, 32, 128, 2, 4, 2),
    KernelConfig("mma", 16, 64, 64, 4, 2, 1),
    KernelConfig("mma", 64, 64, 64, 4, 2, 1),
    KernelConfig("mma", 16, 64, 32, 4, 2, 1, True),
]


def _packed_problem(m, n, k, group, dtype, seed, bias=True):
    from strategies import LinearProblem

    from qcompile.config import Scheme
    from qcompile.quant.rtn import quantize_weight_int4

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    w[:, 3] *= 30  # an outlier input channel
    p = quantize_weight_int4(w, Scheme(group_size=group), dtype)
    p = type(p)(*(t.to(KERNEL_DEVICE) for t in (p.qweight, p.scales, p.offsets)), p.group_size)
    x = torch.randn(m, k, generator=gen).to(dtype).to(KERNEL_DEVICE)
    b = torch.randn(n, generator=gen).to(dtype).to(KERNEL_DEVICE) if bias else None
    return LinearProblem(x, w, p, b, dtype)


@pytest.mark.parametrize(
    "cfg", SPLIT_CONFIGS, ids=lambda c: f"{c.kernel}-sk{c.split_k}-pf{int(c.prefetch)}"
)
def test_split_k_reduces_in_one_launch(cfg):
    """The last program of each tile sums the partials: same bits as the two-launch
    reduction, every tile counter re-armed to zero, and a second launch is right too."""
    from qcompile.lowering import w4a16 as lowering

    m = {"gemv": 3, "mma": cfg.block_m - 3}.get(cfg.kernel, 21)
    problem = _packed_problem(m, 96, 256, 64, torch.float16, 3)
    p = problem.packed
    args = (problem.x, p.qweight, p.scales, p.offsets, problem.bias, p.group_size)
    two_launch = launch(cfg, *args, self_reduce=False)
    one_launch = launch(cfg, *args)
    assert torch.equal(one_launch, two_launch)
    assert_close_rel(one_launch, problem.reference64(), torch.float16)
    counters = lowering._counters[torch.device(problem.x.device.type, problem.x.device.index)]
    assert int(counters.abs().sum()) == 0
    assert torch.equal(launch(cfg, *args), two_launch)


@pytest.mark.parametrize(
    "split,unroll,rows,m,prefetch",
    [(4, 8, 8, 5, False), (8, 8, 8, 5, False), (16, 8, 8, 5, False), (8, 3, 8, 5, False),
     (8, 8, 16, 13, True), (4, 8, 16, 16, False)],
)  # fmt: skip
def test_lane_split_k_sum_with_partials_in_flight(split, unroll, rows, m, prefetch):
    """The lane kernel's one-launch sum with `unroll` partials' loads in flight (masked past
    the split count) adds them in split order: the two-launch reduction's bits, at 8 and 16
    rows (a tuning candidate at both), with and without the prefetch."""
    cfg = KernelConfig("mma", rows, 64, 32, split, 2, 1, prefetch)
    problem = _packed_problem(m, 96, 32 * 16, 32, torch.float16, split)
    p = problem.packed
    args = (problem.x, p.qweight, p.scales, p.offsets, problem.bias, p.group_size)
    two_launch = launch(cfg, *args, self_reduce=False)
    assert torch.equal(launch(cfg, *args, reduce_unroll=unroll), two_launch)
    assert torch.equal(launch(cfg, *args, reduce_unroll=1), two_launch)
    if unroll in (4, 8):  # the same through the config, as tuning picks it
        tuned = replace(cfg, reduce=f"unroll{unroll}")
        assert valid_config(tuned, 32 * 16, 32)
        assert torch.equal(launch(tuned, *args), two_launch)
    assert_close_rel(two_launch, problem.reference64(), torch.float16)


@pytest.mark.parametrize(
    "rows,bk,group,split,prefetch,m",
    [(8, 32, 32, 4, True, 1), (8, 64, 32, 2, True, 3), (16, 32, 64, 1, True, 16),
     (16, 64, 32, 2, False, 9), (32, 32, 32, 1, True, 20)],
)  # fmt: skip
def test_lane_kernel_under_pdl_gives_the_same_bits(rows, bk, group, split, prefetch, m):
    """`pdl` (programmatic dependent launch): the first weights are loaded before the wait
    and x after it, which must not change a bit, with and without the prefetch, BLOCK_K
    within or across groups, split or not; only the lane and wgmma_rs kernels take it."""
    cfg = KernelConfig("mma", rows, 64, bk, split, 2, 1, prefetch)
    problem = _packed_problem(m, 96, 64 * 4, group, torch.float16, rows + bk + split)
    p = problem.packed
    args = (problem.x, p.qweight, p.scales, p.offsets, problem.bias, p.group_size)
    assert valid_config(cfg, 64 * 4, group)
    plain = launch(cfg, *args)
    assert torch.equal(launch(cfg, *args, pdl=True), plain)
    assert_close_rel(plain, problem.reference64(), torch.float16)
    with pytest.raises(ValueError, match="pdl is for the lane kernel, not gemm"):
        launch(replace(cfg, kernel="gemm", block_m=16, num_stages=2), *args, pdl=True)


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", [False, True])
def test_lane_pdl_chain_on_cuda_waits_for_its_producer(prefetch):
    """On the GPU, in a CUDA graph: a kernel writes x, then the lane kernel under PDL reads
    it (its first weights loaded before the wait), then another PDL launch reuses the
    split-K workspace and counters. Every output equals the plain launch's bits; a read of
    x before the wait would see the previous replay's x (the graph negates it each time)."""
    cfg = KernelConfig("mma", 16, 128, 128, 4, 4, 1, prefetch)
    problem = _packed_problem(16, 4096, 4096, 128, torch.float16, 7, bias=False)
    p = problem.packed
    w = (p.qweight, p.scales, p.offsets, None, p.group_size)
    x = problem.x.clone()
    outs = [torch.empty(16, 4096, dtype=torch.float16, device="cuda") for _ in range(2)]

    def step(pdl):
        x.mul_(-1.0)  # the producer: a plain kernel right before the GEMM
        launch(cfg, x, *w, out=outs[0], pdl=pdl)
        launch(cfg, outs[0][:, :4096], *w, out=outs[1], pdl=pdl)

    want = []
    for _ in range(3):
        step(False)
        want.append([o.clone() for o in outs])
    x.copy_(problem.x)
    step(True)  # warm-up (compiles) outside the capture
    x.copy_(problem.x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(True)
    x.copy_(problem.x)
    for i in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(o, w_) for o, w_ in zip(outs, want[i], strict=True)), i


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [16, 32, 64])
def test_lane_row_blocks_on_cuda(rows):
    """On the GPU (PTX, not the emulation): 40 rows in row blocks of 16 or 32, or one block
    of 64, split K in one launch, within the float64 reference (passed on the H100,
    `results/session34/pdltests/`)."""
    cfg = KernelConfig("mma", rows, 128, 64, 2, 4, 1, True)
    problem = _packed_problem(40, 4096, 4096, 128, torch.float16, rows, bias=False)
    p = problem.packed
    out = launch(cfg, problem.x, p.qweight, p.scales, p.offsets, None, p.group_size)
    assert_close_rel(out, problem.reference64(), torch.float16)


@pytest.mark.parametrize(("m", "kernel"), [(5, "mma"), (1, "gemv")])  # the defaults there
@pytest.mark.parametrize("switch", [False, True])
def test_lane_pdl_switch_reaches_the_launch(cpu_tuner, monkeypatch, switch, m, kernel):
    """`_LANE_PDL` decides whether the op's lane-kernel launches (and the tuner's timed runs)
    use programmatic dependent launch; other kernels never do."""
    tune_with_default(monkeypatch, lowering)
    monkeypatch.setattr(lowering, "_LANE_PDL", switch)
    seen = []
    real = lowering.launch

    def record(cfg, *args, **kwargs):
        seen.append((cfg.kernel, kwargs.get("pdl", False)))
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(lowering, "launch", record)
    problem = _packed_problem(m, 64, 256, 32, torch.float16, 0, bias=False)
    p = problem.packed
    out = lowering.w4a16_linear_cuda(problem.x, p.qweight, p.scales, p.offsets, None, 32)
    assert_close_rel(out, problem.reference64(), torch.float16)
    assert seen == [(kernel, switch and kernel == "mma")] * 2  # the tuner's run, the op's


def test_lane_sum_choice_is_valid_only_where_the_lane_kernel_splits_k():
    """`reduce="unroll8"` is a lane-kernel split-K option: a tuning candidate at 8 and 16 rows, refused
    unsplit, on other kernels and in W4A8's spelling ("atomic")."""
    lane = KernelConfig("mma", 8, 128, 128, 8, 4, 1, reduce="unroll8")
    assert valid_config(lane, 4096, 128)
    assert not valid_config(replace(lane, split_k=1), 4096, 128)
    assert not valid_config(replace(lane, reduce="atomic"), 4096, 128)
    assert not valid_config(KernelConfig("gemv", 1, 256, 64, 8, 2, 1, reduce="unroll8"), 4096, 128)
    cands = candidate_configs(1, 8192, 4096, 128)
    unrolled = [c for c in cands if c.reduce]
    assert unrolled and all(c.kernel == "mma" and c.split_k > 1 for c in unrolled)
    assert all(valid_config(c, 4096, 128) for c in cands)
    sixteen = [c for c in candidate_configs(16, 8192, 4096, 128) if c.reduce]
    assert {c.prefetch for c in sixteen} == {False, True}  # at 16 rows with and without
    assert all(c.block_m == 16 and valid_config(c, 4096, 128) for c in sixteen)
    assert not any(c.reduce for c in candidate_configs(32, 8192, 4096, 128))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("split", [1, 2])
def test_planes_kernel_at_large_m(split, dtype):
    """The large-M planes candidates: several M tiles (the last one partial) walk each weight
    tile back to back, with per-row scales (BLOCK_K > group) and split-K counters per tile."""
    problem = _packed_problem(130, 72, 512, 64, dtype, 11)
    cfg = KernelConfig("gemm_planes", 64, 32, 128, split, 4, 2)
    p = problem.packed
    out = launch(cfg, problem.x, p.qweight, p.scales, p.offsets, problem.bias, p.group_size)
    assert_close_rel(out, problem.reference64(), dtype)


def test_large_m_candidates_include_the_planes_kernel():
    kinds = {(c.kernel, c.block_m) for c in candidate_configs(1024, 8192, 28672, 128)}
    assert {("gemm_planes", 128), ("gemm_planes", 256), ("dequant_mm", 0)} <= kinds
    assert not any(
        c.kernel == "gemm_planes" and c.block_m > 128
        for c in candidate_configs(128, 8192, 4096, 128)
    )


@pytest.mark.parametrize(
    "cfg",
    [*SPLIT_CONFIGS, KernelConfig("gemv", 1, 32, 64, 1, 1, 1), KernelConfig("dequant_mm", 0, 32, 4, 1, 4, 1)],
    ids=lambda c: f"{c.kernel}-sk{c.split_k}",
)  # fmt: skip
def test_column_slices_of_colocated_weights(cfg):
    """Sibling layers' packed weights may be column slices of one wider tensor (one storage,
    row stride = the summed N): each slice computes exactly what its own contiguous copy does."""
    m = {"gemv": 3, "mma": 13}.get(cfg.kernel, 21)
    a = _packed_problem(m, 64, 256, 64, torch.bfloat16, 5)
    b = _packed_problem(m, 32, 256, 64, torch.bfloat16, 6)
    b.x.copy_(a.x)  # siblings share their input
    parts = [(p.qweight, p.scales, p.offsets) for p in (a.packed, b.packed)]
    wide = [torch.cat(pair, dim=1) for pair in zip(*parts, strict=True)]
    for problem, cols in ((a, slice(0, 64)), (b, slice(64, 96))):
        views = [t[:, cols] for t in wide]
        assert views[0].stride(0) == 96 and not views[0].is_contiguous()
        p = problem.packed
        got = launch(cfg, problem.x, *views, problem.bias, p.group_size)
        want = launch(cfg, problem.x, p.qweight, p.scales, p.offsets, problem.bias, p.group_size)
        assert torch.equal(got, want)
        assert_close_rel(got, problem.reference64(), torch.bfloat16)


@pytest.mark.parametrize(("bm", "bn", "bk", "stages", "group", "fits"), [
    (16, 128, 128, 3, 64, False),  # 303104 bytes on the H100 (OutOfResources)
    (16, 128, 128, 3, 128, True),
    (64, 256, 128, 2, 128, True),
    (16, 256, 128, 2, 64, False),
])  # fmt: skip
def test_gemm_configs_over_shared_memory_are_invalid(bm, bn, bk, stages, group, fits):
    """The tuner would skip them, but every candidate must run: the tests draw from them."""
    cfg = KernelConfig("gemm", bm, bn, bk, 1, 8, stages)
    assert valid_config(cfg, 4096, group) is fits
    assert (cfg in candidate_configs(16 if bm == 16 else 64, 4096, 4096, group)) <= fits


# (rows, warps, tiles per warp, BLOCK_K): shapes candidate_configs offers past 16 rows, and 8
# and 16 rows to run M up to 64 as several row blocks
WIDE_MMA = [
    (8, 2, 2, 128),
    (16, 1, 2, 64),
    (32, 2, 2, 128),
    (32, 1, 4, 64),
    (64, 2, 2, 64),
    (64, 1, 2, 128),
]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=linear_problems(device=KERNEL_DEVICE, max_m=64), data=st.data())
def test_lane_mma_row_blocks_match_float64_reference(problem, data):
    """8 to 64 rows per program (one unpacked weight fragment feeding 1 to 8 mma B tiles),
    any M up to 64 in as many row blocks as it takes (rows past M read row M - 1 and are
    not stored), split or not."""
    m, k = problem.x.shape
    group = problem.packed.group_size or k
    rows, warps, tiles, bk = data.draw(st.sampled_from(WIDE_MMA), label="shape")
    split = data.draw(st.sampled_from([1, 2]), label="split")
    prefetch = data.draw(st.booleans(), label="prefetch")
    cfg = KernelConfig("mma", rows, 16 * tiles * warps, bk, split, warps, 1, prefetch)
    assume(valid_config(cfg, k, group))
    x_planes = k % PLANE_CHUNK == 0 and data.draw(st.booleans(), label="x_planes")
    assert_close_rel(_run(problem, cfg, x_planes), problem.reference64(), problem.dtype)


def test_lane_mma_candidates_cover_32_and_64_rows_with_and_without_prefetch():
    """Tuning offers the lane-MMA kernel up to 64 rows, each shape with and without the
    next-BLOCK_K prefetch (which won at 32 and 64 rows on the H200 and lost at some 16)."""
    wide = [c for c in candidate_configs(64, 4096, 4096, 128) if c.kernel == "mma"]
    assert wide and {c.block_m for c in wide} == {64}
    assert all(c.block_n == 32 * c.num_warps for c in wide)  # 8 B tiles: 2 A tiles per warp
    assert {c.block_m for c in candidate_configs(32, 4096, 4096, 128) if c.kernel == "mma"} == {32}
    for m in (1, 16, 32, 64):
        mma = [  # (the split-K sum's unroll is a choice of its own, without prefetch)
            c for c in candidate_configs(m, 8192, 28672, 128) if c.kernel == "mma" and not c.reduce
        ]
        with_pf = {replace(c, prefetch=False) for c in mma if c.prefetch}
        assert with_pf and with_pf == {c for c in mma if not c.prefetch}
    assert not [c for c in candidate_configs(65, 4096, 4096, 128) if c.kernel == "mma"]


def test_prefetch_is_on_or_off():
    """KernelConfig.prefetch is 0/1 (False/True, as older cache files wrote it); any other
    level is refused (words-only prefetch was measured slower on the H200 and removed)."""
    assert valid_config(KernelConfig("mma", 16, 128, 128, 1, 4, 1, True), 4096, 128)
    assert not valid_config(KernelConfig("mma", 16, 128, 128, 1, 4, 1, 2), 4096, 128)
    assert not valid_config(KernelConfig("gemv", 1, 128, 64, 1, 1, 1, 2), 4096, 128)
    levels = {c.prefetch for c in candidate_configs(16, 4096, 4096, 128) if c.kernel == "mma"}
    assert levels == {0, 1}


@pytest.mark.parametrize("rows,m,split", [(8, 37, 1), (16, 37, 2), (16, 48, 4), (32, 65, 2)])
def test_lane_kernel_runs_rows_past_its_tile_as_row_blocks(rows, m, split):
    """M past BLOCK_M runs as further programs, one per row block and column block, each
    split-K tile with its own counter: within the float64 reference, the one-launch sum
    gives the two-launch reduction's bits and re-arms every counter."""
    cfg = KernelConfig("mma", rows, 64, 64, split, 2, 1, True)
    problem = _packed_problem(m, 96, 64 * 4, 64, torch.float16, rows + m)
    p = problem.packed
    args = (problem.x, p.qweight, p.scales, p.offsets, problem.bias, p.group_size)
    one_launch = launch(cfg, *args)
    assert_close_rel(one_launch, problem.reference64(), torch.float16)
    if split > 1:
        assert torch.equal(one_launch, launch(cfg, *args, self_reduce=False))
        counters = lowering._counters[torch.device(problem.x.device.type, problem.x.device.index)]
        assert int(counters.abs().sum()) == 0
    assert lowering._split_tiles(cfg, m, 96) == -(-m // rows) * 2


@pytest.mark.parametrize(("m", "k", "group", "kernel"), [
    (1, 4096, 128, "gemv"), (5, 4096, 128, "mma"), (16, 14336, 64, "mma"), (16, 4096, 4096, "mma"),
    (16, 4112, 16, "gemm"),  # group 16: the lane MMA needs whole 32-k steps per group
])  # fmt: skip
def test_default_config_uses_the_lane_mma_kernel_up_to_16_rows(m, k, group, kernel):
    cfg = default_config(m, 4096, k, group)
    assert cfg.kernel == kernel and valid_config(cfg, k, group)
    if kernel == "mma":
        assert cfg.block_m == (8 if m <= 8 else 16) and cfg.split_k > 1


def test_tracing_reserves_the_tile_counters_outside_fake_mode(monkeypatch):
    """The op's fake implementation allocates split-K's tile counters while a graph is traced,
    as a real tensor: left to the first launch, that launch can be a CUDA-graph tree's warm-up
    run and the counters land in its private pool (an H100 failure of generate())."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from qcompile.lowering import w4a16 as lowering

    seen = []

    def record(device):
        seen.append((device, isinstance(torch.zeros(1), FakeTensor)))

    monkeypatch.setattr(lowering, "_tile_counters", record)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with FakeTensorMode():
        x = torch.empty(3, 64, device="cuda", dtype=torch.float16)
        qweight = torch.empty(8, 16, device="cuda", dtype=torch.int32)
        scales = torch.empty(2, 16, device="cuda", dtype=torch.float16)
        out = torch.ops.qcompile.w4a16_linear(x, qweight, scales, scales, None, 32)
    assert out.shape == (3, 16)
    assert seen == [(torch.device("cuda", 0), False)]  # one real allocation, on x's device


@pytest.mark.parametrize("m", [2048, 8000])
def test_prompt_sized_m_tunes_only_dequantize_then_matmul(m):
    """Long prompts: one candidate (the large-M winner), so their first call does not tune
    ~30 fused configs per shape; the untuned default from M = 256 on is the same."""
    assert candidate_configs(m, 28672, 4096, 128) == [
        KernelConfig("dequant_mm", 0, 256, 16, 1, 4, 1)
    ]
    assert default_config(m, 28672, 4096, 128).kernel == "dequant_mm"
    assert default_config(256, 4096, 4096, 128).kernel == "dequant_mm"
    assert len(candidate_configs(1024, 28672, 4096, 128)) > 1


@pytest.mark.skipif(KERNEL_DEVICE != "cpu", reason="the limit is lowered in the interpreter")
def test_rows_past_the_32_bit_index_limit_run_in_chunks(cpu_tuner, monkeypatch):
    """Past 2**31 elements of x, out or the split-K workspace the op launches row chunks into
    slices of one out. With the limit lowered to 40 rows of K=256, M=100 runs as 3 launches
    and matches float64; the tuner times its configs on the first chunk's rows (a whole x
    would overflow: a fault on the H100)."""
    from qcompile.config import Scheme
    from qcompile.quant.int4 import dequantize_int4
    from qcompile.quant.rtn import quantize_weight_int4

    calls = record_row_chunks(monkeypatch, lowering, 40, 256)
    tune_with_default(monkeypatch, lowering)
    gen = torch.Generator().manual_seed(0)
    p = quantize_weight_int4(
        torch.randn(64, 256, generator=gen), Scheme(group_size=64), torch.float16
    )
    x = torch.randn(100, 256, generator=gen).half()
    out = lowering.w4a16_linear_cuda(x, p.qweight, p.scales, p.offsets, None, 64)
    assert calls == [39, 39, 39, 22]  # the tuner's run, then the chunks
    assert_close_rel(out, x.double() @ dequantize_int4(p, torch.float64).t(), torch.float16)
    with pytest.raises(ValueError, match="plane-major rows cannot be chunked"):
        lowering.w4a16_linear_cuda(to_planes(x, PLANE_CHUNK), p.qweight, p.scales, p.offsets,
                                   None, 64, x_planes=True)  # fmt: skip
