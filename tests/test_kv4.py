"""KV4: the packed int4 K/V format, its ops and kernels, SmoothAttention, the Hugging Face
cache and attention function, and the attention pass.

Kernels run in Triton's interpreter on CPU (natively on a GPU) against a float64 reference.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICE
from helpers import assert_close_rel, rel_error, tiny_llama
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from strategies import KV4Problem, kv4_problems
from transformers import CompileConfig, StaticCache

import qcompile
from qcompile import QuantConfig, Scheme
from qcompile.backend import _fresh_graph_module
from qcompile.config import KVScheme
from qcompile.integrations.kv4_cache import (
    KV4Cache,
    KV4Layer,
    enable_kv4_attention,
    smooth_attention_,
)
from qcompile.lowering import kv4_attention
from qcompile.lowering.autotune import KernelConfig
from qcompile.lowering.kv4_attention import (
    candidate_configs,
    decode_kind,
    decode_rows,
    decode_t_rows,
    default_config,
    kv4_cache_write_cuda,
    launch_attention,
    prefill_kind,
    valid_config,
)
from qcompile.ops.kv4 import (
    kv4_attention_reference,
    kv4_prefill_attention_fast,
    kv4_prefill_attention_reference,
)
from qcompile.passes.attention import rewrite_attention
from qcompile.quant.kv4 import (
    PackedKV4,
    dequantize_kv4,
    fold_smooth_attention,
    hadamard_matrix,
    key_channel_absmax,
    pack_int4_pairs,
    quantize_kv4,
    quantize_kv4_keys_per_channel,
    smooth_attention_scales,
    unpack_int4_pairs,
)
from qcompile.report import CompileReport

KERNEL_SETTINGS = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # a failure prints @reproduce_failure(...): the GPU machine keeps no example database
    # (two decode_t tests failed there in sessions 42 and 43, cut before the example printed)
    print_blob=True,
)


# --------------------------------------------------------------------------- the format
def test_pack_unpack_roundtrip_and_nibble_order():
    codes = torch.randint(0, 16, (2, 3, 5, 64), dtype=torch.uint8)
    packed = pack_int4_pairs(codes)
    assert packed.shape == (2, 3, 5, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4_pairs(packed), codes)
    # channel 2j is the low nibble of byte j, channel 2j + 1 the high one
    assert torch.equal(packed[..., 7], codes[..., 14] | (codes[..., 15] << 4))


@settings(max_examples=40, deadline=None)
@given(
    d=st.sampled_from([64, 128]),
    group=st.sampled_from([32, 64, 128]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    magnitude=st.sampled_from([1e-3, 1.0, 300.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantize_matches_float64_math(d, group, dtype, magnitude, seed):
    """Codes, scales and offsets from an independent float64 computation; error <= s/2."""
    if d % group:
        return
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, 3, 7, d, generator=gen) * magnitude).to(dtype)
    p = quantize_kv4(x, KVScheme(group_size=group))
    assert p.codes.shape == (2, 3, 7, d // 2) and p.scales.shape == (2, 3, 7, d // group)
    x64 = x.double().unflatten(-1, (-1, group))
    lo, hi = x64.amin(-1), x64.amax(-1)
    s = ((hi - lo) / 15).clamp_min(2.0**-24).to(torch.float16).double()
    o = lo.to(torch.float16).double()
    # float32 (hi - lo) / 15 may round to the neighbouring fp16 value: one ulp at most
    assert torch.allclose(p.scales.double(), s, rtol=2**-10, atol=0)
    assert torch.equal(p.offsets.double(), o)
    s = p.scales.double()
    codes64 = torch.floor((x64 - o[..., None]) / s[..., None] + 0.5).clamp(0, 15)
    codes = unpack_int4_pairs(p.codes).double().unflatten(-1, (-1, group))
    # float32 vs float64 division may differ at an exact .5 tie: one code step, rarely
    assert (codes != codes64).double().mean() < 1e-3
    err = (dequantize_kv4(p, torch.float64).unflatten(-1, (-1, group)) - x64).abs()
    bound = s / 2 + 15 * (s - (hi - lo) / 15).abs() + (o - lo).abs()
    assert (err <= bound[..., None] * (1 + 1e-6) + 1e-12).all()


def test_constant_groups_are_exact_and_memory_is_under_0_3x_of_fp16():
    x = torch.full((1, 2, 4, 128), 3.0, dtype=torch.float16)
    p = quantize_kv4(x, KVScheme(group_size=128))
    assert torch.equal(dequantize_kv4(p, torch.float16), x)
    fp16_bytes = x.numel() * 2
    assert p.nbytes() / fp16_bytes == pytest.approx((64 + 4) / 256)  # 0.266
    assert quantize_kv4(x, KVScheme(group_size=64)).nbytes() / fp16_bytes <= 0.3
    with pytest.raises(ValueError, match="head_dim=64 is not divisible by group_size=128"):
        quantize_kv4(x[..., :64], KVScheme(group_size=128))


# --------------------------------------------------------------------------- SmoothAttention
def _rope_half(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (Hugging Face Llama) of x [..., S, D] at positions pos [S]."""
    d = x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = pos.double()[:, None] * inv[None, :]
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    rot = torch.cat((-x[..., d // 2 :], x[..., : d // 2]), -1)
    return x * cos + rot * sin


def test_smooth_attention_folding_keeps_scores_through_rope_and_shrinks_key_error():
    torch.manual_seed(0)
    hidden, hq, hkv, d, s = 64, 4, 2, 32, 40
    wq = torch.randn(hq * d, hidden, dtype=torch.float64) / 8
    wk = torch.randn(hkv * d, hidden, dtype=torch.float64) / 8
    wk[torch.tensor([3, 3 + d // 2, d + 5])] *= 30  # outlier key channels (one rotated pair)
    bq, bk = torch.randn(hq * d, dtype=torch.float64), torch.randn(hkv * d, dtype=torch.float64)
    x = torch.randn(s, hidden, dtype=torch.float64)
    pos = torch.arange(s)

    def qk(wq, bq, wk, bk):
        q = (x @ wq.t() + bq).view(s, hq, d).transpose(0, 1)
        k = (x @ wk.t() + bk).view(s, hkv, d).transpose(0, 1)
        return _rope_half(q, pos), _rope_half(k, pos)

    absmax = key_channel_absmax((x @ wk.t() + bk).view(s, hkv, d), rope="half")
    assert torch.equal(absmax[:, : d // 2], absmax[:, d // 2 :])  # one factor per pair
    lam = smooth_attention_scales(absmax, alpha=0.5)
    q0, k0 = qk(wq, bq, wk, bk)
    q1, k1 = qk(*fold_smooth_attention(wq, bq, wk, bk, lam))
    scores0 = q0 @ k0.repeat_interleave(hq // hkv, 0).transpose(-1, -2)
    scores1 = q1 @ k1.repeat_interleave(hq // hkv, 0).transpose(-1, -2)
    assert rel_error(scores1, scores0) < 1e-12  # RoPE commutes with the pairwise factors

    def score_error(q, k):
        kq = dequantize_kv4(quantize_kv4(k[None].float(), KVScheme(group_size=32)), torch.float64)
        exact = q @ k.repeat_interleave(2, 0).transpose(-1, -2)
        return rel_error(q @ kq[0].repeat_interleave(2, 0).transpose(-1, -2), exact)

    assert score_error(q1, k1) < 0.5 * score_error(q0, k0)


def test_smooth_attention_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rope="):
        key_channel_absmax(torch.randn(3, 2, 8), rope="interleaved")
    with pytest.raises(ValueError, match="alpha"):
        smooth_attention_scales(torch.ones(2, 8), alpha=1.5)
    with pytest.raises(ValueError, match="do not match lambda"):
        fold_smooth_attention(torch.ones(24, 4), None, torch.ones(16, 4), None, torch.ones(2, 8))


# --------------------------------------------------------------------------- reference op
@pytest.mark.parametrize("gqa", [1, 4])
def test_reference_is_sdpa_on_dequantized_cache(gqa):
    """Without masks the op is SDPA over the dequantized K/V; causal is bottom-right aligned."""
    torch.manual_seed(1)
    b, hkv, sq, s, d = 2, 2, 3, 37, 64
    q = torch.randn(b, hkv * gqa, sq, d, dtype=torch.float64)
    keys = quantize_kv4(torch.randn(b, hkv, s, d), KVScheme(group_size=32))
    values = quantize_kv4(torch.randn(b, hkv, s, d), KVScheme(group_size=32))
    k, v = dequantize_kv4(keys, torch.float64), dequantize_kv4(values, torch.float64)
    problem = KV4Problem(q, keys, values, None, None, False, 0.3)
    want = F.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True)
    assert rel_error(problem.reference64(), want) < 1e-12
    lens = torch.tensor([37, 20])
    causal = KV4Problem(q, keys, values, lens, None, True, 0.3).reference64()
    for i, n in enumerate(lens.tolist()):
        visible = torch.ones(sq, n, dtype=torch.bool).tril(n - sq)
        want = F.scaled_dot_product_attention(
            q[i : i + 1], k[i : i + 1, :, :n], v[i : i + 1, :, :n], visible, scale=0.3,
            enable_gqa=True,
        )  # fmt: skip
        assert rel_error(causal[i : i + 1], want) < 1e-12


def test_reference_zero_rows_for_queries_that_see_nothing():
    keys = quantize_kv4(torch.randn(1, 1, 8, 64), KVScheme(group_size=64))
    mask = torch.ones(1, 1, 2, 8, dtype=torch.bool)
    mask[0, 0, 1] = False
    out = KV4Problem(torch.randn(1, 2, 2, 64).double(), keys, keys, None, mask, False, 1.0)
    ref = out.reference64()
    assert not torch.isnan(ref).any() and torch.equal(ref[0, :, 1], torch.zeros(2, 64).double())


# --------------------------------------------------------------------------- kernels
def _run(problem: KV4Problem, cfg: KernelConfig) -> torch.Tensor:
    q = problem.query
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)  # poison
    return launch_attention(cfg, *problem.args(), out=out)


@KERNEL_SETTINGS
@given(problem=kv4_problems(decode=True, device=KERNEL_DEVICE), data=st.data())
def test_decode_kernel_matches_float64_reference(problem, data):
    """Flash-decoding, both kernels ("decode" where the cache has one group per head): any
    split of the sequence, GQA rows, masks, partly written caches."""
    b, hq, sq, _ = problem.query.shape
    hkv, s = problem.keys.codes.shape[1:3]
    groups = problem.keys.scales.shape[-1]
    kind = data.draw(st.sampled_from(sorted({decode_kind(groups), "decode_grouped"})))
    tiles = [c for c in candidate_configs(b, hkv, sq, hq // hkv, s, groups) if c.block_n <= 128]
    cfg = data.draw(st.sampled_from(tiles[:10]), label="config")
    split = data.draw(st.sampled_from([1, 2, 3, 8]), label="split")  # 3: not a power of two
    prefetch = kind == "decode" and data.draw(st.booleans(), label="scale prefetch")
    stage_v = kind == "decode" and data.draw(st.booleans(), label="V staged")
    cfg = KernelConfig(kind, cfg.block_m, cfg.block_n, 0, split, cfg.num_warps, 2, prefetch,
                       stage_v=stage_v)  # fmt: skip
    assert valid_config(cfg, sq * hq // hkv, groups)
    with _wide_cache(data.draw(st.booleans(), label="64-bit slab offsets")):
        assert_close_rel(_run(problem, cfg), problem.reference64(), problem.query.dtype)


@KERNEL_SETTINGS
@given(problem=kv4_problems(decode=True, device=KERNEL_DEVICE, one_group=True), data=st.data())
def test_transposed_decode_kernel_matches_float64_reference(problem, data):
    """ "decode_t" (keys on the MMA's M side, the GQA heads on its N side): any split, masks,
    partly written caches, the scale prefetch and staged V, 4 to 16 columns for the heads, a
    bf16 query scaled into fp16 (`_FP16_KEYS`)."""
    b, hq, sq, _ = problem.query.shape
    hkv, s = problem.keys.codes.shape[1:3]
    gqa = hq // hkv
    bn, warps, _ = data.draw(st.sampled_from(kv4_attention._DECODE_TILES["decode_t"]))
    rows = data.draw(st.sampled_from(sorted({decode_t_rows(gqa), min(16, 2 * decode_t_rows(gqa))})))
    cfg = KernelConfig(
        "decode_t", rows, bn, 0, data.draw(st.sampled_from([1, 2, 3, 8]), label="split"), warps,
        2, data.draw(st.booleans(), label="scale prefetch"),
        stage_v=data.draw(st.booleans(), label="V staged"),
    )  # fmt: skip
    assert valid_config(cfg, sq * gqa)
    fp16_keys = data.draw(st.booleans(), label="bf16 query scaled into fp16 (_FP16_KEYS)")
    with (
        _wide_cache(data.draw(st.booleans(), label="64-bit slab offsets")),
        mock.patch.object(kv4_attention, "_FP16_KEYS", fp16_keys),
    ):
        assert_close_rel(_run(problem, cfg), problem.reference64(), problem.query.dtype)


@pytest.mark.parametrize("heads", [1, 8])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_transposed_decode_reads_a_mask_shared_by_the_heads_as_one_row(heads, kind):
    """transformers' padding mask under compile, [B, 1, 1, S] (one row per batch: KEY_MASK,
    read once per tile), and a per-head mask: both against float64."""
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(2, 8, 1, 64, generator=gen).half()
    k, v = (torch.randn(2, 2, 70, 64, generator=gen) for _ in range(2))
    if kind == "bool":
        mask = torch.rand(2, heads, 1, 70, generator=gen) > 0.3
        mask[..., 0] = True
        mask[1, ..., 50:] = False  # a shorter sequence, as a padded batch
    else:
        mask = torch.randn(2, heads, 1, 70, generator=gen)
        mask[1, ..., 50:] = float("-inf")
    scheme = KVScheme(group_size=64)
    to = lambda p: PackedKV4(*(t.to(KERNEL_DEVICE) for t in (p.codes, p.scales, p.offsets)), 64)  # noqa: E731
    problem = KV4Problem(
        q.to(KERNEL_DEVICE), to(quantize_kv4(k, scheme)), to(quantize_kv4(v, scheme)), None,
        mask.to(KERNEL_DEVICE), False, 64**-0.5,
    )  # fmt: skip
    cfg = KernelConfig("decode_t", 4, 32, 0, 2, 1, 2, True, stage_v=True)
    assert_close_rel(_run(problem, cfg), problem.reference64(), torch.float16)


def test_transposed_decode_config_of_several_positions_runs_the_decode_kernel():
    """A "decode_t" config looked up for Sq * GQA rows of several query positions (the tuning
    key cannot tell them apart) runs as the decode kernel: same answer as float64."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 2, 64, generator=gen).half().to(KERNEL_DEVICE)
    k, v = (torch.randn(1, 1, 40, 64, generator=gen) for _ in range(2))
    scheme = KVScheme(group_size=64)
    to = lambda p: PackedKV4(*(t.to(KERNEL_DEVICE) for t in (p.codes, p.scales, p.offsets)), 64)  # noqa: E731
    problem = KV4Problem(
        q, to(quantize_kv4(k, scheme)), to(quantize_kv4(v, scheme)), None, None, True, 64**-0.5
    )
    cfg = KernelConfig("decode_t", 4, 32, 0, 2, 1, 2)
    assert valid_config(cfg, 4)
    assert_close_rel(_run(problem, cfg), problem.reference64(), torch.float16)


def _wide_cache(wide: bool):
    """The kernels' 64-bit slab offsets (`WIDE`, for caches past 2**31 bytes) on small caches:
    the limit lowered to one element."""
    return mock.patch.object(kv4_attention, "_WIDE_ELEMENTS", 1 if wide else 2**31)


def test_wide_offsets_measure_the_farthest_element_from_the_base():
    """An element 2**31 elements from the base is past int32's reach, one at 2**31 - 1 is not;
    strides count, so a transposed or sliced view is judged by where its elements lie."""

    def view(size, stride):
        return torch.empty_strided(size, stride, dtype=torch.uint8, device="meta")

    big = view((2, 2), (2**31 - 2, 1))  # farthest element: 2**31 - 1
    assert not kv4_attention.wide_offsets(big)
    assert kv4_attention.wide_offsets(view((3, 2), (2**30, 1)))  # 2**31 + 1
    assert not kv4_attention.wide_offsets(view((2, 3), (2**30, 1)))
    assert kv4_attention.wide_offsets(big, view((2, 2), (1, 2**31)))


@KERNEL_SETTINGS
@given(problem=kv4_problems(decode=False, device=KERNEL_DEVICE), data=st.data())
def test_prefill_kernel_matches_float64_reference(problem, data):
    """Flash-attention over several query positions, both kernels ("prefill" where the cache
    has one group per head): causal, masks, tiles of (pos, head) rows."""
    b, hq, sq, _ = problem.query.shape
    hkv, s = problem.keys.codes.shape[1:3]
    groups = problem.keys.scales.shape[-1]
    kind = data.draw(st.sampled_from(sorted({prefill_kind(groups), "prefill_grouped"})))
    tiles = [(16, 32), (32, 32)] + [
        (c.block_m, c.block_n)
        for c in candidate_configs(b, hkv, sq, hq // hkv, s, groups)
        if c.block_m <= 64 and c.block_n <= 64
    ][:2]
    bm, bn = data.draw(st.sampled_from(tiles), label="tile")
    cfg = KernelConfig(kind, bm, bn, 0)
    assert valid_config(cfg, sq * hq // hkv, groups)
    with _wide_cache(data.draw(st.booleans(), label="64-bit slab offsets")):
        assert_close_rel(_run(problem, cfg), problem.reference64(), problem.query.dtype)


@pytest.mark.parametrize(("bm", "bn", "valid"), [(16, 32, True), (16, 16, False), (32, 16, False),
                                                 (8, 32, False), (64, 48, False)])  # fmt: skip
def test_valid_config_refuses_tiles_the_gpu_gets_wrong(bm, bn, valid):
    """BLOCK_N = 16 is wrong on the H100 (Triton 3.6) though right in the interpreter; the
    2-D decode kernels take one group per head only, "decode_t" one query position."""
    assert valid_config(KernelConfig("prefill", bm, bn, 0), 4) is valid
    assert valid_config(KernelConfig("decode", 16, bn, 0, 2), 4) is (bn == 32)
    assert valid_config(KernelConfig("decode_grouped", 16, bn, 0, 2), 4, 4) is (bn == 32)
    assert not valid_config(KernelConfig("decode", 16, 32, 0, 2), 4, 2)
    assert not valid_config(KernelConfig("prefill", 64, 32, 0), 4, 2)
    assert valid_config(KernelConfig("prefill_grouped", 64, 32, 0), 4, 2)
    assert {c.kernel for c in candidate_configs(1, 8, 1, 4, 8192, 1)} == {"decode", "decode_t"}
    assert {c.kernel for c in candidate_configs(1, 8, 2, 4, 8192, 1)} == {"decode", "prefill"}
    assert not valid_config(KernelConfig("decode_t", 4, 32, 0, 2), 4, 2)  # one group only
    assert {c.kernel for c in candidate_configs(1, 8, 1, 4, 8192, 4)} == {"decode_grouped"}


def test_register_cap_is_valid_on_the_one_group_kernel_but_not_a_candidate():
    """`max_registers` (timed slower on the H100, `results/session26/capped/`) stays a probe's
    knob: valid on the one-group kernel within ptxas's range, never tuned."""
    for args in ((16, 8, 1, 4, 32768, 1), (1, 8, 1, 4, 32768, 1), (16, 8, 1, 4, 32768, 4)):
        assert not any(c.max_registers for c in candidate_configs(*args))
    assert not valid_config(KernelConfig("decode_grouped", 16, 64, 0, 2, max_registers=184), 4, 2)
    assert not valid_config(KernelConfig("decode", 16, 32, 0, 2, max_registers=300), 4)
    assert valid_config(KernelConfig("decode", 16, 32, 0, 2, max_registers=184), 4)


@pytest.mark.parametrize("split", [1, 16])
def test_register_capped_decode_tile_matches_float64(split):
    """A capped config launches (the cap goes to the compiler, which the interpreter does not
    run) and, split past the self-reducing limit, combines through the second launch."""
    torch.manual_seed(split)
    s, d = 700, 64
    keys, values = (quantize_kv4(torch.randn(1, 2, s, d), KVScheme(group_size=d)) for _ in "kv")

    def to(p):
        return PackedKV4(*(x.to(KERNEL_DEVICE) for x in (p.codes, p.scales, p.offsets)), d)

    q = torch.randn(1, 8, 1, d).half().to(KERNEL_DEVICE)
    problem = KV4Problem(q, to(keys), to(values), None, None, False, d**-0.5)
    cfg = KernelConfig("decode", 16, 32, 0, split, 1, 2, True, stage_v=True, max_registers=184)
    assert valid_config(cfg, 4)
    assert_close_rel(_run(problem, cfg), problem.reference64(), torch.float16)


def test_scale_prefetch_is_the_one_group_kernels_only():
    assert valid_config(KernelConfig("decode", 16, 64, 0, 2, 4, 2, True), 4)
    assert not valid_config(KernelConfig("decode_grouped", 16, 64, 0, 2, 4, 2, True), 4, 2)
    assert not valid_config(KernelConfig("decode", 16, 64, 0, 2, 4, 2, 2), 4)
    # a tuning candidate (the one-warp BLOCK_N 32 / 64 tiles) for per-token keys only
    tuned = candidate_configs(16, 8, 1, 4, 32768, 1)
    prefetched = {(c.block_n, c.num_warps) for c in tuned if c.prefetch and c.kernel == "decode"}
    assert prefetched == {(32, 1), (64, 1)}
    assert all(c.prefetch for c in tuned if c.kernel == "decode_t")  # every decode_t tile
    # keys per channel: the decode kernel without it; decode_t prefetches V's token scales
    per_channel = candidate_configs(16, 8, 1, 4, 32768, 1, key_tokens=64)
    assert not any(c.prefetch for c in per_channel if c.kernel == "decode")
    assert not any(c.prefetch for c in candidate_configs(16, 8, 1, 4, 32768, 4))


@KERNEL_SETTINGS
@given(data=st.data())
def test_decode_kernel_switches_match_float64_reference(data):
    """The one-group kernel's module switches, each off by default: `_KEY_BIAS16` (per-token
    keys unpacked as 16 + code, the dot's extra 16 * sum(q) removed through the offset; on
    the H100 it kept the error but slowed the best tile), `_Q_ROWS` (decode tiles read the
    query as whole rows, split into planes in registers) and V's codes as code - 8 (on for
    programs over `_CENTER_V_KEYS` keys); decode and prefill tiles."""
    key_bias16 = data.draw(st.booleans(), label="_KEY_BIAS16")
    q_rows = data.draw(st.booleans(), label="_Q_ROWS")
    center_v = data.draw(st.booleans(), label="V centered")
    decode = data.draw(st.booleans(), label="decode")
    problem = data.draw(kv4_problems(decode=decode, device=KERNEL_DEVICE), label="problem")
    _, hq, sq, _ = problem.query.shape
    hkv = problem.keys.codes.shape[1]
    assume(problem.keys.scales.shape[-1] == 1)  # one group per head: the 2-D kernel
    rows = decode_rows(sq, hq // hkv)
    if decode and rows <= 64:
        split = data.draw(st.sampled_from([1, 3]), label="split")
        cfg = KernelConfig("decode", rows, max(32, rows), 0, split, 1, 2,
                           stage_v=data.draw(st.booleans(), label="V staged"))  # fmt: skip
    else:
        cfg = KernelConfig("prefill", 16, 32, 0)
    assert valid_config(cfg, sq * hq // hkv)
    with (
        mock.patch.object(kv4_attention, "_KEY_BIAS16", key_bias16),
        mock.patch.object(kv4_attention, "_Q_ROWS", q_rows),
        mock.patch.object(kv4_attention, "_CENTER_V_KEYS", 0 if center_v else 1 << 30),
    ):
        got = _run(problem, cfg)
    assert_close_rel(got, problem.reference64(), problem.query.dtype)


def test_staged_v_is_a_decode_candidate_of_the_one_group_kernel_only():
    assert valid_config(KernelConfig("decode", 16, 64, 0, 2, 1, 3, stage_v=True), 4)
    assert not valid_config(KernelConfig("decode_grouped", 16, 64, 0, 2, stage_v=True), 4, 2)
    assert not valid_config(KernelConfig("prefill", 64, 64, 0, stage_v=True), 64)
    # every decode tile both ways (but the one 8-column decode_t candidate: staged only)
    tuned = [c for c in candidate_configs(16, 8, 1, 4, 32768, 1) if c.block_m != 8]
    staged = {dataclasses.replace(c, stage_v=False) for c in tuned if c.stage_v}
    assert staged == {c for c in tuned if not c.stage_v}
    assert any(c.stage_v for c in candidate_configs(16, 8, 1, 4, 32768, 1, key_tokens=64))
    assert not any(c.stage_v for c in candidate_configs(16, 8, 1, 4, 32768, 4))


@pytest.mark.parametrize(("b", "s", "split"), [(1, 32768, 128), (1, 8192, 128), (16, 32768, 12),
                                              (16, 8192, 12), (64, 8192, 3), (64, 32768, 3),
                                              (1, 200, 3), (128, 32768, 1)])  # fmt: skip
def test_untuned_decode_default_is_what_the_h100_picked(b, s, split):
    """Per-token keys: BLOCK_N 32, one warp, prefetch, V staged, as tuned in session 24, on the
    transposed kernel over its 4 head columns (session 27), split to fill one wave of 12
    resident programs per SM (session 28); keys per channel the same tile and kernel at their
    own wave (session 29)."""
    cfg = default_config(b, 8, 1, 4, s)
    assert (cfg.kernel, cfg.block_m, cfg.block_n, cfg.num_warps, cfg.prefetch, cfg.stage_v,
            cfg.split_k) == ("decode_t", 4, 32, 1, True, True, split)  # fmt: skip
    assert b * 8 * split <= 12 * 132 or split == 1  # one wave
    tuned = candidate_configs(b, 8, 1, 4, s, 1)
    assert any(c.kernel == "decode_t" and c.split_k == split for c in tuned)  # and tuned
    # 8 head columns at their wave (11 programs per SM) are a candidate too
    eight = [c for c in tuned if c.kernel == "decode_t" and c.block_m == 8]
    assert [(c.block_n, c.num_warps, c.stage_v) for c in eight] == [(32, 1, True)]
    assert b * 8 * eight[0].split_k <= 11 * 132 or eight[0].split_k == 1
    assert valid_config(cfg, 4)
    several = default_config(b, 8, 2, 4, s)  # two query positions: the decode kernel
    assert (several.kernel, several.block_m) == ("decode", 16)
    per_channel = default_config(b, 8, 1, 4, s, 1, key_tokens=64)
    assert (per_channel.kernel, per_channel.block_m, per_channel.block_n, per_channel.num_warps,
            per_channel.prefetch, per_channel.stage_v) == ("decode_t", 4, 32, 1, True, True)  # fmt: skip
    # keys per channel: one wave of 10 resident programs per SM (`_DECODE_T_KEY_TILE`)
    assert b * 8 * per_channel.split_k <= 10 * 132 < b * 8 * (per_channel.split_k + 1) or (
        per_channel.split_k in (1, 128, s // 64)
    )


def test_decode_t_grid_fits_one_wave_of_the_device(monkeypatch):
    """The untuned decode_t split fills one wave of the device it runs on: an H100 PCIe (114
    SMs) or an A100-sized shared memory (164 KB: 9 programs per SM) get smaller splits than
    an H100 SXM, never a grid past one wave (one program past it runs a second, nearly empty
    wave: 217.8 -> 283.1 us at B=16 S=32k on the H100)."""
    budgets = {None: kv4_attention._SM90, 1: (114, 228 * 1024), 2: (108, 164 * 1024)}
    monkeypatch.setattr(kv4_attention, "_sm_budget", budgets.__getitem__)
    splits = {}
    for device, (sms, smem) in budgets.items():
        cfg = default_config(16, 8, 1, 4, 32768, device=device)
        per_sm = kv4_attention.resident_programs(*kv4_attention._DECODE_T_TILE[4], smem)
        assert 16 * 8 * cfg.split_k <= per_sm * sms < 16 * 8 * (cfg.split_k + 1)
        tuned = candidate_configs(16, 8, 1, 4, 32768, device=device)
        assert any(c.kernel == "decode_t" and c.split_k == cfg.split_k for c in tuned)
        splits[device] = cfg.split_k
    assert splits == {None: 12, 1: 10, 2: 7}


def test_decode_kernel_refuses_a_grouped_cache():
    keys = quantize_kv4(torch.randn(1, 1, 40, 64), KVScheme(group_size=32))
    problem = KV4Problem(torch.randn(1, 4, 1, 64).half(), keys, keys, None, None, False, 0.1)
    with pytest.raises(ValueError, match="G=32, D=64"):
        launch_attention(KernelConfig("decode", 16, 32, 0, 1), *problem.args())


@pytest.mark.parametrize(("sq", "gqa", "group"), [(1, 1, 32), (1, 8, 64), (3, 4, 32), (40, 8, 64)])
def test_default_config_is_valid(sq, gqa, group):
    """The untuned config (CUDA-graph capture, tuning off) runs every shape."""
    torch.manual_seed(sq)
    s, d = 70, 64
    keys = quantize_kv4(torch.randn(1, 1, s, d), KVScheme(group_size=group))
    keys = PackedKV4(*(t.to(KERNEL_DEVICE) for t in (keys.codes, keys.scales, keys.offsets)), group)
    q = torch.randn(1, gqa, sq, d).half().to(KERNEL_DEVICE)
    problem = KV4Problem(q, keys, keys, None, None, sq > 1, d**-0.5)
    cfg = default_config(1, 1, sq, gqa, s, d // group)
    assert valid_config(cfg, sq * gqa, d // group)
    assert_close_rel(_run(problem, cfg), problem.reference64(), torch.float16)


@pytest.mark.parametrize(("hq", "sq", "split"), [(2, 3, 2), (4, 2, 8), (8, 1, 3), (1, 5, 4)])
def test_split_decode_of_several_query_positions_combines_every_row(hq, sq, split):
    """A decode tile with Sq > 1 (rows = Sq * GQA, e.g. speculative tokens) split over the
    keys: the self-reducing last split combines every row, GQA (rounded up to a power of
    two) rows at a time, skipping only the chunks past Sq * GQA."""
    torch.manual_seed(hq * 10 + sq)
    s, d = 40, 64
    keys = quantize_kv4(torch.randn(1, 1, s, d), KVScheme(group_size=d))
    keys = PackedKV4(*(t.to(KERNEL_DEVICE) for t in (keys.codes, keys.scales, keys.offsets)), d)
    q = torch.randn(1, hq, sq, d).half().to(KERNEL_DEVICE)
    problem = KV4Problem(q, keys, keys, None, None, False, d**-0.5)
    cfg = KernelConfig("decode", decode_rows(sq, hq), 32, 0, split, 1, 2)
    assert valid_config(cfg, sq * hq)
    assert_close_rel(_run(problem, cfg), problem.reference64(), torch.float16)


def test_empty_splits_and_rows_that_see_nothing_give_zeros_not_nan():
    """More splits than tiles (seq_len 5 of 200), and a row whose mask hides every key."""
    torch.manual_seed(3)
    keys = quantize_kv4(torch.randn(1, 1, 200, 64), KVScheme(group_size=64))
    keys = PackedKV4(*(t.to(KERNEL_DEVICE) for t in (keys.codes, keys.scales, keys.offsets)), 64)
    q = torch.randn(1, 4, 1, 64).half().to(KERNEL_DEVICE)
    mask = torch.ones(1, 4, 1, 200, dtype=torch.bool, device=KERNEL_DEVICE)
    mask[0, 2] = False
    lens = torch.tensor([5], dtype=torch.int32, device=KERNEL_DEVICE)
    problem = KV4Problem(q, keys, keys, lens, mask, False, 0.125)
    for kind in ("decode", "decode_grouped"):
        out = _run(problem, KernelConfig(kind, 16, 32, 0, 8))
        assert torch.equal(out[0, 2].cpu(), torch.zeros(1, 64, dtype=torch.float16))
        assert_close_rel(out, problem.reference64(), torch.float16)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    d=st.sampled_from([64, 128]),
    group=st.sampled_from([32, 64, 128]),
    sn=st.integers(1, 20),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
    block_t=st.sampled_from([None, 1, 2, 8, 16, 32, 64]),
    num_warps=st.sampled_from([None, 1, 4]),
)
def test_cache_write_kernel_is_bit_exact_with_reference(
    d, group, sn, dtype, seed, block_t, num_warps
):
    """Quantize-on-write: codes, scales and offsets equal `quantize_kv4`'s, at the positions,
    whatever the tokens per program and warps (None: the default tile)."""
    if d % group:
        return
    gen = torch.Generator().manual_seed(seed)
    b, h, smax = 2, 2, 24
    key = (torch.randn(b, sn, h, d, generator=gen) * 4).to(dtype).transpose(1, 2)  # HF strides
    value = torch.randn(b, h, sn, d, generator=gen).to(dtype)
    positions = torch.randperm(smax, generator=gen)[:sn]

    def empty_cache():
        ng = d // group
        return [
            torch.zeros(b, h, smax, d // 2, dtype=torch.uint8),
            torch.zeros(b, h, smax, ng, dtype=torch.float16),
            torch.zeros(b, h, smax, ng, dtype=torch.float16),
        ]

    ours = [t.to(KERNEL_DEVICE) for t in empty_cache() + empty_cache()]
    ref = empty_cache() + empty_cache()
    kv4_cache_write_cuda(
        key.to(KERNEL_DEVICE), value.to(KERNEL_DEVICE), *ours, positions.to(KERNEL_DEVICE),
        block_t=block_t, num_warps=num_warps,
    )  # fmt: skip
    torch.ops.qcompile.kv4_cache_write(key, value, *ref, positions)
    for got, want in zip(ours, ref, strict=True):
        assert torch.equal(got.cpu(), want)
    p = quantize_kv4(key, KVScheme(group_size=group))
    assert torch.equal(ref[0][:, :, positions], p.codes)


@pytest.mark.parametrize("decode_write", [None, (1, 1), kv4_attention._DECODE_WRITE])
@pytest.mark.parametrize("sn", [1, 3])
def test_cache_write_tile_of_one_token(decode_write, sn):
    """`_DECODE_WRITE` (None: the prompt's tile) sets the tile of a one-token write only;
    every other write keeps 8 tokens on 4 warps; a position past the cache is dropped."""
    b, h, d, smax = 2, 2, 64, 8
    key = torch.randn(b, h, sn, d, device=KERNEL_DEVICE)
    cache = [torch.zeros(b, h, smax, d // 2, dtype=torch.uint8, device=KERNEL_DEVICE),
             *(torch.zeros(b, h, smax, 1, dtype=torch.float16, device=KERNEL_DEVICE)
               for _ in "so")]  # fmt: skip
    positions = torch.tensor([smax, 2, 5][:sn], device=KERNEL_DEVICE)
    launches = []
    real = kv4_attention._kv4_cache_write_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append((grid, kw["BLOCK_T"], kw["num_warps"]))
                return real[grid](*args, **kw)

            return launch

    with (
        mock.patch.object(kv4_attention, "_DECODE_WRITE", decode_write),
        mock.patch.object(kv4_attention, "_kv4_cache_write_kernel", Recorder()),
    ):
        kv4_cache_write_cuda(key, key, *cache, *cache, positions)
    tile = decode_write if sn == 1 and decode_write else (8, 4)
    assert launches == [((b * h, -(-sn // tile[0])), *tile)]
    if sn == 1:  # position 8 is past the 8-position cache: nothing written
        assert not cache[0].any() and not cache[1].any()
    else:
        assert cache[0][:, :, [2, 5]].any() and not cache[0][:, :, [0, 1, 3, 4, 6, 7]].any()


# --------------------------------------------------------------------------- keys per channel
def _channel_math64(x: torch.Tensor, t: int):
    """Independent float64 per-channel min-max over complete groups of t tokens of x
    [B, H, S, D]: (scales, offsets [B, H, S // t, D], codes [B, H, S // t * t, D])."""
    full = x.shape[2] // t * t
    x64 = x[:, :, :full].double().unflatten(2, (-1, t))  # [B, H, G, t, D]
    lo, hi = x64.amin(3), x64.amax(3)
    s = ((hi - lo) / 15).clamp_min(2.0**-24).to(torch.float16).double()
    o = lo.to(torch.float16).double()
    return s, o, lo, hi, x64


@settings(max_examples=30, deadline=None)
@given(
    d=st.sampled_from([64, 128]),
    t=st.sampled_from([32, 64, 128]),
    s=st.integers(1, 300),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    outliers=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_keys_per_channel_match_float64_math(d, t, s, dtype, outliers, seed):
    """Per channel over groups of T tokens: scales/offsets from float64 min-max (one fp16
    ulp), error <= s/2 per channel, the incomplete tail bit-exact in the residual."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, s, d, generator=gen)
    if outliers:
        x[..., torch.randint(0, d, (2,), generator=gen)] *= 30
    x = x.to(dtype)
    p = quantize_kv4_keys_per_channel(x, t)
    groups, full = -(-s // t), s // t * t
    assert p.scales.shape == (2, 2, groups, d) and p.residual.shape == (2, 2, t, d)
    assert p.key_tokens == t and p.residual.dtype == dtype
    assert torch.equal(p.residual[:, :, : s - full], x[:, :, full:])
    sc, o, lo, hi, x64 = _channel_math64(x, t)
    assert torch.allclose(p.scales[:, :, : s // t].double(), sc, rtol=2**-10, atol=0)
    assert torch.equal(p.offsets[:, :, : s // t].double(), o)
    deq = dequantize_kv4(p, torch.float64)
    assert torch.equal(deq[:, :, full:], x[:, :, full:].double())  # the residual's tokens
    sc = p.scales[:, :, : s // t].double()
    err = (deq[:, :, :full].unflatten(2, (-1, t)) - x64).abs()
    bound = sc / 2 + 15 * (sc - (hi - lo) / 15).abs() + (o - lo).abs()
    assert (err <= bound[:, :, :, None] * (1 + 1e-6) + 1e-12).all()
    if outliers and s >= t:  # one scale per channel: outlier channels keep their wide steps
        steps = p.scales[:, :, : s // t].float()  # to themselves
        assert (steps.median(dim=-1).values < 0.25 * steps.amax(dim=-1)).all()


@settings(max_examples=25, deadline=None)
@given(
    t=st.sampled_from([32, 64]),
    chunks=st.lists(st.integers(1, 70), min_size=1, max_size=8),
    dtype=st.sampled_from([torch.float16, torch.float32]),
    seed=st.integers(0, 2**31 - 1),
)
def test_keys_per_channel_written_in_pieces_equal_written_at_once(t, chunks, dtype, seed):
    """A prompt then decode steps (any split of the positions) store the codes, scales and
    residual that one write of the whole sequence stores: a group is quantized once, by the
    write that completes it, from the same rounded values."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(chunks)
    x = torch.randn(1, 2, total, 64, generator=gen).to(dtype)
    once = quantize_kv4_keys_per_channel(x, t)
    kv = torch.zeros(1, 2, total, 64, dtype=dtype)
    v_caches = [
        torch.zeros(1, 2, total, 32, dtype=torch.uint8),
        torch.zeros(1, 2, total, 1, dtype=torch.float16),
        torch.zeros(1, 2, total, 1, dtype=torch.float16),
    ]
    parts = [torch.zeros_like(u) for u in (once.codes, once.scales, once.offsets, once.residual)]
    start = 0
    for n in chunks:
        positions = torch.arange(start, start + n)
        piece = x[:, :, start : start + n]
        torch.ops.qcompile.kv4_cache_write_channels(
            piece, kv[:, :, start : start + n], parts[0], parts[1], parts[2], *v_caches,
            positions, parts[3],
        )  # fmt: skip
        start += n
    tail = total - total // t * t
    assert torch.equal(parts[0], once.codes) and torch.equal(parts[1], once.scales)
    assert torch.equal(parts[2], once.offsets)
    assert torch.equal(parts[3][:, :, :tail], once.residual[:, :, :tail])


def test_keys_per_channel_refuse_bad_schemes_and_writes():
    with pytest.raises(ValueError, match="key_tokens=48 is not supported"):
        KVScheme(key_tokens=48)
    with pytest.raises(ValueError, match="do not combine"):
        KVScheme(key_tokens=64, rotate_keys=True)
    with pytest.raises(ValueError, match="use group_size=64"):
        KVScheme(group_size=32, key_tokens=64).check_head_dim(64)
    model = tiny_llama(1, head_dim=64, num_key_value_heads=1)
    with pytest.raises(ValueError, match="use group_size=64"):
        KV4Cache(model.config, 16, KVScheme(group_size=32, key_tokens=32))
    keys = quantize_kv4_keys_per_channel(torch.randn(1, 1, 40, 64), 32)
    values = quantize_kv4(torch.randn(1, 1, 40, 64), SCHEME64)
    new = torch.randn(1, 1, 2, 64)
    caches = (keys.codes, keys.scales, keys.offsets, values.codes, values.scales, values.offsets)
    with pytest.raises(ValueError, match="consecutive positions"):
        torch.ops.qcompile.kv4_cache_write_channels(
            new, new, *caches, torch.tensor([3, 7]), keys.residual
        )
    with pytest.raises(ValueError, match=r"must be \[B, H, ceil\(S / T\), D\]"):
        kv4_attention_reference(
            torch.randn(1, 1, 1, 64), keys.codes, values.scales, values.offsets, *caches[3:],
            None, None, False, 0.1, keys.residual,
        )  # fmt: skip


@KERNEL_SETTINGS
@given(
    problem=kv4_problems(decode=True, device=KERNEL_DEVICE, per_channel_keys=True), data=st.data()
)
def test_decode_kernel_keys_per_channel_matches_float64_reference(problem, data):
    """The 2-D kernel over keys per channel: (q * s) . codes + q . o per group tile, the
    residual's tail tile in 16 bits; any split, GQA rows, masks, partly written caches."""
    b, hq, sq, _ = problem.query.shape
    hkv, s = problem.keys.codes.shape[1:3]
    t = problem.keys.key_tokens
    tiles = [c for c in candidate_configs(b, hkv, sq, hq // hkv, s, 1, t) if c.kernel == "decode"]
    assert tiles and all(t % c.block_n == 0 for c in tiles)
    cfg = data.draw(st.sampled_from([c for c in tiles if c.block_n <= 64][:8]), label="config")
    split = data.draw(st.sampled_from([1, 2, 3, 8]), label="split")
    cfg = KernelConfig("decode", cfg.block_m, cfg.block_n, 0, split, cfg.num_warps)
    assert valid_config(cfg, sq * hq // hkv, 1, t)
    assert_close_rel(_run(problem, cfg), problem.reference64(), problem.query.dtype)


@KERNEL_SETTINGS
@given(
    problem=kv4_problems(decode=True, device=KERNEL_DEVICE, per_channel_keys=True), data=st.data()
)
def test_transposed_decode_keys_per_channel_matches_float64_reference(problem, data):
    """decode_t over keys per channel (`_DECODE_T_KEY_TOKENS`): (q / r) . (codes * s / 2 +
    o / 2) * 2r per group tile (the halved key by one fp16 FMA), the residual's tail tile in
    16 bits, V per token (prefetched or not, staged or not); any split, masks, partly written
    caches."""
    b, hq, _, _ = problem.query.shape
    hkv, s = problem.keys.codes.shape[1:3]
    t = problem.keys.key_tokens
    with mock.patch.object(kv4_attention, "_DECODE_T_KEY_TOKENS", True):
        tiles = [c for c in candidate_configs(b, hkv, 1, hq // hkv, s, 1, t)
                 if c.kernel == "decode_t"]  # fmt: skip
        assert tiles and all(t % c.block_n == 0 for c in tiles)
        cfg = data.draw(st.sampled_from([c for c in tiles if c.num_warps == 1]), label="tile")
        cfg = dataclasses.replace(
            cfg, split_k=data.draw(st.sampled_from([1, 2, 3, 8]), label="split"),
            prefetch=data.draw(st.booleans(), label="V scale prefetch"),
            stage_v=data.draw(st.booleans(), label="V staged"), num_stages=2,
        )  # fmt: skip
        assert valid_config(cfg, hq // hkv, 1, t)
        got = _run(problem, cfg)
    assert_close_rel(got, problem.reference64(), problem.query.dtype)


def test_transposed_decode_keys_per_channel_switch():
    """`_DECODE_T_KEY_TOKENS` on (shipped): decode_t is a candidate and the default over keys
    per channel; off, a decode_t config is invalid there and no candidate, and one looked up
    anyway runs the decode kernel."""
    assert valid_config(KernelConfig("decode_t", 4, 32, 0, 2, 1, 3, True), 4, 1, 64)
    tuned = candidate_configs(16, 8, 1, 4, 32768, 1, key_tokens=64)
    assert {c.kernel for c in tuned} == {"decode", "decode_t"}
    assert default_config(16, 8, 1, 4, 32768, 1, key_tokens=64).kernel == "decode_t"
    with mock.patch.object(kv4_attention, "_DECODE_T_KEY_TOKENS", False):
        assert not valid_config(KernelConfig("decode_t", 4, 32, 0, 2, 1, 3, True), 4, 1, 64)
        tuned = candidate_configs(16, 8, 1, 4, 32768, 1, key_tokens=64)
        assert tuned and all(c.kernel == "decode" for c in tuned)
        assert default_config(16, 8, 1, 4, 32768, 1, key_tokens=64).kernel == "decode"


def test_keys_per_channel_tune_one_split_past_their_wave():
    """Keys per channel: decode_t at 4 head columns is tuned at its wave's split (10 programs
    per SM: 10 at B=16) and one past it (11, faster on the H100); per-token keys at the wave
    only, and never past 128 splits or under 64 keys a split."""
    splits = {c.split_k for c in candidate_configs(16, 8, 1, 4, 32768, 1, key_tokens=64)
              if c.kernel == "decode_t" and c.block_m == 4}  # fmt: skip
    assert {10, 11} <= splits and 12 not in splits
    splits = {c.split_k for c in candidate_configs(16, 8, 1, 4, 32768, 1)
              if c.kernel == "decode_t" and c.block_m == 4}  # fmt: skip
    assert 12 in splits and 13 not in splits
    for b, s in ((1, 32768), (1, 640)):  # the wave is already at the cap: 128 splits / S // 64
        splits = {c.split_k for c in candidate_configs(b, 8, 1, 4, s, 1, key_tokens=64)}
        assert max(splits) == min(128, s // 64)


@KERNEL_SETTINGS
@given(
    problem=kv4_problems(decode=False, device=KERNEL_DEVICE, per_channel_keys=True), data=st.data()
)
def test_prefill_kernel_keys_per_channel_matches_float64_reference(problem, data):
    """Flash-attention row tiles over keys per channel: causal, masks, the residual tile."""
    bn = data.draw(st.sampled_from([32, problem.keys.key_tokens]), label="block_n")
    bm = data.draw(st.sampled_from([16, 32]), label="block_m")
    cfg = KernelConfig("prefill", bm, bn, 0)
    hq, hkv = problem.query.shape[1], problem.keys.codes.shape[1]
    assert valid_config(cfg, problem.query.shape[2] * hq // hkv, 1, problem.keys.key_tokens)
    assert_close_rel(_run(problem, cfg), problem.reference64(), problem.query.dtype)


def test_keys_per_channel_refuse_tiles_wider_than_a_group():
    assert not valid_config(KernelConfig("decode", 16, 64, 0, 1), 4, 1, 32)
    assert not valid_config(KernelConfig("decode_grouped", 16, 32, 0, 1), 4, 1, 32)
    assert valid_config(KernelConfig("decode", 16, 32, 0, 1), 4, 1, 32)
    keys = quantize_kv4_keys_per_channel(torch.randn(1, 1, 40, 64), 32)
    values = quantize_kv4(torch.randn(1, 1, 40, 64), SCHEME64)
    problem = KV4Problem(torch.randn(1, 4, 1, 64).half(), keys, values, None, None, False, 0.1)
    with pytest.raises(ValueError, match="BLOCK_N=64 does not divide the 32 tokens"):
        launch_attention(KernelConfig("decode", 16, 64, 0, 1), *problem.args())
    cfg = default_config(1, 1, 1, 4, 40, 1, 32)
    assert valid_config(cfg, 4, 1, 32) and cfg.block_n == 32


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    d=st.sampled_from([64, 128]),
    t=st.sampled_from([32, 64]),
    chunks=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_cache_write_kernel_keys_per_channel_is_bit_exact_with_reference(d, t, chunks, dtype, seed):
    """The per-channel key write kernel (one program per group the write touches) and the
    value write: codes, scales, offsets and residual equal the reference's after each write."""
    gen = torch.Generator().manual_seed(seed)
    b, h, smax = 2, 2, sum(chunks) + 3
    keys = quantize_kv4_keys_per_channel(torch.zeros(b, h, smax, d, dtype=dtype), t)
    values = quantize_kv4(torch.zeros(b, h, smax, d), KVScheme(group_size=d))
    ref = [keys.codes, keys.scales, keys.offsets, values.codes, values.scales, values.offsets]
    ref = [x.clone() for x in ref] + [keys.residual.clone()]
    ours = [x.clone().to(KERNEL_DEVICE) for x in ref]
    start = 0
    for n in chunks:
        key = (torch.randn(b, n, h, d, generator=gen) * 4).to(dtype).transpose(1, 2)
        value = torch.randn(b, h, n, d, generator=gen).to(dtype)
        positions = torch.arange(start, start + n)
        torch.ops.qcompile.kv4_cache_write_channels(key, value, *ref[:6], positions, ref[6])
        kv4_cache_write_cuda(
            key.to(KERNEL_DEVICE), value.to(KERNEL_DEVICE), *ours[:6],
            positions.to(KERNEL_DEVICE), k_residual=ours[6],
        )  # fmt: skip
        start += n
        for got, want in zip(ours, ref, strict=True):
            assert torch.equal(got.cpu(), want)


def test_reference_rejects_bad_shapes():
    keys = quantize_kv4(torch.randn(1, 2, 8, 64), KVScheme(group_size=64))
    bad_q = torch.randn(1, 3, 1, 64)  # 3 query heads over 2 KV heads
    with pytest.raises(ValueError, match="not a multiple of 2 KV heads"):
        kv4_attention_reference(
            bad_q, keys.codes, keys.scales, keys.offsets, keys.codes, keys.scales, keys.offsets,
            None, None, False, 1.0,
        )  # fmt: skip
    with pytest.raises(ValueError, match="does not broadcast"):
        KV4Problem(torch.randn(1, 2, 1, 64), keys, keys, None, torch.ones(1, 1, 1, 9) > 0, False, 1.0).reference64()  # fmt: skip


# --------------------------------------------------------------------------- transformers
# fresh_prefill=False: the prompt too reads the 4-bit cache, the math of the fake caches below
SCHEME64 = KVScheme(group_size=64, fresh_prefill=False)
PROMPT = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


class FakeKV4Cache(StaticCache):
    """transformers' StaticCache holding K/V rounded through quantize -> dequantize: the
    math a KV4 cache must reproduce, through transformers' own attention."""

    def __init__(self, config, max_cache_len: int, scheme: KVScheme, values: bool = True):
        super().__init__(config=config, max_cache_len=max_cache_len)
        self.scheme, self.values = scheme, values

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        def fake(x):
            return dequantize_kv4(quantize_kv4(x, self.scheme), x.dtype)

        if self.values:
            value_states = fake(value_states)
        if self.scheme.rotate_keys:  # round K @ H, rotate back with H (its own inverse)
            h = hadamard_matrix(key_states.shape[-1], key_states.dtype)
            key_states = fake(key_states @ h) @ h
        else:
            key_states = fake(key_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def _generate(model, cache, max_new_tokens: int = 6, prompt=PROMPT, **kwargs):
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
        max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
        return_dict_in_generate=True, **kwargs,
    )  # fmt: skip
    return out.sequences[:, prompt.shape[1] :], torch.stack(out.scores)


@pytest.fixture(scope="module")
def llama_sdpa():
    """Tiny Llama with D=64 and GQA 4:1 (SDPA attention); the fp32 and fake-KV4 baselines."""
    model = tiny_llama(2, head_dim=64, num_key_value_heads=1)
    fp = _generate(model, StaticCache(config=model.config, max_cache_len=24))
    fake = _generate(model, FakeKV4Cache(model.config, 24, SCHEME64))
    return model, fp, fake


def test_kv4_cache_generate_matches_quantized_math_and_stays_close_to_fp(llama_sdpa):
    """generate() with the KV4 cache: through SDPA (dequantized reads) and through the
    qcompile_kv4 attention function (packed reads) it computes the fake-quant model's
    tokens and scores; vs the unquantized cache it differs by the quantization error
    (random tiny model, g64: scores 19% off, measured)."""
    model, (fp_tokens, fp_scores), (fake_tokens, fake_scores) = llama_sdpa
    tokens, scores = _generate(model, KV4Cache(model.config, 24, SCHEME64))
    assert torch.equal(tokens, fake_tokens) and rel_error(scores, fake_scores) < 1e-6
    packed = copy.deepcopy(model)
    enable_kv4_attention(packed)
    cache = KV4Cache(packed.config, 24, SCHEME64)
    assert all(layer.packed_reads for layer in cache.layers)
    tokens, scores = _generate(packed, cache)
    assert torch.equal(tokens, fake_tokens) and rel_error(scores, fake_scores) < 1e-5
    assert int(cache.layers[0].length) == PROMPT.shape[1] + 5  # the last token is not fed back
    err = rel_error(scores, fp_scores)
    assert 1e-3 < err < 0.3, err
    assert torch.equal(tokens[:, 0], fp_tokens[:, 0])


def test_rotated_keys_compute_the_rotated_quantized_math_and_lower_key_error():
    """KVScheme(rotate_keys=True): the packed cache (query @ H in the attention function) and
    the dequantized one (K rotated back) both equal the fake-quant math of rounding K @ H;
    with outlier key channels the 4-bit key error drops (measured 2.5% -> 1.2%)."""
    model = tiny_llama(2, head_dim=64, num_key_value_heads=1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight[[5, 5 + 32, 17]] *= 25
        fp = model(PROMPT).logits
        rotated = KVScheme(group_size=64, rotate_keys=True, fresh_prefill=False)

        def logits(cache):
            return model(PROMPT, past_key_values=cache).logits

        want = logits(FakeKV4Cache(model.config, 12, rotated))
        assert rel_error(logits(KV4Cache(model.config, 12, rotated)), want) < 1e-5
        packed = enable_kv4_attention(model)
        assert rel_error(logits(KV4Cache(packed.config, 12, rotated)), want) < 1e-5
        plain_k = rel_error(logits(FakeKV4Cache(model.config, 12, SCHEME64, values=False)), fp)
        rotated_k = rel_error(logits(FakeKV4Cache(model.config, 12, rotated, values=False)), fp)
    assert rotated_k < 0.5 * plain_k
    h = hadamard_matrix(64, torch.float64)
    assert torch.allclose(h @ h, torch.eye(64, dtype=torch.float64), atol=1e-12)


def test_generate_under_torch_compile_one_graph_no_recompiles(llama_sdpa):
    """The packed cache under generate()'s own torch.compile of the decode step: fullgraph,
    one graph for every position (the length is a tensor), the eager tokens."""
    model, _, (fake_tokens, fake_scores) = llama_sdpa
    model = enable_kv4_attention(copy.deepcopy(model))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    config._compile_all_devices = True  # generate() compiles only on accelerators otherwise
    tokens, scores = _generate(model, KV4Cache(model.config, 24, SCHEME64), compile_config=config)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert torch.equal(tokens, fake_tokens) and rel_error(scores, fake_scores) < 1e-5


def test_compiled_decode_guards_per_layer():
    """Each compiled call evaluates the step's guards; a KV4 layer's are its own tensors and
    flags. No aliasing guards from the shared scheme or `dataclasses.replace` (Dynamo
    evaluates those in Python; torch 2.13: 34 -> 24 guards a layer)."""
    model = enable_kv4_attention(tiny_llama(2, head_dim=64, num_key_value_heads=1))
    cache = KV4Cache(model.config, 24, SCHEME64)
    seen = []

    def record(entries):
        seen.extend(entries)
        return [True] * len(entries)

    torch._dynamo.reset()
    step = torch.compile(model.forward, backend="eager", fullgraph=True,
                         options={"guard_filter_fn": record})  # fmt: skip
    with torch.no_grad():
        model(PROMPT[:, :4], past_key_values=cache)
        pos = torch.tensor([4])
        step(input_ids=PROMPT[:, :1], past_key_values=cache, cache_position=pos,
             position_ids=pos[None])  # fmt: skip
    layer = [e for e in seen if "layers[1]" in e.name]
    assert sum(e.guard_type == "TENSOR_MATCH" for e in layer) == 7  # 6 buffers + length
    assert not [e.name for e in layer if e.guard_type == "DUPLICATE_INPUT"]
    assert not [e.name for e in layer if ".scheme" in e.name or "dataclass" in e.name]


class FreshPrefillFakeCache(FakeKV4Cache):
    """FakeKV4Cache whose update of several tokens hands attention those tokens unrounded
    (`KVScheme.fresh_prefill`): what the cache stores is still the rounded values."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: dict[int, int] = {}  # tokens written per layer

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        n, start = key_states.shape[2], self.seen.get(layer_idx, 0)
        self.seen[layer_idx] = start + n
        if n > 1:
            keys, values = keys.clone(), values.clone()
            keys[:, :, start : start + n] = key_states
            values[:, :, start : start + n] = value_states
        return keys, values


@pytest.mark.parametrize("per_channel", [False, True])
def test_fresh_prefill_reads_the_prompt_in_16_bits_and_decodes_from_4_bits(per_channel):
    """Default KVScheme (fresh_prefill): the prompt's logits are the unquantized model's (it
    sees only itself, in 16 bits), a second chunk sees the first in 4 bits and itself in 16
    (transformers' SDPA over a fake cache doing exactly that), one-token steps read 4 bits."""
    model = enable_kv4_attention(tiny_llama(2, head_dim=64, num_key_value_heads=1))
    scheme = KVScheme(group_size=64, key_tokens=32 if per_channel else 0)
    with torch.no_grad():
        fp = model(PROMPT).logits
        cache = KV4Cache(model.config, 40, scheme)
        first = model(PROMPT, past_key_values=cache).logits
        assert rel_error(first, fp) < 1e-5
        second = model(PROMPT[:, :5], past_key_values=cache).logits
        step = model(PROMPT[:, :1], past_key_values=cache).logits
        if not per_channel:
            plain = copy.deepcopy(model)
            plain.set_attn_implementation("sdpa")
            fake = FreshPrefillFakeCache(plain.config, 40, scheme)
            plain(PROMPT, past_key_values=fake)
            want = plain(PROMPT[:, :5], past_key_values=fake).logits
            assert rel_error(second, want) < 1e-5
            assert rel_error(step, plain(PROMPT[:, :1], past_key_values=fake).logits) < 1e-5
        old = KV4Cache(model.config, 40, dataclasses.replace(scheme, fresh_prefill=False))
        stale = model(PROMPT, past_key_values=old).logits
        assert rel_error(stale, fp) > 1e-3  # the 4-bit prompt read differs, as it should
        assert int(cache.layers[0].length) == 18 and cache.layers[0].host_length == 18


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("start", [0, 7, 33])
def test_prefill_op_fast_path_matches_reference_and_float64(per_channel, start):
    """kv4_prefill_attention: the CUDA function (plain torch, run here on CPU) equals the
    reference; the reference equals float64 math of SDPA over [4-bit past, 16-bit chunk]."""
    gen = torch.Generator().manual_seed(start)
    b, hq, hkv, s, d, sq = 2, 8, 2, 64, 64, 9
    past = torch.randn(b, hkv, s, d, generator=gen)
    kq = (quantize_kv4_keys_per_channel(past, 32) if per_channel
          else quantize_kv4(past, KVScheme(group_size=32)))  # fmt: skip
    vq = quantize_kv4(torch.randn(b, hkv, s, d, generator=gen), KVScheme(group_size=64))
    q = torch.randn(b, sq, hq, d, generator=gen).transpose(1, 2)  # a projection's layout
    k, v = torch.randn(b, hkv, sq, d, generator=gen), torch.randn(b, hkv, sq, d, generator=gen)
    pos = torch.arange(start, start + sq)
    length = torch.tensor(start + sq)
    args = (q, k, v, kq.codes, kq.scales, kq.offsets, vq.codes, vq.scales, vq.offsets, pos)
    res = kq.residual
    for mask in (None, torch.rand(b, 1, sq, s, generator=gen) > 0.2):
        ref = kv4_prefill_attention_reference(*args, mask, 0.125, res, length)
        fast = kv4_prefill_attention_fast(*args, mask, 0.125, res, length)
        assert rel_error(fast, ref) < 1e-5
        hinted = kv4_prefill_attention_fast(*args, mask, 0.125, res, length, start)
        assert rel_error(hinted, ref) < 1e-5
        # the layout the fake promises (Inductor asserts it on compiled graphs)
        assert ref.is_contiguous() and fast.is_contiguous() and hinted.is_contiguous()
        kp = dequantize_kv4(dataclasses.replace(kq, length=length), torch.float64)
        kp = kp.clone()
        kp[:, :, pos] = k.double()
        vp = dequantize_kv4(vq, torch.float64).clone()
        vp[:, :, pos] = v.double()
        kp, vp = kp.repeat_interleave(4, 1), vp.repeat_interleave(4, 1)
        scores = q.double() @ kp.transpose(-1, -2) * 0.125
        visible = torch.arange(s)[None, :] <= pos[:, None]
        if mask is not None:
            visible = visible & mask
        probs = scores.masked_fill(~visible, -math.inf).softmax(-1).nan_to_num(0.0)
        assert rel_error(ref, (probs @ vp).float()) < 1e-5
    with pytest.raises(ValueError, match="consecutive"):
        kv4_prefill_attention_fast(*args[:-1], pos.flip(0), None, 0.125, res, length)


def test_kv4_cache_memory_is_under_0_3x_of_fp16():
    """Bytes of the allocated buffers, KV4 vs transformers' fp16 StaticCache (D = 128)."""
    model = tiny_llama(2, head_dim=128, num_key_value_heads=2)
    sizes = {}
    for name, cache in (
        ("fp16", StaticCache(config=model.config, max_cache_len=256)),
        ("g128", KV4Cache(model.config, 256, KVScheme(group_size=128))),
        ("g64", KV4Cache(model.config, 256, KVScheme(group_size=64))),
    ):
        cache.early_initialization(4, 2, 128, torch.float16, torch.device("cpu"))
        sizes[name] = sum(
            t.numel() * t.element_size()
            for layer in cache.layers
            for t in (
                layer.tensors() if isinstance(layer, KV4Layer) else (layer.keys, layer.values)
            )
        )
    assert sizes["fp16"] == 2 * 2 * 4 * 2 * 256 * 128 * 2
    assert sizes["g128"] / sizes["fp16"] == pytest.approx(68 / 256)  # 0.266
    assert sizes["g64"] / sizes["fp16"] == pytest.approx(72 / 256)  # 0.281


SCHEME_K32 = KVScheme(group_size=64, key_tokens=32, fresh_prefill=False)


class FakeChannelKV4Cache(StaticCache):
    """StaticCache returning keys as a per-channel KV4 cache holds them after each write:
    complete groups of the tokens so far fake-quantized, the incomplete one unrounded."""

    def __init__(self, config, max_cache_len: int, scheme: KVScheme):
        super().__init__(config=config, max_cache_len=max_cache_len)
        self.scheme, self.raw = scheme, {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        raw = torch.cat((self.raw.get(layer_idx, key_states[:, :, :0]), key_states), dim=2)
        self.raw[layer_idx] = raw
        values = dequantize_kv4(quantize_kv4(value_states, self.scheme), value_states.dtype)
        keys, values = super().update(key_states, values, layer_idx, *args, **kwargs)
        # the write that completes a group rounds its earlier tokens too
        fake = quantize_kv4_keys_per_channel(raw, self.scheme.key_tokens)
        keys[:, :, : raw.shape[2]] = dequantize_kv4(fake, raw.dtype)
        return keys, values


def test_kv4_cache_keys_per_channel_generate_matches_the_decode_math():
    """generate() over keys per channel (T = 32; prompt 12 + 40 new tokens crosses a group):
    SDPA on dequantized reads and the qcompile_kv4 function on packed reads both give the
    tokens and scores of the fake-quant cache that rounds each group once it is complete."""
    model = tiny_llama(2, head_dim=64, num_key_value_heads=1)

    def run(m, cache):
        return _generate(m, cache, max_new_tokens=40)

    want_tokens, want_scores = run(model, FakeChannelKV4Cache(model.config, 60, SCHEME_K32))
    tokens, scores = run(model, KV4Cache(model.config, 60, SCHEME_K32))
    assert torch.equal(tokens, want_tokens) and rel_error(scores, want_scores) < 1e-5
    packed = enable_kv4_attention(copy.deepcopy(model))
    cache = KV4Cache(packed.config, 60, SCHEME_K32)
    tokens, scores = run(packed, cache)
    assert torch.equal(tokens, want_tokens) and rel_error(scores, want_scores) < 1e-5
    layer = cache.layers[0]
    assert int(layer.length) == 51 and layer.key_cache.key_tokens == 32
    assert layer.key_cache.scales.shape == (2, 1, 2, 64)  # ceil(60 / 32) groups x D channels


def test_keys_per_channel_under_torch_compile_and_through_the_attention_pass():
    """The packed cache under generate()'s torch.compile (fullgraph, one graph for every
    position); SDPA over the dequantized keys rewritten by the pass into kv4_attention with
    the residual and seq_lens = length (logits as eager)."""
    model = tiny_llama(1, head_dim=64, num_key_value_heads=1)
    packed = enable_kv4_attention(copy.deepcopy(model))
    want = _generate(packed, KV4Cache(packed.config, 60, SCHEME_K32), max_new_tokens=40)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    config._compile_all_devices = True
    got = _generate(
        packed, KV4Cache(packed.config, 60, SCHEME_K32), max_new_tokens=40, compile_config=config
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert torch.equal(got[0], want[0]) and rel_error(got[1], want[1]) < 1e-5

    caches = [KV4Cache(model.config, 60, SCHEME_K32) for _ in range(2)]
    prompt = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for cache in caches:
            model(prompt, past_key_values=cache)
        graphs = []
        torch._dynamo.reset()
        step = torch.compile(model, backend=_capture_pass(graphs), fullgraph=True)
        mask = torch.ones(2, 41, dtype=torch.long)
        token = prompt[:, :1]
        out = step(token, past_key_values=caches[0], attention_mask=mask).logits
        ref = model(token, past_key_values=caches[1], attention_mask=mask).logits
    ((_, after, report),) = graphs
    assert rel_error(out, ref) < 1e-5
    calls = [n for n in after.graph.nodes if n.target == torch.ops.qcompile.kv4_attention.default]
    assert len(calls) == 1 and calls[0].args[11] is not None  # k_residual
    assert [r.status for r in report.attention] == ["quantized"]


def test_kv4_cache_keys_per_channel_memory():
    """Bytes of the allocated buffers (residual included) vs fp16 StaticCache, D = 128,
    T = 64, 4096 positions: (D + 4 + 4 D / T) per token and head plus the residual."""
    model = tiny_llama(2, head_dim=128, num_key_value_heads=2)
    fp16 = StaticCache(config=model.config, max_cache_len=4096)
    kv4 = KV4Cache(model.config, 4096, KVScheme(group_size=128, key_tokens=64))
    for cache in (fp16, kv4):
        cache.early_initialization(1, 2, 128, torch.float16, torch.device("cpu"))
    fp16_bytes = sum(t.nbytes for layer in fp16.layers for t in (layer.keys, layer.values))
    ratio = kv4.nbytes() / fp16_bytes
    assert ratio == pytest.approx((140 + 64 * 128 * 2 / 4096) / 512)  # 0.281
    assert ratio <= 0.3


def test_kv4_cache_refuses_what_it_cannot_hold():
    model = tiny_llama(1)  # head_dim 32
    with pytest.raises(ValueError, match="head_dim=32 is not divisible by group_size=128"):
        KV4Cache(model.config, 16)
    sliding = tiny_llama(1, head_dim=64, layer_types=["sliding_attention"], sliding_window=8)
    with pytest.raises(ValueError, match="not supported"):
        KV4Cache(sliding.config, 16, SCHEME64)


def test_smooth_attention_keeps_the_model_and_lowers_key_error():
    """Folded into q_proj/k_proj: the fp32 model is unchanged; with outlier key channels the
    error of 4-bit keys drops (measured: 2.5% -> 0.9% of the logits; V is untouched)."""
    model = tiny_llama(2, head_dim=64, num_key_value_heads=1)

    def key_error():  # logits with only K in 4 bits, vs fp
        cache = FakeKV4Cache(model.config, 12, SCHEME64, values=False)
        return rel_error(model(PROMPT, past_key_values=cache).logits, fp)

    with torch.no_grad():
        for layer in model.model.layers:  # a rotated pair and one more channel 25x larger
            layer.self_attn.k_proj.weight[[5, 5 + 32, 17]] *= 25
        fp = model(PROMPT).logits
        before = key_error()
    scales = smooth_attention_(model, [PROMPT[:, :8]], alpha=0.5)
    assert set(scales) == {f"model.layers.{i}.self_attn" for i in range(2)}
    with torch.no_grad():
        assert rel_error(model(PROMPT).logits, fp) < 1e-5
        assert key_error() < 0.5 * before


# --------------------------------------------------------------------------- the pass
def _capture_pass(graphs: list, config: QuantConfig | None = None):
    """A torch.compile backend running only the attention pass (no Inductor): fast, and the
    rewritten graph runs eagerly so its numbers can be compared."""

    def backend(gm, example_inputs):
        new = _fresh_graph_module(gm)
        report = CompileReport(graphs=1)
        rewrite_attention(new, config or QuantConfig(), report)
        graphs.append((gm, new, report))
        return new.forward

    return backend


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_pass_rewrites_attention_over_a_kv4_cache(attn):
    """SDPA and the eager matmul-softmax-matmul form (with repeat_kv, scale, mask) reading a
    KV4 cache become kv4_attention: no dequantize, no fp K/V; the decode step's logits equal
    the eager model's."""
    model = tiny_llama(2, head_dim=64, num_key_value_heads=1, attn_implementation=attn)
    caches = [KV4Cache(model.config, 16, SCHEME64) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(PROMPT[:, :8], past_key_values=cache)
        graphs = []
        torch._dynamo.reset()
        step = torch.compile(model, backend=_capture_pass(graphs), fullgraph=True)
        mask = torch.ones(2, 9, dtype=torch.long)
        out = step(PROMPT[:, 8:9], past_key_values=caches[0], attention_mask=mask).logits
        want = model(PROMPT[:, 8:9], past_key_values=caches[1], attention_mask=mask).logits
    ((before, after, report),) = graphs
    assert rel_error(out, want) < 1e-5
    targets = _targets(after)
    assert targets.count(torch.ops.qcompile.kv4_attention.default) == 2
    assert torch.ops.qcompile.kv4_dequantize not in targets
    assert torch._C._nn.scaled_dot_product_attention not in targets
    assert torch.nn.functional.softmax not in targets
    assert _targets(before).count(torch.ops.qcompile.kv4_dequantize) == 4  # Dynamo's is intact
    assert [(r.name, r.form, r.heads, r.head_dim, r.status) for r in report.attention] == [
        (f"model.layers.{i}.self_attn", attn, (4, 1), 64, "quantized") for i in range(2)
    ]
    assert "2 attention: 2 quantized" in report.summary()


def test_attention_pass_rewrites_causal_prefill_over_the_first_positions():
    """A compiled prefill into an empty static cache: transformers slices K/V to the first Sq
    positions and calls SDPA with is_causal and no mask (5.23): kv4_attention with seq_lens
    = Sq; or over the whole cache with the causal mask materialized (5.17, the H100's):
    kv4_attention with that mask and no seq_lens. The logits are right either way."""
    model = tiny_llama(1, head_dim=64, num_key_value_heads=1)
    caches = [KV4Cache(model.config, 16, SCHEME64) for _ in range(2)]
    graphs = []
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=_capture_pass(graphs), fullgraph=True)(
            PROMPT, past_key_values=caches[0]
        ).logits
        want = model(PROMPT, past_key_values=caches[1]).logits
    ((_, after, report),) = graphs
    assert rel_error(out, want) < 1e-5
    (node,) = [n for n in after.graph.nodes if n.target == torch.ops.qcompile.kv4_attention.default]
    seq_lens, mask, causal = node.args[7:10]
    if mask is None:
        assert causal is True
        assert seq_lens.target is torch.full and seq_lens.args == ((2,), PROMPT.shape[1])
    else:
        assert isinstance(mask, torch.fx.Node) and not causal and seq_lens is None
    assert [r.status for r in report.attention] == ["quantized"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_pass_leaves_attention_without_kv4_cache_alone(attn):
    """No KV4 cache: nothing to read in 4 bits; the graph is unchanged and the report says why."""
    model = tiny_llama(1, head_dim=64, num_key_value_heads=1, attn_implementation=attn)
    graphs = []
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=_capture_pass(graphs))(PROMPT)
    ((before, after, report),) = graphs
    assert _targets(after) == _targets(before)
    (record,) = report.attention
    assert (record.form, record.status) == (attn, "skipped")
    assert "not read from a KV4 cache" in record.detail


@pytest.mark.parametrize("pack", [True, False])
def test_gqa_decode_step_runs_on_the_kv_heads(pack):
    """A one-token SDPA over repeat_kv'd K/V of an fp cache: packed, it becomes
    decode_attention on the unrepeated K/V and the repeat (expand + reshape) is gone; logits
    equal the eager model's. The prefill (Sq > 1) and pack_gqa_decode=False keep repeat_kv."""
    model = tiny_llama(2, head_dim=64, num_key_value_heads=1)
    caches = [StaticCache(config=model.config, max_cache_len=16) for _ in range(2)]
    graphs = []
    torch._dynamo.reset()
    step = torch.compile(
        model, backend=_capture_pass(graphs, QuantConfig(pack_gqa_decode=pack)), fullgraph=True
    )
    with torch.no_grad():
        for cache in caches:
            model(PROMPT[:, :8], past_key_values=cache)
        mask = torch.ones(2, 9, dtype=torch.long)
        out = step(PROMPT[:, 8:9], past_key_values=caches[0], attention_mask=mask).logits
        want = model(PROMPT[:, 8:9], past_key_values=caches[1], attention_mask=mask).logits
    ((before, after, report),) = graphs
    assert rel_error(out, want) < 1e-5
    sdpa = [n for n in after.graph.nodes if n.target == torch._C._nn.scaled_dot_product_attention]
    decode = [
        n for n in after.graph.nodes if n.target == torch.ops.qcompile.decode_attention.default
    ]
    if pack:  # the 4 repeat_kv expands (2 layers x K, V) are gone; RoPE's one stays
        assert len(decode) == 2 and not sdpa
        assert _targets(before).count("expand") - _targets(after).count("expand") == 4
        for node in decode:  # q [B, Hq=4, 1, D], K and V [B, Hkv=1, S, D], scale 1/sqrt(D)
            q, k, v, mask, scale = node.args
            assert q.meta["example_value"].shape[1:] == (4, 1, 64)
            assert k.meta["example_value"].shape[1] == v.meta["example_value"].shape[1] == 1
            assert mask is not None and scale == 64**-0.5
    else:
        assert len(sdpa) == 2 and not decode
        assert _targets(after) == _targets(before)
    for record in report.attention:
        assert record.status == "skipped"
        assert ("GQA packing (one query, 4 query heads per KV head)" in record.detail) is pack


def test_attention_pass_reports_fallbacks_and_the_attention_function():
    """A KV4-fed eager attention whose weights are returned stays as is (fallback, warned);
    the qcompile_kv4 attention function's calls are reported as prequantized."""
    model = tiny_llama(1, head_dim=64, num_key_value_heads=1, attn_implementation="eager")
    cache = KV4Cache(model.config, 16, SCHEME64)
    graphs = []
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=_capture_pass(graphs))(
            PROMPT, past_key_values=cache, output_attentions=True
        )
    (record,) = graphs[0][2].attention
    assert record.status == "fallback" and "attention weights are used elsewhere" in record.detail
    packed = enable_kv4_attention(tiny_llama(1, head_dim=64, num_key_value_heads=1))
    graphs = []
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(packed, backend=_capture_pass(graphs))(
            PROMPT, past_key_values=KV4Cache(packed.config, 16, SCHEME64)
        )
    (record,) = graphs[0][2].attention
    assert (record.form, record.status, record.heads) == ("kv4", "prequantized", (4, 1))


def test_qcompile_backend_generate_with_kv4_cache_and_w4a16_linears():
    """End to end through AOT autograd and Inductor: generate() compiles the decode step with
    the qcompile backend; the W4A16 linears (quantize_) and the attention over the KV4 cache,
    rewritten into kv4_attention, give the eager model's tokens and scores."""
    model = tiny_llama(1, head_dim=64, num_key_value_heads=1)
    config = QuantConfig(Scheme(group_size=64))
    qcompile.quantize_(model, config)
    want_tokens, want_scores = _generate(model, KV4Cache(model.config, 24, SCHEME64))
    backend = qcompile.backend(config)
    # CompileConfig deep-copies its fields (and so the backend and its report); a function
    # is copied by reference
    compile_config = CompileConfig(fullgraph=True, backend=lambda *a, **k: backend(*a, **k))
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    tokens, scores = _generate(
        model, KV4Cache(model.config, 24, SCHEME64), compile_config=compile_config
    )
    assert torch.equal(tokens, want_tokens) and rel_error(scores, want_scores) < 1e-5
    assert [(r.form, r.status) for r in backend.report.attention] == [("sdpa", "quantized")]
    statuses = sorted(r.status for r in backend.report.records)
    assert statuses == ["prequantized"] * 7 + ["skipped"]  # lm_head


@pytest.mark.parametrize("packed_reads", [False, True], ids=["sdpa", "qcompile_kv4"])
@pytest.mark.parametrize("fresh_prefill", [True, False])
def test_qcompile_backend_compiles_prefill_over_a_kv4_cache(fresh_prefill, packed_reads):
    """`model.forward` compiled with the backend (what `qcompile generate --compile on` does),
    prompts of two lengths (the second compiles with a symbolic length): generate() gives the
    eager tokens. Through SDPA every attention, the dynamic prompt's too, is rewritten into
    kv4_attention; through the qcompile_kv4 function the prompt runs kv4_prefill_attention
    (fresh_prefill), whose real outputs must have the strides its fake promises (Inductor
    asserts them; a model's query is a transposed projection)."""
    torch._dynamo.reset()
    model = tiny_llama(1, head_dim=64, num_key_value_heads=1)
    if packed_reads:
        enable_kv4_attention(model)
    config = QuantConfig(Scheme(group_size=64))
    qcompile.quantize_(model, config)
    scheme = KVScheme(group_size=64, fresh_prefill=fresh_prefill)
    prompts = [PROMPT, PROMPT[:, :9]]

    def run():
        return [_generate(model, KV4Cache(model.config, 24, scheme), prompt=p) for p in prompts]

    want = run()
    backend = qcompile.backend(config)
    forward = model.forward
    model.forward = torch.compile(forward, backend=backend)
    try:
        got = run()
    finally:
        model.forward = forward
        torch._dynamo.reset()
    for (tokens, scores), (want_tokens, want_scores) in zip(got, want, strict=True):
        assert torch.equal(tokens, want_tokens) and rel_error(scores, want_scores) < 1e-5
    statuses = {r.status for r in backend.report.attention}
    assert statuses == {"prequantized" if packed_reads else "quantized"}, [
        (r.status, r.detail) for r in backend.report.attention
    ]
    assert len(backend.report.attention) == 3  # prompt, decode step, dynamic-length prompt


# --------------------------------------------------------------------------- on the H100
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("sq", "s"), [(1, 4100), (1, 32768), (300, 300), (64, 4096)])
def test_op_on_cuda_tunes_and_matches_float64(dtype, sq, s, monkeypatch, tmp_path):
    """The op's CUDA path (autotuned) at benchmark head counts: 32 query / 8 KV heads, D=128."""
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "1")
    gen = torch.Generator().manual_seed(s)
    keys = quantize_kv4(torch.randn(1, 8, s, 128, generator=gen), KVScheme())
    _assert_op_on_cuda_matches(keys, gen, sq, s, dtype)


def _assert_op_on_cuda_matches(keys: PackedKV4, gen, sq: int, s: int, dtype) -> None:
    """kv4_attention on CUDA over `keys` and random per-token values (32 query / 8 KV heads,
    D=128) equals the float64 reference."""
    values = quantize_kv4(torch.randn(1, 8, s, 128, generator=gen), KVScheme())
    q = torch.randn(1, 32, sq, 128, generator=gen).to(dtype)
    problem = KV4Problem(q, keys, values, None, None, sq > 1, 128**-0.5)
    cuda = [t.cuda() if isinstance(t, torch.Tensor) else t for t in problem.args()]
    assert_close_rel(torch.ops.qcompile.kv4_attention(*cuda), problem.reference64(), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("key_tokens", [0, 64])
def test_staged_v_decode_configs_on_cuda_match_float64(dtype, key_tokens):
    """Every decode tile with V staged through shared memory (STAGE_V, only a real compile
    changes anything) at S = 4100, 32 query / 8 KV heads, D = 128, splits 1 and 4 (the
    second self-reducing), against the float64 reference."""
    gen = torch.Generator().manual_seed(4100 + key_tokens)
    s = 4100
    k = torch.randn(1, 8, s, 128, generator=gen)
    k[..., 5] *= 20
    keys = (quantize_kv4_keys_per_channel(k.to(dtype), key_tokens) if key_tokens
            else quantize_kv4(k, KVScheme()))  # fmt: skip
    values = quantize_kv4(torch.randn(1, 8, s, 128, generator=gen), KVScheme())
    q = torch.randn(1, 32, 1, 128, generator=gen).to(dtype)
    problem = KV4Problem(q, keys, values, None, None, False, 128**-0.5)
    want = problem.reference64()
    args = [t.cuda() if isinstance(t, torch.Tensor) else t for t in problem.args()]
    staged = [c for c in candidate_configs(1, 8, 1, 4, s, 1, key_tokens) if c.stage_v]
    assert staged
    for cfg in {dataclasses.replace(c, split_k=sp) for c in staged for sp in (1, 4)}:
        assert_close_rel(launch_attention(cfg, *args).cpu(), want, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("switch", ["_Q_ROWS"])
def test_decode_switches_on_cuda_keep_the_error(dtype, switch):
    """`_Q_ROWS` (per-token keys, the query read as whole rows) compiled for the GPU: the
    default decode config and three other tiles, splits 1 and 4, at S = 4100 against
    float64, within 1% of the plain kernel's error (the same arithmetic read differently)."""
    slack = 1.01
    gen = torch.Generator().manual_seed(41)
    s = 4100
    k = torch.randn(1, 8, s, 128, generator=gen)
    k[..., 5] *= 20
    keys = quantize_kv4(k, KVScheme())
    values = quantize_kv4(torch.randn(1, 8, s, 128, generator=gen), KVScheme())
    q = torch.randn(1, 32, 1, 128, generator=gen).to(dtype)
    problem = KV4Problem(q, keys, values, None, None, False, 128**-0.5)
    want = problem.reference64()
    args = [t.cuda() if isinstance(t, torch.Tensor) else t for t in problem.args()]
    tiles = [default_config(1, 8, 1, 4, s)] + [
        KernelConfig("decode", 16, bn, 0, 1, w, 3) for bn, w in ((32, 1), (64, 1), (128, 2))
    ]
    for cfg in {dataclasses.replace(c, split_k=sp) for c in tiles for sp in (1, 4)}:
        assert valid_config(cfg, 4)
        plain = rel_error(launch_attention(cfg, *args).cpu(), want)
        with mock.patch.object(kv4_attention, switch, True):
            got = launch_attention(cfg, *args).cpu()
        assert_close_rel(got, want, dtype)
        assert rel_error(got, want) <= slack * plain + 1e-6, (cfg, plain)


@pytest.mark.gpu
@pytest.mark.parametrize("b, split", [(2, 12), (2, 64), (1, 96)])
def test_reduce_pdl_on_cuda_is_exact_and_graph_capturable(b, split):
    """`_REDUCE_PDL`: the split reduce launched with programmatic dependent launch (forced on
    at every row count; B=1's 32 rows take it by default) after a decode_t grid past the
    self-reduce splits reads every partial only after that grid: the output equals the
    plain launch's bit for bit, eagerly and replayed in a CUDA graph."""
    gen = torch.Generator().manual_seed(43)
    s = 4100
    keys, values = (
        quantize_kv4(torch.randn(b, 8, s, 128, generator=gen), KVScheme()) for _ in "kv"
    )
    q = torch.randn(b, 32, 1, 128, generator=gen).half()
    problem = KV4Problem(q, keys, values, None, None, False, 128**-0.5)
    args = [t.cuda() if isinstance(t, torch.Tensor) else t for t in problem.args()]
    cfg = KernelConfig("decode_t", 4, 32, 0, split, 1, 3, True, stage_v=True)
    assert split > kv4_attention._SELF_REDUCE_SPLITS  # the reduce is a second launch
    with mock.patch.object(kv4_attention, "_REDUCE_PDL", 0):
        plain = launch_attention(cfg, *args)
    with mock.patch.object(kv4_attention, "_REDUCE_PDL", 1 << 30):
        got = launch_attention(cfg, *args)
        out = torch.empty_like(got)
        launch_attention(cfg, *args, out=out)  # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            launch_attention(cfg, *args, out=out)
        out.zero_()
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, plain) and torch.equal(out, plain)
    assert_close_rel(plain.cpu(), problem.reference64(), torch.float16)


@pytest.mark.gpu
def test_kv4_pdl_chain_on_cuda_is_exact_under_cuda_graphs():
    """`_KV4_PDL`: in a CUDA graph, a kernel writes the new K and V (negates them each
    replay), the cache write (PDL: waits, then lets the attention be placed) quantizes them
    into the cache, and decode_t (PDL: waits) reads the cache and a query the producer also
    changed. Every replay equals the plain launches' bits; a read before either wait would
    see the previous replay's values."""
    gen = torch.Generator().manual_seed(44)
    b, hkv, s, d = 2, 8, 1000, 128
    keys, values = (
        quantize_kv4(torch.randn(b, hkv, s, d, generator=gen), KVScheme()) for _ in "kv"
    )
    cache = [t.cuda() for p in (keys, values) for t in (p.codes, p.scales, p.offsets)]
    new_k, new_v = (torch.randn(b, hkv, 1, d, generator=gen).half().cuda() for _ in "kv")
    q = torch.randn(b, 32, 1, d, generator=gen).half().cuda()
    pos = torch.tensor([s - 1], device="cuda")
    cfg = KernelConfig("decode_t", 4, 32, 0, 4, 1, 3, True, stage_v=True)
    out = torch.empty_like(q)

    def step():
        for t in (new_k, new_v, q):
            t.mul_(-1.0)  # the producer: a plain kernel right before the write
        kv4_cache_write_cuda(new_k, new_v, *cache, pos)
        launch_attention(cfg, q, *cache, None, None, False, d**-0.5, out=out)

    start = [t.clone() for t in (new_k, new_v, q, *cache)]

    def reset():
        for t, v in zip((new_k, new_v, q, *cache), start, strict=True):
            t.copy_(v)

    want = []
    for _ in range(3):
        step()
        want.append(out.clone())
    with mock.patch.object(kv4_attention, "_KV4_PDL", True):
        reset()
        step()  # warm-up (compiles) outside the capture
        assert torch.equal(out, want[0])
        reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        reset()
        for i in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, want[i]), i


def _random_packed_kv4(b: int, s: int, groups: int, gen: torch.Generator) -> PackedKV4:
    """Uniform codes, scales ~0.35 and offsets ~-2.6 (a randn token's), made on the GPU
    without a float [B, 8, S, 128] copy (17 GB at B=128, S=32k)."""
    codes = torch.randint(0, 256, (b, 8, s, 64), dtype=torch.uint8, device="cuda", generator=gen)
    scales = 0.3 + 0.1 * torch.rand(b, 8, s, groups, device="cuda", generator=gen)
    offsets = -2.4 - 0.4 * torch.rand(b, 8, s, groups, device="cuda", generator=gen)
    return PackedKV4(codes, scales.half(), offsets.half(), 128 // groups)


def _batch(p: PackedKV4, i: int) -> PackedKV4:
    return dataclasses.replace(
        p, codes=p.codes[i : i + 1], scales=p.scales[i : i + 1], offsets=p.offsets[i : i + 1]
    )


@pytest.mark.gpu
@pytest.mark.parametrize("groups", [1, 2])
def test_cache_past_2_to_the_31_bytes_reads_its_last_batch(groups):
    """B=128, S=32768, 8 KV heads: K's codes are 2**31 bytes, so the last batch's offsets
    pass int32 (the kernels advance to each (batch, head) slab by a 64-bit offset). The
    first and last batches against float64, for both decode kernels (one group per head:
    "decode", two: "decode_grouped"); a wrapped offset reads another batch's tokens."""
    gen = torch.Generator(device="cuda").manual_seed(groups)
    b, s = 128, 32768
    keys, values = (_random_packed_kv4(b, s, groups, gen) for _ in "kv")
    assert keys.codes.numel() >= 2**31
    q = torch.randn(b, 32, 1, 128, device="cuda", generator=gen).half()
    cfg = default_config(b, 8, 1, 4, s, groups)
    assert cfg.kernel == decode_kind(groups)
    out = launch_attention(cfg, *KV4Problem(q, keys, values, None, None, False, 128**-0.5).args())
    for i in (0, b - 1):
        one = KV4Problem(q[i : i + 1], _batch(keys, i), _batch(values, i), None, None, False,
                         128**-0.5)  # fmt: skip
        assert_close_rel(out[i : i + 1], one.reference64(), torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["decode", "decode_t"])
def test_centered_v_codes_keep_one_program_over_32k_keys_accurate(kind):
    """P @ V accumulates in place in the tensor cores, whose fp32 adds truncate: with V's
    codes as 0..15 the error grew with the keys one program reads (1.6e-2 relative at 16k
    keys per program on the H100). As code - 8 (programs over `_CENTER_V_KEYS` keys), the
    shipped tile unsplit over 32k keys stays within 2e-3 and at least 4x below the
    uncentered kernel."""
    torch.manual_seed(0)
    s = 32768 - 5
    keys, values = (
        quantize_kv4(torch.randn(1, 8, s, 128, device="cuda"), KVScheme()) for _ in "kv"
    )  # fmt: skip
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.float16)
    problem = KV4Problem(q, keys, values, None, None, False, 128**-0.5)
    want = problem.reference64()
    bm = 16 if kind == "decode" else 4
    cfg = KernelConfig(kind, bm, 32, 0, 1, 1, 3, True, stage_v=True)
    centered = rel_error(launch_attention(cfg, *problem.args()), want)
    with mock.patch.object(kv4_attention, "_CENTER_V_KEYS", 1 << 30):
        plain = rel_error(launch_attention(cfg, *problem.args()), want)
    assert centered <= 2e-3 and 4 * centered <= plain, (centered, plain)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_keys_as_16_plus_code_on_cuda_keep_the_error(dtype, kind):
    """`_KEY_BIAS16` on the tensor cores: a bias inside the dot once cost 1.5e-2 relative on
    the H100 (1024 + code), so the error against float64 must stay within 1.5x of the plain
    unpacking's, not just under the dtype's tolerance. S = 4100, K outlier channels."""
    gen = torch.Generator().manual_seed(7)
    s, sq = 4100, 1 if kind == "decode" else 256
    k = torch.randn(1, 8, s, 128, generator=gen)
    k[..., [5, 77]] *= 20
    v = torch.randn(1, 8, s, 128, generator=gen)
    keys, values = quantize_kv4(k, KVScheme()), quantize_kv4(v, KVScheme())
    q = torch.randn(1, 32, sq, 128, generator=gen).to(dtype)
    problem = KV4Problem(q, keys, values, None, None, sq > 1, 128**-0.5)
    want = problem.reference64()
    args = [t.cuda() if isinstance(t, torch.Tensor) else t for t in problem.args()]
    cfg = (KernelConfig("decode", 16, 64, 0, 4, 1, 3, True, stage_v=True) if kind == "decode"
           else KernelConfig("prefill", 64, 64, 0, 1, 4, 2))  # fmt: skip
    plain = rel_error(launch_attention(cfg, *args).cpu(), want)
    with mock.patch.object(kv4_attention, "_KEY_BIAS16", True):
        biased = rel_error(launch_attention(cfg, *args).cpu(), want)
    assert biased <= 1.5 * plain + 1e-5, (plain, biased)


@pytest.mark.gpu
def test_generate_on_cuda_with_cuda_graphs_and_memory():
    """fp16 tiny Llama on the GPU: generate() with its default compiled decode step
    (Inductor, reduce-overhead) over the packed cache gives the eager tokens; the cache's
    allocation is <= 0.3x of transformers' fp16 StaticCache, by the CUDA allocator."""
    model = enable_kv4_attention(tiny_llama(2, head_dim=128, num_key_value_heads=2)).half().cuda()
    prompt = PROMPT.cuda()

    def run(cache, **kwargs):
        return model.generate(
            prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
            max_new_tokens=8, do_sample=False, **kwargs,
        )  # fmt: skip

    eager = run(KV4Cache(model.config, 64), disable_compile=True)
    torch._dynamo.reset()
    assert torch.equal(run(KV4Cache(model.config, 64)), eager)

    def allocated(make):
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()["requested_bytes.all.current"]
        cache = make()
        cache.early_initialization(2, 2, 128, torch.float16, torch.device("cuda"))
        torch.cuda.synchronize()
        return torch.cuda.memory_stats()["requested_bytes.all.current"] - before, cache

    fp16, _keep1 = allocated(lambda: StaticCache(config=model.config, max_cache_len=4096))
    kv4, _keep2 = allocated(lambda: KV4Cache(model.config, 4096))
    assert kv4 <= 0.3 * fp16, (kv4, fp16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("sq", "s"), [(1, 4100), (1, 32768), (300, 300)])
def test_op_on_cuda_keys_per_channel_tunes_and_matches_float64(dtype, sq, s, monkeypatch):
    """Keys per channel over 64 tokens through the op's CUDA path (autotuned), 32 query / 8 KV
    heads, D=128, a residual tail (S % 64 = 4 or 44 tokens; 32k: all complete)."""
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "1")
    gen = torch.Generator().manual_seed(s + 1)
    k = torch.randn(1, 8, s, 128, generator=gen)
    k[..., [3, 77]] *= 20
    _assert_op_on_cuda_matches(quantize_kv4_keys_per_channel(k.to(dtype), 64), gen, sq, s, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("s", [4100, 32768 - 20])
def test_transposed_decode_keys_per_channel_on_cuda_match_float64(dtype, s):
    """decode_t over keys per channel (`_DECODE_T_KEY_TOKENS`) compiled for the GPU: BLOCK_N
    32 and 64 tiles over 64-token groups with a residual tail, splits 1 (one program over
    every key: V centered past 4096), 4 (self-reduced) and 12 (a second launch), against
    float64."""
    gen = torch.Generator().manual_seed(s + 7)
    k = torch.randn(1, 8, s, 128, generator=gen)
    k[..., [3, 77]] *= 20
    keys = quantize_kv4_keys_per_channel(k.to(dtype), 64)
    values = quantize_kv4(torch.randn(1, 8, s, 128, generator=gen), KVScheme())
    q = torch.randn(1, 32, 1, 128, generator=gen).to(dtype)
    problem = KV4Problem(q, keys, values, None, None, False, 128**-0.5)
    want = problem.reference64()
    args = [t.cuda() if isinstance(t, torch.Tensor) else t for t in problem.args()]
    with mock.patch.object(kv4_attention, "_DECODE_T_KEY_TOKENS", True):
        for bn, split in [(bn, sp) for bn in (32, 64) for sp in (1, 4, 12)]:
            cfg = KernelConfig("decode_t", 4, bn, 0, split, 1, 3, True, stage_v=True)
            assert valid_config(cfg, 4, 1, 64)
            assert_close_rel(launch_attention(cfg, *args).cpu(), want, dtype)


@pytest.mark.gpu
def test_generate_on_cuda_keys_per_channel_with_cuda_graphs():
    """fp16 tiny Llama, keys per channel over 32 tokens: generate()'s compiled decode step
    (Inductor, reduce-overhead, the write kernel reading its position on the device) gives
    the eager tokens across group boundaries."""
    model = enable_kv4_attention(tiny_llama(2, head_dim=128, num_key_value_heads=2)).half().cuda()
    prompt = PROMPT.cuda()
    scheme = KVScheme(group_size=128, key_tokens=32)

    def run(cache, **kwargs):
        return model.generate(
            prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
            max_new_tokens=60, do_sample=False, **kwargs,
        )  # fmt: skip

    eager = run(KV4Cache(model.config, 96, scheme), disable_compile=True)
    torch._dynamo.reset()
    assert torch.equal(run(KV4Cache(model.config, 96, scheme)), eager)


@pytest.mark.gpu
@pytest.mark.parametrize("start", [0, 100])
@pytest.mark.parametrize("per_channel", [False, True])
def test_prefill_op_on_cuda_matches_reference(start, per_channel):
    """kv4_prefill_attention on CUDA (SDPA over the prompt at start 0, the 16-bit general
    path after it), 32 query / 8 KV heads, D=128, fp16, against the float32 reference."""
    gen = torch.Generator().manual_seed(start)
    s, sq = 512, 300
    past = torch.randn(1, 8, s, 128, generator=gen)
    kq = (quantize_kv4_keys_per_channel(past.half(), 64) if per_channel
          else quantize_kv4(past, KVScheme()))  # fmt: skip
    vq = quantize_kv4(torch.randn(1, 8, s, 128, generator=gen), KVScheme())
    q = torch.randn(1, 32, sq, 128, generator=gen).half()
    k, v = (torch.randn(1, 8, sq, 128, generator=gen).half() for _ in range(2))
    pos = torch.arange(start, start + sq)
    length = torch.tensor(start + sq)
    parts = (kq.codes, kq.scales, kq.offsets, vq.codes, vq.scales, vq.offsets, pos)
    res = kq.residual
    ref = kv4_prefill_attention_reference(q, k, v, *parts, None, 0.088, res, length)
    cuda = [t.cuda() if t is not None else None for t in (q, k, v, *parts, res, length)]
    got = torch.ops.qcompile.kv4_prefill_attention(*cuda[:10], None, 0.088, *cuda[10:])
    assert rel_error(got.float().cpu(), ref.float()) < 2e-3
