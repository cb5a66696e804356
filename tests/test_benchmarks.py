"""The GPU scripts' inputs, checked on CPU: a layout slip there would time the wrong shape."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from qcompile.ops.w4a16 import check_w4a16_args

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from weights import random_packed  # noqa: E402


@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (8192, 28672), (1024, 4096)])
def test_random_packed_weights_fit_the_op(n, k):
    p = random_packed(n, k, 128, torch.float16, device="cpu")
    x = torch.empty(1, k, dtype=torch.float16)
    check_w4a16_args(x, p.qweight, p.scales, p.offsets, None, p.group_size)
    assert p.shape == (n, k)


def test_benchmark_scripts_import():
    import bench_kv4  # noqa: F401
    import bench_w4a16  # noqa: F401
    import tune_shipped  # noqa: F401


def test_kv4_benchmark_inputs_fit_the_op_and_bytes_match_the_layout():
    import bench_kv4

    from qcompile.ops.kv4 import check_kv4_attention_args

    b, s = 2, 64
    keys, values = bench_kv4.random_kv4(b, bench_kv4.HKV, s, bench_kv4.D, 128, device="cpu")
    q = torch.empty(b, bench_kv4.HQ, 1, bench_kv4.D, dtype=torch.float16)
    check_kv4_attention_args(
        q, keys.codes, keys.scales, keys.offsets, values.codes, values.scales, values.offsets,
        None, None,
    )  # fmt: skip
    assert keys.nbytes() + values.nbytes() == bench_kv4.kv_bytes(b, bench_kv4.HKV, s, 128, 128)
    ratio = bench_kv4.kv_bytes(1, 8, 1024, 128, 128) / bench_kv4.kv_bytes(1, 8, 1024, 128, None)
    assert ratio == pytest.approx(68 / 256)


def test_kv4_benchmark_markdown_has_a_row_per_measurement():
    import bench_kv4

    meta = {"device": "H100", "torch": "2", "triton": "3", "hbm_tb_s": 3.0}
    decode = {
        "phase": "decode", "b": 1, "s": 8192, "qcompile_us": 10.0, "sdpa_us": 40.0,
        "speedup_vs_sdpa": 4.0, "roofline_int4_us": 8.0, "memory_ratio": 0.266,
        "config": {"kernel": "decode", "block_n": 64, "split_k": 16},
    }  # fmt: skip
    no_sdpa = {**decode, "b": 64, "s": 32768, "sdpa_us": None, "config": None}
    del no_sdpa["speedup_vs_sdpa"]
    prefill = {
        "phase": "prefill", "s": 4096, "sdpa_us": 100.0, "qcompile_us": 110.0,
        "cache_write_us": 5.0, "ratio_vs_sdpa": 1.1, "ratio_with_write_vs_sdpa": 1.15,
        "sdpa_tflops": 500.0, "qcompile_tflops": 450.0,
    }  # fmt: skip
    text = bench_kv4.markdown(meta, [decode, no_sdpa, prefill])
    assert "| 1 | 8192 | 40.0 | 10.0 | 8.0 | 80% | 4.00x | 0.266x | decode n64 split16 |" in text
    assert "| 64 | 32768 | n/a |" in text
    assert "| 4096 | 100.0 | 110.0 | 5.0 | 1.10x | 1.15x | 500 / 450 |" in text
