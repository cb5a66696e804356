"""decode_attention: flash-decoding over a 16-bit KV cache shared by groups of query heads.

The Triton kernel runs in the interpreter on CPU (natively on a GPU) against the op's
reference (SDPA) in float64; the op's contract and fallbacks on CPU.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICE
from helpers import assert_close_rel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import DecodeProblem, decode_problems

from qcompile.lowering import kv4_attention
from qcompile.lowering.autotune import KernelConfig
from qcompile.lowering.decode_attention import (
    candidate_configs,
    default_config,
    launch,
    valid_config,
)
from qcompile.ops.attention import decode_attention_reference


def _run(problem: DecodeProblem, cfg: KernelConfig) -> torch.Tensor:
    q = problem.query
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)  # poison
    return launch(cfg, *problem.args(), out=out)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=decode_problems(device=KERNEL_DEVICE), data=st.data())
def test_kernel_matches_float64_reference(problem, data):
    """Any split of the sequence (3: not a power of two; more splits than tiles), GQA rows,
    masks, strided K/V."""
    b, hq, sq, _ = problem.query.shape
    hkv, s = problem.key.shape[1:3]
    cfg = data.draw(st.sampled_from(candidate_configs(b, hkv, sq, hq // hkv, s)), label="cfg")
    split = data.draw(st.sampled_from([1, 2, 3, 8]), label="split")
    cfg = KernelConfig("decode16", cfg.block_m, cfg.block_n, 0, split, cfg.num_warps, 1)
    wide = data.draw(st.booleans(), label="64-bit batch offsets (lowered limit)")
    with mock.patch.object(kv4_attention, "_WIDE_ELEMENTS", 1 if wide else 2**31):
        assert_close_rel(_run(problem, cfg), problem.reference64(), problem.query.dtype)


@pytest.mark.parametrize(("b", "hkv", "sq", "gqa", "s"), [(1, 8, 1, 4, 200), (16, 8, 1, 4, 8192),
                                                          (1, 1, 2, 8, 5), (2, 2, 1, 1, 1)])  # fmt: skip
def test_default_config_is_valid_and_right(b, hkv, sq, gqa, s):
    """The untuned config (CUDA-graph capture, tuning off) is valid; run it where small."""
    cfg = default_config(b, hkv, sq, gqa, s)
    assert valid_config(cfg, sq * gqa)
    if s > 256:
        assert cfg.split_k > 1  # long caches split the sequence
        return
    torch.manual_seed(s)
    q = torch.randn(b, hkv * gqa, sq, 64).half().to(KERNEL_DEVICE)
    k, v = (torch.randn(b, hkv, s, 64).half().to(KERNEL_DEVICE) for _ in range(2))
    problem = DecodeProblem(q, k, v, None, 0.125)
    assert_close_rel(_run(problem, cfg), problem.reference64(), torch.float16)


def test_rows_that_see_nothing_and_empty_splits_give_zeros():
    """A head whose mask hides every key gets zeros (as SDPA on CPU); splits with no key
    (8 splits of 5 keys) weigh nothing."""
    torch.manual_seed(0)
    q = torch.randn(1, 4, 1, 64).half().to(KERNEL_DEVICE)
    k, v = (torch.randn(1, 1, 5, 64).half().to(KERNEL_DEVICE) for _ in range(2))
    mask = torch.ones(1, 4, 1, 5, dtype=torch.bool, device=KERNEL_DEVICE)
    mask[0, 2] = False
    problem = DecodeProblem(q, k, v, mask, 0.125)
    out = _run(problem, KernelConfig("decode16", 16, 32, 0, 8))
    assert torch.equal(out[0, 2].cpu(), torch.zeros(1, 64, dtype=torch.float16))
    assert_close_rel(out, problem.reference64(), torch.float16)


def test_configs_are_powers_of_two_holding_every_row():
    assert valid_config(KernelConfig("decode16", 16, 32, 0, 4), 4)
    assert not valid_config(KernelConfig("decode16", 16, 16, 0, 4), 4)  # BLOCK_N >= 32
    assert not valid_config(KernelConfig("decode16", 16, 32, 0, 4), 32)  # rows do not fit
    assert not valid_config(KernelConfig("decode16", 16, 48, 0, 4), 4)
    assert not valid_config(KernelConfig("decode", 16, 32, 0, 4), 4)  # another family
    for cfg in candidate_configs(16, 8, 1, 4, 32768):  # B * Hkv = 128 programs per split
        assert valid_config(cfg, 4)
        assert cfg.split_k == 1 or 128 * cfg.split_k // 2 < 4 * 132


@pytest.mark.parametrize("mask_kind", [None, "bool", "float", "per_head"])
def test_reference_is_sdpa_over_repeated_heads(mask_kind):
    """The reference (packed query rows or enable_gqa) equals SDPA on repeat_interleave'd K/V."""
    torch.manual_seed(1)
    q = torch.randn(2, 8, 1, 32, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 9, 32, dtype=torch.float64) for _ in range(2))
    mask = {
        None: None,
        "bool": torch.rand(2, 1, 1, 9) > 0.3,
        "float": torch.randn(1, 1, 1, 9, dtype=torch.float64),
        "per_head": torch.randn(2, 8, 1, 9, dtype=torch.float64),
    }[mask_kind]
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=mask, scale=0.3
    )
    torch.testing.assert_close(decode_attention_reference(q, k, v, mask, 0.3), want)
    out = torch.ops.qcompile.decode_attention(q, k, v, mask, 0.3)
    assert out.is_contiguous() and torch.equal(out, decode_attention_reference(q, k, v, mask, 0.3))


