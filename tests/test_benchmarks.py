"""The GPU scripts' inputs, checked on CPU: a layout slip there would time the wrong shape."""

from __future__ import annotations

import copy
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
    import bench_kv4  # noqa: F401
    import bench_w4a8  # noqa: F401
    import bench_w4a16  # noqa: F401
    import probe_gluon_w4a16  # noqa: F401
    import probe_w4a8_pdl  # noqa: F401
    import probe_w4a8_wgmma  # noqa: F401
    import tune_shipped  # noqa: F401


def test_w4a16_markdown_has_the_pdl_table_only_when_timed():
    """`bench_w4a16.py --lane-pdl`: a second table with the PDL times, their ratio to cuBLAS
    and the bit check; without the flag the table is absent."""
    import bench_w4a16 as b

    meta = {"device": "H100", "torch": "2", "triton": "3", "hbm_tb_s": 3.0}
    row = {"n": 8192, "k": 28672, "m": 16, "cublas_fp16_us": 165.0, "qcompile_us": 63.5,
           "roofline_int4_us": 41.4, "speedup_vs_cublas": 165.0 / 63.5}  # fmt: skip
    assert "with PDL" not in b.markdown(meta, [row])
    timed = {**row, "qcompile_pdl_us": 55.0, "pdl_bit_exact": False}
    md = b.markdown(meta, [row, timed])
    assert md.count("| 8192x28672 | 16 | 63.5 | 55.0 | 3.00x | NO |") == 1


@pytest.mark.slow
def test_dequant_chunk_probe_matches_dequantize_matmul():
    """The chunked dequantize + matmul probe (weight made and used in L2-sized chunks, along N
    and along K) equals dequantize + matmul, in Triton's interpreter."""
    import probe_dequant_chunks

    probe_dequant_chunks.smoke()  # asserts each chunking within 2e-3 of float64


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


@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (8192, 28672)])
def test_random_w4a8_weights_fit_the_op(n, k):
    from weights import random_w4a8

    from qcompile.ops.w4a8 import check_w4a8_weight_args
    from qcompile.quant.w4a8 import int8_weight

    p = random_w4a8(n, k, 128, device="cpu")
    check_w4a8_weight_args(k, *p.tensors(), None, p.group_size)
    assert p.shape == (n, k)
    w8 = int8_weight(p.qweight[:16], p.group_scales[:1], p.group_zeros[:1], 128)
    assert w8.abs().max() <= 127  # random codes stay in int8, like QoQ's


def test_w4a8_bench_helpers():
    import bench_w4a8 as b

    # 4096 x 4096 g128: 8 MiB codes + 2 x 128 KiB group metadata + 16 KiB s1; M=16 activations
    assert b.w4a8_bytes(16, 4096, 4096, 128) == (
        4096 * 2048 + 2 * 4096 * 32 + 4 * 4096 + 16 * 4096 + 4 * 16 + 2 * 16 * 4096
    )
    mem = b.w4a8_bytes(1, 4096, 4096, 128) / 3e12 * 1e6
    assert b.roofline_us(1, 4096, 4096, 128, 3e12, 1e15) == pytest.approx(mem)
    compute = 2 * 4096**3 / 1e15 * 1e6
    assert b.roofline_us(4096, 4096, 4096, 128, 3e12, 1e15) == pytest.approx(compute)
    assert (b.padded_rows(1, 8, 32), b.padded_rows(33, 8, 32), b.padded_rows(17, 16)) == (
        32,
        40,
        32,
    )


def _row(n, k, m, cublas, w4a16, w4a8):
    return {
        "n": n, "k": k, "m": m, "cublas_fp16_us": cublas, "w4a16_us": w4a16, "w4a8_us": w4a8,
        "int_mm_us": 1.0, "w4a8_gemm_only_us": w4a8, "w4a8_fp8_us": w4a8,
        "w4a8_fp8_gemm_only_us": w4a8, "roofline_us": 0.5 * w4a8,
        "speedup_vs_cublas": cublas / w4a8, "speedup_vs_w4a16": w4a16 / w4a8,
    }  # fmt: skip


