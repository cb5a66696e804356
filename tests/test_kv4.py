"""KV4: the packed int4 K/V format, its ops and kernels, SmoothAttention, the Hugging Face
cache and attention function, and the attention pass.

Kernels run in Triton's interpreter on CPU (natively on a GPU) against a float64 reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICE
from helpers import assert_close_rel, rel_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import KV4Problem, kv4_problems

from qcompile.config import KVScheme
from qcompile.lowering.autotune import KernelConfig
from qcompile.lowering.kv4_attention import (
    candidate_configs,
    default_config,
    kv4_cache_write_cuda,
    launch_attention,
)
from qcompile.ops.kv4 import kv4_attention_reference
from qcompile.quant.kv4 import (
    PackedKV4,
    dequantize_kv4,
    fold_smooth_attention,
    key_channel_absmax,
    pack_int4_pairs,
    quantize_kv4,
    smooth_attention_scales,
    unpack_int4_pairs,
)

KERNEL_SETTINGS = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
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
    """Flash-decoding: any split of the sequence, GQA rows, masks, partly written caches."""
    b, hq, sq, _ = problem.query.shape
    hkv, s = problem.keys.codes.shape[1:3]
    configs = [c for c in candidate_configs(b, hkv, sq, hq // hkv, s) if c.kernel == "decode"]
    cfg = data.draw(st.sampled_from(configs[:10]), label="config")
    split = data.draw(st.sampled_from([1, 2, 3, 8]), label="split")  # 3: not a power of two
    cfg = KernelConfig("decode", cfg.block_m, cfg.block_n, 0, split, cfg.num_warps)
    assert_close_rel(_run(problem, cfg), problem.reference64(), problem.query.dtype)


@KERNEL_SETTINGS
@given(problem=kv4_problems(decode=False, device=KERNEL_DEVICE), data=st.data())
def test_prefill_kernel_matches_float64_reference(problem, data):
    """Flash-attention over several query positions: causal, masks, tiles of (pos, head) rows."""
    b, hq, sq, _ = problem.query.shape
    hkv, s = problem.keys.codes.shape[1:3]
    cfg = data.draw(
        st.sampled_from(
            [KernelConfig("prefill", 16, 16, 0), KernelConfig("prefill", 32, 32, 0)]
            + [c for c in candidate_configs(b, hkv, sq, hq // hkv, s) if c.block_m <= 64][:2]
        ),
        label="config",
    )
    assert_close_rel(_run(problem, cfg), problem.reference64(), problem.query.dtype)


@pytest.mark.parametrize(("sq", "gqa"), [(1, 1), (1, 8), (3, 4), (40, 8)])
def test_default_config_is_valid(sq, gqa):
    """The untuned config (CUDA-graph capture, tuning off) runs every shape."""
    torch.manual_seed(sq)
    s, d = 70, 64
    keys = quantize_kv4(torch.randn(1, 1, s, d), KVScheme(group_size=32))
    keys = PackedKV4(*(t.to(KERNEL_DEVICE) for t in (keys.codes, keys.scales, keys.offsets)), 32)
    q = torch.randn(1, gqa, sq, d).half().to(KERNEL_DEVICE)
    problem = KV4Problem(q, keys, keys, None, None, sq > 1, d**-0.5)
    cfg = default_config(1, 1, sq, gqa, s)
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
    out = _run(problem, KernelConfig("decode", 16, 16, 0, 8))
    assert torch.equal(out[0, 2].cpu(), torch.zeros(1, 64, dtype=torch.float16))
    assert_close_rel(out, problem.reference64(), torch.float16)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    d=st.sampled_from([64, 128]),
    group=st.sampled_from([32, 64, 128]),
    sn=st.integers(1, 20),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_cache_write_kernel_is_bit_exact_with_reference(d, group, sn, dtype, seed):
    """Quantize-on-write: codes, scales and offsets equal `quantize_kv4`'s, at the positions."""
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
        key.to(KERNEL_DEVICE), value.to(KERNEL_DEVICE), *ours, positions.to(KERNEL_DEVICE)
    )
    torch.ops.qcompile.kv4_cache_write(key, value, *ref, positions)
    for got, want in zip(ours, ref, strict=True):
        assert torch.equal(got.cpu(), want)
    p = quantize_kv4(key, KVScheme(group_size=group))
    assert torch.equal(ref[0][:, :, positions], p.codes)


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
