"""CompileReport: counts, the per-layer table and how it logs fallbacks."""

from __future__ import annotations

import logging

import pytest

from qcompile.report import CompileReport, LayerRecord

QUANTIZED = LayerRecord(
    "model.layers.0.mlp.up_proj", (11008, 4096), "quantized", "w4a16 g128", "triton"
)
QUANTIZED_REF = LayerRecord(
    "model.layers.0.mlp.gate_proj", (11008, 4096), "quantized", "w4a16 g128", "reference"
)
PREQUANTIZED = LayerRecord("model.layers.1.self_attn.q_proj", (4096, 4096), "prequantized", "awq")
SKIPPED = LayerRecord("lm_head", (32000, 4096), "skipped", "matches skip pattern 'lm_head'")
FALLBACK = LayerRecord(
    "model.layers.0.mlp.down_proj",
    (4096, 11008),
    "fallback",
    "K=11008 is not divisible by group_size=128",
)


def make_report(*records: LayerRecord, graphs: int = 1) -> CompileReport:
    report = CompileReport(graphs=graphs)
    for record in records:
        report.add(record)
    return report


def test_summary_counts() -> None:
    report = make_report(QUANTIZED, QUANTIZED_REF, PREQUANTIZED, SKIPPED, FALLBACK, graphs=2)
    assert report.summary() == (
        "qcompile: 5 linear layers in 2 graph(s): "
        "2 quantized, 1 prequantized, 1 skipped, 1 fallback"
    )
    assert report.by_status("quantized") == [QUANTIZED, QUANTIZED_REF]
    assert report.by_status("fallback") == [FALLBACK]


def test_summary_leaves_out_zero_counts() -> None:
    report = make_report(QUANTIZED, SKIPPED)
    assert report.summary() == "qcompile: 2 linear layers in 1 graph(s): 1 quantized, 1 skipped"


def test_summary_empty() -> None:
    assert CompileReport().summary() == "qcompile: 0 linear layers: none matched"


def test_table_has_a_row_per_layer() -> None:
    records = (QUANTIZED, QUANTIZED_REF, PREQUANTIZED, SKIPPED, FALLBACK)
    report = make_report(*records)
    lines = report.table().splitlines()
    assert len(lines) == 1 + len(records)
    assert lines[0].split() == ["layer", "N", "x", "K", "status", "path", "detail"]
    for line, record in zip(lines[1:], records, strict=True):
        assert line.startswith(record.name)
        assert f"{record.shape[0]} x {record.shape[1]}" in line
        assert record.status in line
        assert line.endswith(record.detail)
        if record.path:
            assert f" {record.path} " in line
    # Columns are aligned: every row's status starts at the same offset.
    status_col = lines[0].index("status")
    for line, record in zip(lines[1:], records, strict=True):
        assert line[status_col:].startswith(record.status)


def test_latest_per_layer_lists_each_layer_once_with_its_latest_record() -> None:
    import dataclasses

    later = dataclasses.replace(QUANTIZED, path="reference")  # e.g. the decode graph's
    report = make_report(QUANTIZED, SKIPPED, later, SKIPPED, graphs=2)
    once = report.latest_per_layer()
    assert once.records == [later, SKIPPED]  # first-seen order, latest record
    assert once.graphs == 2 and report.records == [QUANTIZED, SKIPPED, later, SKIPPED]
    assert once.summary() == "qcompile: 2 linear layers in 2 graph(s): 1 quantized, 1 skipped"


def test_str_is_summary_then_table() -> None:
    report = make_report(QUANTIZED, FALLBACK)
    assert str(report) == report.summary() + "\n" + report.table()


def test_log_warns_on_fallback(caplog: pytest.LogCaptureFixture) -> None:
    report = make_report(QUANTIZED, FALLBACK, SKIPPED)
    with caplog.at_level(logging.DEBUG, logger="qcompile"):
        report.log()
    assert len(caplog.records) == 1
    record = caplog.records[0]
    assert record.levelno == logging.WARNING
    assert record.name == "qcompile"
    message = record.getMessage()
    assert message.startswith(report.summary())
    assert f"{FALLBACK.name}: {FALLBACK.detail}" in message
    assert QUANTIZED.name not in message


def test_log_lists_five_fallbacks_then_counts(caplog: pytest.LogCaptureFixture) -> None:
    fallbacks = [
        LayerRecord(f"model.layers.{i}.mlp.down_proj", (4096, 11008), "fallback", f"reason {i}")
        for i in range(7)
    ]
    with caplog.at_level(logging.DEBUG, logger="qcompile"):
        make_report(*fallbacks).log()
    message = caplog.records[0].getMessage()
    for record in fallbacks[:5]:
        assert f"{record.name}: {record.detail}" in message
    for record in fallbacks[5:]:
        assert record.name not in message
    assert message.endswith("(+2 more)")