def test_w4a8_acceptance_and_markdown():
    import bench_w4a8 as b

    rows = [
        _row(8192, 28672, 1024, 130.0, 200.0, 100.0),  # 1.3x: pass
        _row(28672, 4096, 256, 50.0, 60.0, 40.0),  # 1.25x: fail
        _row(28672, 4096, 16, 30.0, 20.0, 21.0),  # slower than W4A16: fail
        _row(4096, 4096, 64, 10.0, 10.0, 10.0),  # not an acceptance point
    ]
    checks = b.acceptance(rows)
    assert [(round(s, 3), ok) for _, s, ok in checks] == [
        (1.3, True),
        (1.25, False),
        (0.952, False),
    ]
    meta = {"device": "H100", "torch": "2.x", "triton": "3.x", "hbm_tb_s": 3.0, "int8_tops": 1500}
    md = b.markdown(meta, rows)
    assert md.count("\n| 8192x28672 | 1024 |") == 1 and "| n/a |" in md  # no _scaled_mm column
    assert "| 8192x28672 M=1024: W4A8 vs cuBLAS fp16 >= 1.3x | 1.30x | pass |" in md
    assert "W4A8 no slower than W4A16 | 0.95x | FAIL |" in md
    assert "Compiled RMSNorm" not in md  # no block timings in these rows


def test_w4a8_compiled_block_rows_get_their_own_check_and_table():
    import bench_w4a8 as b

    row = _row(8192, 28672, 1, 160.0, 47.4, 50.1)
    row.update(producer="silu_mul", producer_us=2.0, producer_quantize_us=2.5,
               w4a16_block_us=49.0, w4a8_block_us=48.5)  # fmt: skip
    row["block_speedup_vs_w4a16"] = 49.0 / 48.5
    # a row of the twenty-second session's JSON: RMSNorm everywhere, "norm_*" keys
    old = _row(28672, 4096, 16, 88.0, 37.4, 39.1)
    old.update(norm_us=2.6, norm_quantize_us=3.4, w4a16_block_us=39.0, w4a8_block_us=39.5)
    old["block_speedup_vs_w4a16"] = 39.0 / 39.5
    checks = b.acceptance([row, old])
    assert [(round(s, 3), ok) for _, s, ok in checks] == [
        (0.946, False), (1.01, True), (0.957, False), (0.987, False)
    ]  # fmt: skip
    md = b.markdown({"device": "H100", "torch": "2", "triton": "3", "hbm_tb_s": 3.0,
                     "int8_tops": 1500}, [row, old])  # fmt: skip
    assert "| 8192x28672 | 1 | SiLU * mul | 2.0 | 2.5 | 49.0 | 48.5 | 1.01x |" in md
    assert "| 28672x4096 | 16 | RMSNorm | 2.6 | 3.4 | 39.0 | 39.5 | 0.99x |" in md
    assert "(quantization fused) no slower than SiLU * mul -> W4A16 | 1.01x | pass |" in md
    assert "(quantization fused) no slower than RMSNorm -> W4A16 | 0.99x | FAIL |" in md
    assert [b.producer_for(k) for k in (4096, 8192, 14336, 28672)] == [
        "rmsnorm", "rmsnorm", "silu_mul", "silu_mul"
    ]  # fmt: skip


def test_w4a8_block_producers_quantize_like_the_pass_on_cpu():
    """The benchmark's producers with the pass's quantization after them give int8 codes of
    the producer's output (what the compiled W4A8 block feeds its GEMM)."""
    import bench_w4a8 as b

    from qcompile.quant.w4a8 import quantize_activations_per_token

    g = torch.Generator().manual_seed(0)
    a, up = torch.randn(3, 64, generator=g), torch.randn(3, 64, generator=g)
    w = torch.rand(64, generator=g) + 0.5
    for kind, second in (("rmsnorm", w), ("silu_mul", up)):
        xq, xs = b._then_quantize(kind)(a, second)
        ref_q, ref_s = quantize_activations_per_token(b.PRODUCERS[kind](a, second), "int8")
        assert torch.equal(xq, ref_q) and torch.equal(xs, ref_s)
    silu = b.PRODUCERS["silu_mul"](a, up)
    assert torch.allclose(silu, a * torch.sigmoid(a) * up)


