"""The backend end to end on CPU: graph rewrites, report, numerics, bad input, recompiles."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close_rel, rel_error
from torch import nn

import qcompile
from qcompile import QuantConfig, Scheme
from qcompile.passes.linear import W4A16_OP, unsupported_reason

G32 = QuantConfig(Scheme(group_size=32))


class MLP(nn.Module):
    def __init__(self, k=64, hidden=128, out=48, bias=True):
        super().__init__()
        self.up = nn.Linear(k, hidden, bias=bias)
        self.down = nn.Linear(hidden, k, bias=bias)
        self.lm_head = nn.Linear(k, out, bias=False)

    def forward(self, x):
        return self.lm_head(x + self.down(torch.nn.functional.silu(self.up(x))))


def _compile(model, config=G32):
    be = qcompile.backend(config)
    return torch.compile(model, backend=be), be


def _quantized_eager(model, config=G32):
    """The same model through `quantize_` and the eager reference op: the compiled oracle."""
    q = copy.deepcopy(model)
    qcompile.quantize_(q, config)
    return q


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def test_backend_is_registered_by_name():
    assert "qcompile" in torch._dynamo.list_backends()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_graph_contains_op_and_matches_reference(bias, lead):
    torch.manual_seed(0)
    model = MLP(bias=bias).eval()
    x = torch.randn(*lead, 64)
    compiled, be = _compile(model)
    with torch.no_grad():
        out = compiled(x)
        ref_q = _quantized_eager(model)(x)
        ref_fp = model(x)
    gm = be.graph_modules[-1]
    ops = list(gm.graph.find_nodes(op="call_function", target=W4A16_OP))
    assert len(ops) == 2  # up, down; lm_head skipped by default
    assert not [
        n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear
    ][1:]
    assert_close_rel(out, ref_q, torch.float32, tol=1e-5)
    err = rel_error(out, ref_fp)
    assert 1e-4 < err < 0.1, f"int4 error {err:.3g} outside the expected quantization range"
    by_name = {r.name: r for r in be.report.records}
    assert by_name["up"].status == "quantized" and by_name["up"].path == "reference"
    assert by_name["lm_head"].status == "skipped"


@pytest.mark.parametrize(
    "options",
    [None, {"triton.coalesce_tiling_analysis": True, "triton.enable_pdl": False}],
)
def test_inductor_options_default_to_the_backends_unless_given(options, monkeypatch):
    """The backend turns off Inductor's sympy-bound tiling analysis (compile time) and turns on
    programmatic dependent launch (decode step time); a caller's `options` win."""
    import torch._inductor.compile_fx as cfx

    seen = {}
    real = cfx.compile_fx

    def spy(gm, inputs, config_patches=None, **kw):
        seen.update(config_patches or {})
        return real(gm, inputs, config_patches=config_patches, **kw)

    monkeypatch.setattr(cfx, "compile_fx", spy)
    model = MLP().eval()
    be = qcompile.backend(G32)
    with torch.no_grad():
        torch.compile(model, backend=be, options=options)(torch.randn(2, 64))
    assert seen["triton.coalesce_tiling_analysis"] is (options is not None)
    if hasattr(torch._inductor.config.triton, "enable_pdl"):  # (torch >= 2.10)
        assert seen["triton.enable_pdl"] is (options is None)


