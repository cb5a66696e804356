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
    import bench_e2e  # noqa: F401
    import bench_w4a16  # noqa: F401
    import tune_shipped  # noqa: F401


@pytest.mark.slow
def test_e2e_benchmark_tiny_run_on_cpu(tmp_path):
    """bench_e2e.py end to end with --tiny: every variant and batch, one graph per batch size."""
    import json

    import bench_e2e

    args = ["--tiny", "--layers", "1", "--prompt", "8", "--new-tokens", "4", "--batches", "1,2"]
    result = bench_e2e.main([*args, "--out", str(tmp_path)])
    assert json.loads((tmp_path / "e2e.json").read_text()) == result
    rows = {(r["variant"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {(v, b) for v in bench_e2e.VARIANTS for b in (1, 2)}
    for (variant, batch), r in rows.items():
        assert r["decode_tok_s"] > 0 and r["prefill_ms"] > 0
        assert r["first_step_rel_err_vs_eager"] < 1e-5, (variant, batch)
        if variant != "eager":  # batch 1: one graph; batch 2: one dynamic-batch graph
            assert r["graphs_so_far"] == batch
    eager, quant = rows[("eager", 1)], rows[("qcompile_w4a16", 1)]
    assert quant["quantize_report"] == "qcompile: 8 linear layers: 7 quantized, 1 skipped"
    assert quant["weight_bytes"] < eager["weight_bytes"]
    assert rows[("inductor", 2)]["tokens_head"] == rows[("eager", 2)]["tokens_head"]
    table = (tmp_path / "e2e.md").read_text()
    assert "**1 layers**" in table and table.count("| qcompile_w4a16 |") == 2
    assert result["meta"]["transformers"] and result["meta"]["layers"] == 1


def test_e2e_model_has_llama3_8b_shapes_and_is_built_in_bf16():
    import bench_e2e

    # On the meta device: shapes only, no memory.
    big = bench_e2e.build_model(bench_e2e.model_config(32, tiny=False), torch.bfloat16, "meta")
    assert sum(p.numel() for p in big.parameters()) == 8_030_261_248  # Llama-3-8B
    tiny = bench_e2e.build_model(bench_e2e.model_config(1, tiny=True), torch.bfloat16, "cpu")
    assert {p.dtype for p in tiny.parameters()} == {torch.bfloat16}