def test_accuracy_rows_merge_keeps_the_table_and_its_fp32_base():
    from accuracy import merge_rows

    old = [{"row": "fp32", "ppl": 14.36}, {"row": "A", "ppl": 16.0}, {"row": "B", "ppl": 17.0}]
    new = [{"row": "fp32", "ppl": 14.36}, {"row": "B", "ppl": 16.5}, {"row": "C", "ppl": 15.0}]
    assert [(r["row"], r["ppl"]) for r in merge_rows(old, new)] == [
        ("fp32", 14.36), ("A", 16.0), ("B", 16.5), ("C", 15.0),
    ]  # fmt: skip
    with pytest.raises(SystemExit, match="fp32 perplexity changed"):
        merge_rows(old, [{"row": "fp32", "ppl": 14.5}])
    # a library update's drift in the 6th digit keeps the table
    assert len(merge_rows(old, [{"row": "fp32", "ppl": 14.3601}])) == 3


def test_accuracy_weights_only_keeps_the_quantized_weights_in_fp32_linears():
    """The weights-only diagnostic: each W4A8Linear becomes an nn.Linear holding its
    dequantized weight (and bias), so only the activations' quantization is removed."""
    from accuracy import unquantize_activations_

    import qcompile
    from qcompile import QuantConfig, Scheme
    from qcompile.quant.w4a8 import dequantize_w4a8, quantize_weight_w4a8

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    scheme = Scheme(name="w4a8", group_size=32)
    m = copy.deepcopy(model)
    qcompile.quantize_(m, QuantConfig(scheme))
    assert all(type(m[i]) is qcompile.W4A8Linear for i in (0, 2))
    unquantize_activations_(m)
    x = torch.randn(5, 64)
    for i in (0, 2):
        assert type(m[i]) is torch.nn.Linear
        w = dequantize_w4a8(quantize_weight_w4a8(model[i].weight, scheme))
        assert torch.equal(m[i].weight, w) and torch.equal(m[i].bias, model[i].bias)
    with torch.no_grad():
        h = torch.relu(x @ m[0].weight.t() + model[0].bias)
        torch.testing.assert_close(m(x), h @ m[2].weight.t() + model[2].bias)


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
    assert "StaticCache" not in text  # no fp16 cache-write timing in this row
    prefill.update(fresh_graph_us=102.0, fp16_cache_write_us=3.0)
    prefill["fresh_graph_with_write_vs_sdpa"] = (102.0 + 5.0) / 100.0
    prefill["fresh_graph_with_write_vs_fp16_prefill"] = (102.0 + 5.0) / (100.0 + 3.0)
    text = bench_kv4.markdown(meta, [prefill])
    assert "| 4096 | 100.0 + 3.0 | 102.0 + 5.0 | 1.04x |" in text


def test_tune_shipped_merge_replaces_same_keys_and_keeps_the_rest(tmp_path):
    """A tuning run's file folds into the shipped file: same key -> the new config and
    timing; other entries kept; a file from another GPU is refused."""
    import json

    from tune_shipped import merge

    def entry(m, kernel, us):
        key = {
            "family": "w4a16",
            "m_bucket": m,
            "n": 64,
            "k": 64,
            "group_size": 32,
            "dtype": "bfloat16",
        }
        return {"key": key, "config": {"kernel": kernel}, "us": us}

    def write(path, gpu, entries):
        path.write_text(
            json.dumps(
                {"format": 1, "gpu": gpu, "triton": "3.6.0", "torch": "2.11", "entries": entries}
            )
        )

    base, new, other = tmp_path / "h100.json", tmp_path / "tuned.json", tmp_path / "o.json"
    write(base, "h100", [entry(1, "gemv", 9.0), entry(16, "gemm", 20.0)])
    newer = entry(16, "gemm_planes", 15.0)
    newer["key"]["batch"] = 1  # a field older files lack (its default): still the same key
    write(new, "h100", [newer, entry(128, "gemm", 80.0)])
    assert "1 replaced" in merge(new, base)
    got = {
        e["key"]["m_bucket"]: (e["config"]["kernel"], e["us"])
        for e in json.loads(base.read_text())["entries"]
    }
    assert got == {1: ("gemv", 9.0), 16: ("gemm_planes", 15.0), 128: ("gemm", 80.0)}
    write(other, "a100", [])
    with pytest.raises(ValueError, match="a100"):
        merge(other, base)