@pytest.mark.parametrize(
    ("q", "k", "mask", "message"),
    [
        ((1, 8, 1, 64), (1, 3, 7, 64), None, "8 query heads are not a multiple of 3 KV heads"),
        ((1, 8, 1, 64), (2, 2, 7, 64), None, "is not [B=1, Hkv, S, D=64]"),
        ((1, 8, 1, 64), (1, 2, 7, 64), (1, 1, 7), "does not broadcast to [B, Hq, Sq, S]"),
        ((1, 8, 64), (1, 2, 7, 64), None, "query must be [B, Hq, Sq, D]"),
    ],
)
def test_op_rejects_bad_shapes(q, k, mask, message):
    key = torch.zeros(k)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        torch.ops.qcompile.decode_attention(
            torch.zeros(q), key, key, None if mask is None else torch.zeros(mask), 1.0
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("b", "s"), [(1, 200), (16, 4100), (1, 32768)])
def test_op_on_cuda_tunes_and_matches_float64(dtype, b, s, monkeypatch):
    """The op's CUDA path (autotuned) at Llama-3-8B's heads: 32 query / 8 KV, D=128, a bool
    mask hiding the cache's unwritten tail as transformers' static cache does."""
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "1")
    torch.manual_seed(s)
    q = torch.randn(b, 32, 1, 128, device="cuda").to(dtype)
    k, v = (torch.randn(b, 8, s, 128, device="cuda").to(dtype) for _ in range(2))
    mask = torch.arange(s, device="cuda").view(1, 1, 1, s) < s - 3
    problem = DecodeProblem(q, k, v, mask.expand(b, 1, 1, s), 128**-0.5)
    out = torch.ops.qcompile.decode_attention(*problem.args())
    assert_close_rel(out, problem.reference64(), dtype)


@pytest.mark.gpu
def test_cache_past_2_to_the_31_elements_reads_its_last_batch():
    """B=72, S=32768, 8 KV heads of 128: 2.4e9 elements per cache tensor, past int32 from
    batch 64 on (the kernel offsets each (batch, head) in 64 bits). Batches 0 and 71 against
    float64; a wrapped offset reads another batch's keys."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    b, s = 72, 32768
    k, v = (torch.randn(b, 8, s, 128, device="cuda", generator=gen, dtype=torch.float16)
            for _ in "kv")  # fmt: skip
    assert k.numel() >= 2**31
    q = torch.randn(b, 32, 1, 128, device="cuda", generator=gen, dtype=torch.float16)
    cfg = default_config(b, 8, 1, 4, s)
    out = launch(cfg, q, k, v, None, 128**-0.5)
    for i in (0, b - 1):
        ref = DecodeProblem(q[i : i + 1], k[i : i + 1], v[i : i + 1], None, 128**-0.5)
        assert_close_rel(out[i : i + 1], ref.reference64(), torch.float16)