def test_shared_weight_is_quantized_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 64, bias=False)
            self.b = nn.Linear(64, 64, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Tied()
    compiled, be = _compile(model)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert_close_rel(compiled(x), _quantized_eager(model)(x), torch.float32)
    gm = be.graph_modules[-1]
    ops = list(gm.graph.find_nodes(op="call_function", target=W4A16_OP))
    assert len(ops) == 2 and ops[0].args[1] is ops[1].args[1]  # one packed weight, two uses
    assert len([n for n in gm.graph.find_nodes(op="placeholder") if n.name.startswith("qc_")]) == 3


def test_new_batch_sizes_do_not_recompile_per_size():
    model = MLP()
    compiled, be = _compile(model)
    with torch.no_grad():
        for m in (3, 5, 9, 17, 33, 64, 7):
            out = compiled(torch.randn(m, 64))
            assert out.shape == (m, 48)
    assert be.report.graphs <= 2  # the first (static) graph, then one dynamic-M graph


def test_zero_size_batch():
    compiled, _ = _compile(MLP())
    with torch.no_grad():
        out = compiled(torch.randn(0, 64))
    assert out.shape == (0, 48)


def test_non_contiguous_input():
    model = MLP()
    compiled, _ = _compile(model)
    x = torch.randn(64, 6).t()  # [6, 64], strides (1, 6)
    with torch.no_grad():
        assert_close_rel(compiled(x), _quantized_eager(model)(x.contiguous()), torch.float32)


def test_k_not_divisible_falls_back_and_is_reported():
    model = MLP(k=80)  # up: K=80 not divisible by 32 -> fallback; down: K=128 quantized
    compiled, be = _compile(model)
    x = torch.randn(4, 80)
    with torch.no_grad():
        out = compiled(x)
    rec = {r.name: r for r in be.report.records}["up"]
    assert rec.status == "fallback"
    assert "K=80 is not divisible by group_size=32" in rec.detail and "per-channel" in rec.detail
    assert {r.name: r for r in be.report.records}["down"].status == "quantized"
    with torch.no_grad():
        assert_close_rel(out, _quantized_eager(model)(x), torch.float32)


def test_k_not_divisible_raises_when_asked():
    cfg = QuantConfig(Scheme(group_size=32), on_unsupported="raise")
    compiled, _ = _compile(MLP(k=80), cfg)
    with pytest.raises(Exception, match=r"up: K=80 is not divisible by group_size=32"):
        compiled(torch.randn(4, 80))


@pytest.mark.parametrize(
    ("shape", "dtype", "device", "match"),
    [
        (
            (64, 576),
            torch.float16,
            "cuda",
            "K=576 is not divisible by group_size=128; use group_size=64",
        ),
        ((64, 4096), torch.float32, "cuda", "float32 on CUDA"),
        ((64, 80), torch.float16, "cuda", None),  # g=None below: per-channel K=80 ...
        # K's own limits come before any group-size advice, which could not fix them
        ((64, 100), torch.float32, "cpu", "K=100 is not a multiple of 8 (int4 packing); skip"),
        ((64, 80), torch.float16, "cuda", "K=80 is not a multiple of 32 (kernel tile); skip"),
        ((64, 4096), torch.float16, "mps", "device mps has no W4A16 kernel"),
        ((64, 4096), torch.int8, "cpu", "not a float type"),
    ],
)
def test_unsupported_reasons(shape, dtype, device, match):
    scheme = Scheme(group_size=None) if match is None else Scheme()
    reason = unsupported_reason(shape, dtype, device, scheme)
    if match is None:
        assert reason is not None and "K=80 is not a multiple of 32" in reason
    else:
        assert reason is not None and match in reason
    assert unsupported_reason((64, 4096), torch.bfloat16, "cuda", Scheme()) is None


def test_skip_patterns_and_lm_head_option():
    model = MLP()
    compiled, be = _compile(model, QuantConfig(Scheme(group_size=32), skip=("down",)))
    with torch.no_grad():
        compiled(torch.randn(2, 64))
    status = {r.name: r.status for r in be.report.records}
    assert status == {"up": "quantized", "down": "skipped", "lm_head": "quantized"}


def test_quantize_ahead_of_time_frees_fp16_weights_and_compiles():
    model = MLP(k=256, hidden=512, bias=False).half()
    fp16_bytes = sum(m.weight.numel() * 2 for m in (model.up, model.down))
    report = qcompile.quantize_(model, QuantConfig())
    assert isinstance(model.up, qcompile.W4A16Linear) and isinstance(model.lm_head, nn.Linear)
    assert [r.status for r in report.records] == ["quantized", "quantized", "skipped"]
    q_bytes = sum(b.numel() * b.element_size() for m in (model.up, model.down) for b in m.buffers())
    assert q_bytes <= 0.3 * fp16_bytes, f"{q_bytes} > 0.3 x {fp16_bytes}"
    assert not any(p.dtype == torch.float16 and p.shape == (512, 256) for p in model.parameters())
    model = model.float()  # CPU reference path in float32 for an exact comparison
    x = torch.randn(3, 256)
    with torch.no_grad():
        eager = model(x)
        compiled, be = _compile(model)
        assert_close_rel(compiled(x), eager, torch.float32)
    assert [r.status for r in be.report.records].count("prequantized") == 2


def test_class_decorator_quantizes_and_compiles_each_instance():
    @qcompile.quantize_and_compile(G32)
    class Net(MLP):
        pass

    torch.manual_seed(0)
    net = Net()
    ref = _quantized_eager(MLP().load_state_dict(net.state_dict()) and net)  # same weights
    x = torch.randn(4, 64)
    with torch.no_grad():
        out = net(x)
        assert_close_rel(out, ref(x), torch.float32)
    assert isinstance(net.up, qcompile.W4A16Linear)
    assert [r.status for r in net._qcompile_backend.report.records].count("prequantized") == 2


def test_report_summary_mentions_every_status():
    compiled, be = _compile(MLP(k=80))
    with torch.no_grad():
        compiled(torch.randn(2, 80))
    text = str(be.report)
    assert "1 quantized" in text and "1 skipped" in text and "1 fallback" in text
    assert "down" in text and "lm_head" in text


def test_quantize_raise_leaves_model_untouched():
    model = MLP(k=80)  # up: K=80 not divisible by 32; down would be quantized first otherwise
    cfg = QuantConfig(Scheme(group_size=32), on_unsupported="raise")
    with pytest.raises(qcompile.UnsupportedLayerError, match="up: K=80 is not divisible"):
        qcompile.quantize_(model, cfg)
    assert all(type(m) is nn.Linear for m in (model.up, model.down, model.lm_head))


def test_quantize_frees_each_fp16_weight_before_the_next_layer(monkeypatch):
    """Peak extra memory of quantize_ is one layer, not a second copy of the model."""
    import weakref

    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])
    refs = [weakref.ref(layer.weight) for layer in model]
    freed_before_each: list[list[bool]] = []
    original = qcompile.W4A16Linear.from_linear.__func__

    def spy(cls, linear, scheme, packed=None):
        freed_before_each.append([r() is None for r in refs])
        return original(cls, linear, scheme, packed)

    monkeypatch.setattr(qcompile.W4A16Linear, "from_linear", classmethod(spy))
    qcompile.quantize_(model, QuantConfig())
    assert freed_before_each == [[i < j for i in range(4)] for j in range(4)]