def test_kv4_key_layout_probe_matches_sdpa_unquantized_and_reads_the_residual_exactly():
    """The layout probe's attention is causal GQA attention; per-channel keys are read from
    the full-precision residual until their group is complete, quantized after."""
    import torch.nn.functional as F
    from probe_kv4_key_layouts import Layout, memory_ratio, simulated_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 9, 64), torch.randn(1, 2, 9, 64), torch.randn(1, 2, 9, 64)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    plain = simulated_attention(q, k, v, Layout("none", key=None, value=False), 0.125)
    assert torch.allclose(plain, exact, atol=1e-5)
    per_channel = Layout("channel", key="channel", key_group=4, value=False)
    out = simulated_attention(q, k, v, per_channel, 0.125)
    # query 0-2: group 0 incomplete, exact keys; query 3 reads group 0 quantized
    assert torch.allclose(out[:, :, :3], exact[:, :, :3], atol=1e-5)
    assert (out[:, :, 3] - exact[:, :, 3]).abs().max() > 1e-4
    assert 0.25 < memory_ratio(Layout("c", key="channel", key_group=64), 64, 4096) < 0.3


def test_kv4_key_layout_probe_per_channel_quantization_is_within_half_a_step():
    from probe_kv4_key_layouts import quantize_per_channel

    torch.manual_seed(1)
    x = torch.randn(2, 3, 70, 64) * torch.linspace(0.1, 8, 64)  # channel outliers
    out = quantize_per_channel(x, 32)
    for s0 in range(0, 70, 32):
        block = x[:, :, s0 : s0 + 32]
        step = (block.amax(2) - block.amin(2)) / 15
        err = (out[:, :, s0 : s0 + 32] - block).abs().amax(2)
        assert (err <= step * 0.5 * 1.01 + 1e-3 * block.abs().amax(2)).all()
        assert all(len(out[0, 0, s0 : s0 + 32, c].unique()) <= 16 for c in range(64))


def test_kv4_key_layout_probe_provisional_keys_match_quantizing_the_prefix():
    """Provisional per-channel keys: query p reads its own group quantized with the min/max of
    the group's tokens up to p (a direct loop over p is the reference)."""
    from probe_kv4_key_layouts import _provisional_scores, quantize_per_channel

    torch.manual_seed(2)
    q, k = torch.randn(1, 2, 8, 16), torch.randn(1, 1, 8, 16)
    got = _provisional_scores(q, k, 4)
    for p in range(8):
        g0 = p // 4 * 4
        keys = quantize_per_channel(k[:, :, g0 : p + 1], 4).repeat_interleave(2, 1)
        want = torch.einsum("bhd,bhjd->bhj", q[:, :, p], keys)
        assert torch.allclose(got[:, :, p, g0 : p + 1], want, atol=1e-5)
        assert (got[:, :, p, :g0] == 0).all() and (got[:, :, p, g0 + 4 :] == 0).all()


@pytest.mark.parametrize("family", ["w4a16", "w4a8"])
def test_tune_shipped_calls_each_family_op_and_names_the_key_it_tuned(
    family, monkeypatch, tmp_path
):
    """`tune_shipped.py --family`: the op runs (here untuned, in Triton's interpreter) and the
    key written is the one that op looks up."""
    from tune_shipped import _tune_linear
    from weights import random_w4a8

    from qcompile.lowering import autotune

    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "0")
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "gpu_name", lambda device=None: "cpu-interpreter")
    autotune.autotuner.cache_clear()
    n, k, group = 32, 128, 64
    if family == "w4a8":
        p = random_w4a8(n, k, group, device="cpu")
    else:
        p = random_packed(n, k, group, torch.bfloat16, device="cpu")
    x = torch.randn(3, k, dtype=torch.bfloat16)
    key = _tune_linear(family, x, p, group)
    dtype = "int8:bfloat16" if family == "w4a8" else "bfloat16"
    assert key == autotune.TuneKey(family, 4, n, k, group, dtype)
    assert autotune.autotuner(0).lookup(key) is not None  # the op looked this key up
    autotune.autotuner.cache_clear()  # no fake-GPU tuner for later tests