def test_log_info_without_fallback(caplog: pytest.LogCaptureFixture) -> None:
    report = make_report(QUANTIZED, PREQUANTIZED, SKIPPED)
    with caplog.at_level(logging.DEBUG, logger="qcompile"):
        report.log()
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, report.summary())
    ]


def test_fusion_is_shown_and_counted() -> None:
    fused = LayerRecord(
        "model.layers.0.mlp.up_proj", (1536, 576), "quantized", "w4a8 g64", "triton",
        "fused into mul of model.layers.0.post_attention_layernorm (LlamaRMSNorm)",
    )  # fmt: skip
    alone = LayerRecord(
        "model.layers.0.self_attn.o_proj", (576, 576), "quantized", "w4a8 g64", "triton",
        "not fused: producer scaled_dot_product_attention is an extern kernel",
    )  # fmt: skip
    report = make_report(fused, alone, SKIPPED)
    assert report.summary().endswith("activation quantization fused into its producer for 1/2")
    lines = report.table().splitlines()
    assert lines[1].endswith(f"w4a8 g64; activation quantization {fused.fusion}")
    assert lines[3].endswith(SKIPPED.detail)
    assert "activation" not in make_report(QUANTIZED).summary()


def test_attention_records_are_counted_and_tabled_apart_from_linears(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from qcompile.report import AttentionRecord

    rewritten = AttentionRecord(
        "model.layers.0.self_attn", "sdpa", (32, 8), 128, "quantized", "kv4 int4 g128", "triton"
    )
    left = AttentionRecord(
        "model.layers.1.self_attn", "eager", (32, 8), 128, "fallback", "dropout 0.1"
    )
    report = make_report(QUANTIZED, rewritten, left)
    assert report.records == [QUANTIZED] and report.attention == [rewritten, left]
    assert report.summary() == (
        "qcompile: 1 linear layers in 1 graph(s): 1 quantized; 2 attention: 1 quantized, 1 fallback"
    )
    table = report.table().splitlines()
    assert table[2] == "" and table[3].split()[:3] == ["attention", "Hq/Hkv", "x"]
    assert table[4].startswith(rewritten.name) and "32/8 x 128" in table[4]
    assert table[4].endswith("sdpa: kv4 int4 g128") and " triton " in table[4]
    with caplog.at_level(logging.DEBUG, logger="qcompile"):
        report.log()
    assert caplog.records[0].levelno == logging.WARNING
    assert f"{left.name}: dropout 0.1" in caplog.records[0].getMessage()


def test_sibling_fusion_is_noted_per_layer_and_counted() -> None:
    attn = "model.layers.0.self_attn"
    names = (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj")
    qkv = [
        LayerRecord(name, (n, 4096), "prequantized", "quantize_()", "triton", "",
                    tuple(other for other in names if other != name), 6144)
        for name, n in zip(names, (4096, 1024, 1024), strict=True)
    ]  # fmt: skip
    gate_up = [
        LayerRecord("mlp.gate_proj", (11008, 4096), "quantized", "w4a16 g128", "triton", "",
                    ("mlp.up_proj",), 22016),
        LayerRecord("mlp.up_proj", (11008, 4096), "quantized", "w4a16 g128", "triton", "",
                    ("mlp.gate_proj",), 22016),
    ]  # fmt: skip
    report = make_report(*qkv, *gate_up, QUANTIZED, SKIPPED)
    assert report.summary().endswith("; 5 sibling layers fused into 2 launches")
    assert qkv[0].fused_note == "fused with k_proj, v_proj: one launch of N=6144"
    assert qkv[2].fused_note == "fused with q_proj, k_proj: one launch of N=6144"
    lines = report.table().splitlines()
    assert lines[1].endswith("quantize_(); fused with k_proj, v_proj: one launch of N=6144")
    assert lines[4].endswith("w4a16 g128; fused with up_proj: one launch of N=22016")
    assert lines[6].endswith(QUANTIZED.detail) and QUANTIZED.fused_note == ""
    assert "sibling" not in make_report(QUANTIZED).summary()


@pytest.mark.parametrize(
    ("source", "fqn"),
    [
        ("L['self']._modules['a']._parameters['weight']", "a.weight"),
        ("L['model']._modules['layers']._modules['3']._parameters['weight']", "layers.3.weight"),
        # transformers >= 5.24 calls the model through *args: the root is an item of L['args']
        ("L['args'][0]._modules['model']._modules['layers'][1]._parameters['weight']",
         "model.layers.1.weight"),
    ],
)  # fmt: skip
def test_layer_names_drop_the_compiled_functions_argument(source, fqn):
    from qcompile.passes.linear import _param_fqn

    assert _param_fqn(source) == fqn