def test_quantize_model_without_linears_reports_nothing():
    report = qcompile.quantize_(nn.Sequential(nn.ReLU()), QuantConfig())
    assert report.records == []


def test_backend_deepcopy_is_the_backend():
    """transformers deep-copies CompileConfig (backend included) before torch.compile."""
    be = qcompile.backend(G32)
    assert copy.deepcopy(be) is be
    assert copy.deepcopy({"backend": be})["backend"] is be


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 64)
        self.up = nn.Linear(64, 64)
        self.lm_head = nn.Linear(64, 100, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(torch.relu(self.up(self.embed(ids))))


def test_tied_lm_head_report_says_the_embedding_stays_full_precision():
    model = TiedLM()
    everything = QuantConfig(Scheme(group_size=32), skip=())
    compiled, be = _compile(model, everything)
    ids = torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        out = compiled(ids)
    ahead = copy.deepcopy(model)
    report = qcompile.quantize_(ahead, everything)
    with torch.no_grad():
        assert_close_rel(out, ahead(ids), torch.float32)
    for records in (be.report.records, report.records):
        by_name = {r.name: r for r in records}
        assert by_name["lm_head"].status == "quantized"
        assert by_name["lm_head"].detail.endswith(
            "; tied to embed, kept in full precision (embeddings are never quantized)"
        )
        assert "tied" not in by_name["up"].detail
    assert type(ahead.embed) is nn.Embedding and ahead.embed.weight is not None