def test_probe_summary_picks_the_fastest_exact_config_and_flags_points_without_one():
    from summarize_probe import table

    cfg = {"kernel": "gemm_swar", "block_m": 256, "block_n": 64, "block_k": 128, "split_k": 2,
           "num_warps": 4, "num_stages": 3, "prefetch": True}  # fmt: skip
    data = {
        "meta": {"device": "H100", "torch": "2.11", "triton": "3.6"},
        "rows": [
            {
                "n": 8192,
                "k": 28672,
                "m": 256,
                "cublas_us": 192.0,
                "int_mm_us": 145.5,
                "pairs": [
                    {"config": cfg, "us": 100.0, "exact": False},  # fastest, but wrong: skipped
                    {"config": cfg, "us": 223.7, "exact": True},
                    {"config": {**cfg, "split_k": 1}, "us": 280.5, "exact": True},
                ],
            },  # fmt: skip
            {
                "n": 28672,
                "k": 4096,
                "m": 256,
                "cublas_us": 109.9,
                "pairs": [
                    {"config": cfg, "error": "OutOfResources"},
                ],
            },  # fmt: skip
        ],
    }
    text = table(data)
    assert "H100" in text
    assert (
        "| 8192x28672 | 256 | 192.0 | 145.5 | gemm_swar BM256 BN64 BK128 split2 w4 s3 pf1 | 223.7 | 0.86x |"
        in text
    )
    assert "| 28672x4096 | 256 | 109.9 |  | none (1 failed or inexact) |" in text
    lane = {"kernel": "mma", "block_m": 16, "block_n": 128, "block_k": 128, "split_k": 8,
            "num_warps": 4, "num_stages": 1, "prefetch": False}  # fmt: skip
    modes = [("atomic", "one launch, atomics"), (True, "one launch"), (False, "epilogue kernel")]
    for reduce, label in modes:
        pair = {"config": lane, "us": 65.3, "exact": True, "self_reduce": reduce}
        row = {"n": 8192, "k": 28672, "m": 16, "cublas_us": 164.8, "pairs": [pair]}
        assert f"split8 w4 s1 pf0 ({label}) | 65.3 |" in table({**data, "rows": [row]})


@pytest.mark.parametrize("family", ["w4a16", "w4a8"])
def test_tune_shipped_kinds_time_the_shipped_pick_against_only_those_kinds(family, monkeypatch):
    """`tune_shipped.py --kinds wgmma_rs`: a key's candidates are its shipped config and the
    wgmma_rs ones, nothing else."""
    from tune_shipped import _restrict_candidates

    from qcompile.lowering import autotune, w4a8, w4a16
    from qcompile.lowering.autotune import KernelConfig

    module = w4a8 if family == "w4a8" else w4a16
    monkeypatch.setattr(module, "candidate_configs", module.candidate_configs)
    monkeypatch.setattr(module, "_wgmma_device", lambda: True)
    m, n, k, g = 16, 512, 4096, 128
    act = ("int8",) if family == "w4a8" else ()
    if family == "w4a8":
        key = w4a8.tune_key(m, n, k, g, "int8", torch.float16)
    else:
        key = autotune.TuneKey("w4a16", m, n, k, g, "float16")
    shipped = KernelConfig("mma", 16, 64, 128, 2, 2, 1)
    _restrict_candidates({key: shipped}, {"wgmma_rs"}, {"dtype": "float16"}, family)
    got = module.candidate_configs(m, n, k, g, *act)
    assert got[0] == shipped and len(got) > 2
    assert {c.kernel for c in got[1:]} == {"wgmma_rs"}
    other = module.candidate_configs(m, n, 2 * k, g, *act)  # (no shipped pick for this key)
    assert other and {c.kernel for c in other} == {"wgmma_rs"}
