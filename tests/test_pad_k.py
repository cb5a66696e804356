"""`Scheme(pad_k=True)`: layers whose K is not a multiple of the group size are quantized with K
padded to whole groups (the weight's extra columns copy its last one, the input gets zeros)
instead of falling back; quantization, modules, the backend's pass, GPTQ / AWQ and
checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ROUND_TRIP_TOKENS, assert_close_rel, load_in_fresh_process, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qcompile
from qcompile import QuantConfig, Scheme
from qcompile.quant.gptq import gptq_quantize_weight
from qcompile.quant.int4 import PackedInt4, dequantize_int4
from qcompile.quant.rtn import quantize_weight_int4
from qcompile.quant.w4a8 import (
    PackedW4A8,
    dequantize_activations,
    dequantize_w4a8,
    quantize_activations_per_token,
    quantize_weight_w4a8,
)

W4A16_PAD = Scheme(group_size=32, pad_k=True)
W4A8_PAD = Scheme(name="w4a8", group_size=32, pad_k=True)

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def test_padded_k_rounds_up_to_whole_groups_only_when_asked():
    assert Scheme(group_size=128).padded_k(576) == 576
    assert Scheme(group_size=128, pad_k=True).padded_k(576) == 640
    assert Scheme(group_size=128, pad_k=True).padded_k(512) == 512
    # per-channel: one group of the whole padded K, a multiple of the kernels' K tile
    assert Scheme(group_size=None, pad_k=True).padded_k(80) == 96
    assert Scheme(group_size=None, pad_k=True).padded_k(100) == 128
    assert Scheme(group_size=None).padded_k(100) == 100


def test_per_channel_multiple_is_every_kernel_families_k_tile():
    from qcompile.config import PER_CHANNEL_K_MULTIPLE
    from qcompile.ops import w4a8, w4a16

    assert PER_CHANNEL_K_MULTIPLE == w4a16.KERNEL_K_MULTIPLE == w4a8.KERNEL_K_MULTIPLE


@pytest.mark.parametrize("name", ["w4a16", "w4a8"])
def test_per_channel_layer_with_k_off_the_kernel_tile_is_padded(name):
    """K = 100 per-channel (not a multiple of 8, so unsupported even on CPU without padding)
    is stored as K = 128, one group per row whose range is the real columns'; the backend
    quantizes it on CUDA's terms too (`unsupported_reason` for a CUDA weight says nothing)."""
    from qcompile.passes.linear import unsupported_reason

    scheme = Scheme(name=name, group_size=None, pad_k=True)
    assert unsupported_reason((24, 100), torch.float16, "cuda", scheme) is None
    assert "multiple of 8" in unsupported_reason(
        (24, 100), torch.float16, "cpu", Scheme(name=name, group_size=None)
    )
    torch.manual_seed(5)
    linear = nn.Linear(100, 24)
    module = qcompile.quantize.QUANTIZED_MODULES[name].from_linear(linear, scheme)
    assert module.in_features == 100 and module.group_size == 128
    assert module.qweight.shape == (16, 24)
    x = torch.randn(4, 100)
    with torch.no_grad():
        assert_close_rel(module(x), linear(x), torch.float32, tol=0.1)  # a 4-bit weight


@pytest.mark.parametrize("scheme", [W4A16_PAD, W4A8_PAD], ids=["w4a16", "w4a8"])
def test_padding_leaves_every_real_column_as_its_unpadded_group_has_it(scheme):
    """K = 80 at g32: groups 0-1 are whole and quantize exactly as without padding; the last
    group holds 16 real columns and 16 copies of column 79, so its range is its real columns'
    and the real columns' values equal those of the 16 columns quantized as one group."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 80, generator=gen)
    w[:, 70] *= 20  # an outlier inside the partial group
    w[0, 64:] = w[0, 64:].abs() + 1  # a tail range without 0: zeros as padding would widen it
    if scheme.name == "w4a16":
        padded = dequantize_int4(quantize_weight_int4(w, scheme, torch.float32), torch.float32)
        whole = dequantize_int4(quantize_weight_int4(w[:, :64], scheme, torch.float32))
        tail_w = torch.cat([w[:, 64:], w[:, 64:]], dim=1)  # 32 columns with the tail's range
        tail = dequantize_int4(quantize_weight_int4(tail_w, scheme, torch.float32))[:, :16]
    else:
        padded = dequantize_w4a8(quantize_weight_w4a8(w, scheme))
        # QoQ's s1 is per row over all K: the reference pads the same way by hand
        by_hand = torch.cat([w, w[:, -1:].expand(24, 16)], dim=1)
        ref = dequantize_w4a8(quantize_weight_w4a8(by_hand, Scheme(name="w4a8", group_size=32)))
        whole, tail = ref[:, :64], ref[:, 64:80]
    assert padded.shape == (24, 96)
    assert torch.equal(padded[:, :64], whole)
    assert torch.equal(padded[:, 64:80], tail)
    err = (padded[:, :80] - w).abs().max() / w.abs().max()
    assert err < 0.08  # a quantization error, not a misplaced column


def test_unpadded_scheme_still_refuses_with_the_fix():
    with pytest.raises(ValueError, match=r"K=80 is not divisible by group_size=32.*pad_k=True"):
        quantize_weight_int4(torch.randn(8, 80), Scheme(group_size=32))


class _Net(nn.Module):
    """up: K = 80 (padded to 96 at g32), down: K = 128 (whole groups)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(80, 128)
        self.down = nn.Linear(128, 48)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)))


@pytest.mark.parametrize("scheme", [W4A16_PAD, W4A8_PAD], ids=["w4a16", "w4a8"])
def test_quantize_pads_the_layer_and_its_input(scheme):
    """`quantize_` quantizes the K = 80 layer (reported as padded); its output is the padded
    weight's product over the real columns, the same as the unpadded math."""
    torch.manual_seed(1)
    model = _Net()
    up = model.up
    report = qcompile.quantize_(model, QuantConfig(scheme=scheme))
    rec = {r.name: r for r in report.records}
    assert rec["up"].status == "quantized" and "K=80 padded to 96" in rec["up"].detail
    assert rec["down"].status == "quantized" and "padded" not in rec["down"].detail
    q = model.up
    assert q.in_features == 80 and q.qweight.shape == (96 // 8, 128)
    x = torch.randn(2, 5, 80)
    if scheme.name == "w4a16":
        w = dequantize_int4(quantize_weight_int4(up.weight, scheme, up.weight.dtype))
        want = x @ w[:, :80].t() + up.bias
    else:  # the W4A8 op's own math on the input padded by hand
        xp = torch.nn.functional.pad(x, (0, 16))
        want = torch.ops.qcompile.w4a8_linear(
            xp, q.qweight, q.group_scales, q.group_zeros, q.channel_scales, q.bias, 32, "int8"
        )
    with torch.no_grad():
        assert_close_rel(q(x), want, torch.float32, tol=1e-6)


@pytest.mark.parametrize("scheme", [W4A16_PAD, W4A8_PAD], ids=["w4a16", "w4a8"])
def test_backend_pads_in_the_graph_and_matches_quantize(scheme):
    """The backend quantizes the K = 80 layer too: one pad node on its input, the layer's op
    on the padded input, outputs equal to the `quantize_` model's."""
    torch.manual_seed(2)
    model = _Net()
    eager = _Net()
    eager.load_state_dict(model.state_dict())
    qcompile.quantize_(eager, QuantConfig(scheme=scheme))
    be = qcompile.backend(QuantConfig(scheme=scheme))
    compiled = torch.compile(model, backend=be)
    x = torch.randn(3, 80)
    with torch.no_grad():
        out = compiled(x)
        want = eager(x)
    rec = {r.name: r for r in be.report.records}
    assert rec["up"].status == "quantized" and "K=80 padded to 96" in rec["up"].detail
    assert_close_rel(out, want, torch.float32, tol=1e-5)


@pytest.mark.parametrize("ahead_of_time", [False, True], ids=["backend", "quantize_"])
def test_padded_siblings_still_fuse_and_match_eager(ahead_of_time):
    """hidden 96 at g64 (every K = 96 layer padded to 128): q/k/v and gate/up share one pad of
    their input and still fuse into one launch each, whether the backend quantizes them or
    `quantize_` did (each module then pads its own input: the pass makes them share one);
    logits equal the eager `quantize_` model's."""
    config = QuantConfig(scheme=Scheme(group_size=64, pad_k=True))
    model = tiny_llama(1, hidden_size=96)
    eager = tiny_llama(1, hidden_size=96)
    qcompile.quantize_(eager, config)
    if ahead_of_time:
        qcompile.quantize_(model, config)
    be = qcompile.backend(config)
    compiled = torch.compile(model, backend=be)
    tokens = torch.arange(12).view(1, 12)
    with torch.no_grad():
        got, want = compiled(tokens).logits, eager(tokens).logits
    assert_close_rel(got, want, torch.float32, tol=1e-5)
    rec = {r.name: r for r in be.report.records}
    q = rec["model.layers.0.self_attn.q_proj"]
    assert q.shape == (96, 96) and "K=96 padded to 128" in q.detail
    assert [n.rsplit(".", 1)[1] for n in q.fused_with] == ["k_proj", "v_proj"]
    assert [n.rsplit(".", 1)[1] for n in rec["model.layers.0.mlp.gate_proj"].fused_with] == [
        "up_proj"
    ]
    assert "padded" not in rec["model.layers.0.mlp.down_proj"].detail


def test_gptq_pads_and_keeps_the_hessian_objective_below_rtn():
    """GPTQ over a padded K: the padding meets zero inputs (a zero Hessian block, decoupled
    from the real columns); on the real columns its objective tr(dW H dW^T) beats RTN's."""
    gen = torch.Generator().manual_seed(3)
    # correlated inputs (what GPTQ's error feedback exploits): 24 factors and a little noise
    x = torch.randn(512, 24, generator=gen) @ torch.randn(24, 80, generator=gen)
    x += 0.1 * torch.randn(512, 80, generator=gen)
    h = 2 * x.t() @ x / x.shape[0]
    w = torch.randn(32, 80, generator=gen)
    packed = gptq_quantize_weight(w, h, W4A16_PAD, torch.float32)
    assert packed.qweight.shape == (12, 32)
    rtn = dequantize_int4(quantize_weight_int4(w, W4A16_PAD, torch.float32))[:, :80]
    ours = dequantize_int4(packed)[:, :80]

    def objective(d):
        return ((d @ h) * d).sum().item()

    assert objective(ours - w) < 0.8 * objective(rtn - w)


def test_awq_scale_search_runs_on_a_padded_layer():
    """AWQ's search measures its objective on the real columns of the padded round trip: the
    scale it returns has one entry per real input channel and beats no scaling."""
    from qcompile.quant.awq import RTN_ROUNDTRIPS, awq_search_scale

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(256, 80, generator=gen)
    x[:, 5] *= 30  # a salient input channel
    h = 2 * x.t() @ x / x.shape[0]
    w = torch.randn(16, 80, generator=gen)
    s = awq_search_scale([w], h, W4A16_PAD)
    assert s.shape == (80,)
    roundtrip = RTN_ROUNDTRIPS["w4a16"]

    def objective(scale):
        d = roundtrip(w * scale, W4A16_PAD) / scale - w
        return ((d @ h) * d).sum().item()

    assert objective(s) < objective(torch.ones(80))


@pytest.mark.parametrize("scheme", [Scheme(group_size=64, pad_k=True), W4A8_PAD.__class__(
    name="w4a8", group_size=64, pad_k=True)], ids=["w4a16", "w4a8"])  # fmt: skip
def test_checkpoint_of_a_padded_model_round_trips_in_a_fresh_process(tmp_path, scheme):
    """hidden 96 at g64: every K = 96 layer is stored padded to 128 (the record says so) and a
    fresh process loads it back with identical logits; AWQ's and GPTQ's padding is the same
    layout (tested above)."""
    model = tiny_llama(2, hidden_size=96)
    report = qcompile.quantize_(model, QuantConfig(scheme=scheme))
    assert not report.by_status("fallback")
    qcompile.save_quantized(model, tmp_path / "q")
    record = json.loads((tmp_path / "q" / "quantization_config.json").read_text())
    q_proj = record["modules"]["model.layers.0.self_attn.q_proj"]
    assert q_proj["in_features"] == 96 and q_proj["padded_in_features"] == 128
    assert "padded_in_features" not in record["modules"]["model.layers.0.mlp.down_proj"]
    with torch.no_grad():
        expected = model(ROUND_TRIP_TOKENS).logits
    assert torch.equal(load_in_fresh_process(tmp_path, [tmp_path / "q"])["logits0"], expected)


def test_checkpoint_with_a_wrong_padding_is_refused(tmp_path):
    """A record whose padded K is not K rounded up to whole groups names the layer and shapes."""
    model = tiny_llama(1, hidden_size=96)
    qcompile.quantize_(model, QuantConfig(scheme=Scheme(group_size=64, pad_k=True)))
    folder = tmp_path / "q"
    qcompile.save_quantized(model, folder)
    path = folder / "quantization_config.json"
    record = json.loads(path.read_text())
    record["modules"]["model.layers.0.self_attn.q_proj"]["padded_in_features"] = 192
    path.write_text(json.dumps(record))
    with pytest.raises(
        qcompile.CheckpointError, match=r"q_proj: K=96 padded to 192 is not K padded to whole"
    ):
        qcompile.load_quantized(folder)


@settings(max_examples=20, deadline=None)
@given(
    k_groups=st.integers(1, 4),
    k_rest=st.sampled_from([8, 24, 40, 56, 72, 120]),
    group=st.sampled_from([32, 64, 128]),
    name=st.sampled_from(["w4a16", "w4a8"]),
    outlier=st.floats(1.0, 50.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_padded_layer_computes_the_real_columns_product(
    k_groups, k_rest, group, name, outlier, seed
):
    """Any K that is not a multiple of the group: the layer stores whole groups (K' - K < G),
    reports its real K, and its output is the dequantized weight's product over the real
    columns, in float64 (W4A8: with the per-token int8 input)."""
    k = k_groups * group + k_rest % group
    if k % group == 0:
        return
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, 24)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(24, k, generator=gen))
        linear.weight[:, k - 1] *= outlier  # the column the padding copies
    scheme = Scheme(name=name, group_size=group, pad_k=True)
    module = qcompile.quantize.QUANTIZED_MODULES[name].from_linear(linear, scheme)
    kp = -(-k // group) * group
    assert module.in_features == k and module.qweight.shape == (kp // 8, 24)
    x = torch.randn(3, k, generator=gen)
    with torch.no_grad():
        out = module(x)
    if name == "w4a16":
        w = dequantize_int4(PackedInt4(module.qweight, module.scales, module.offsets, group))
        want = x.double() @ w[:, :k].double().t() + linear.bias.double()
        assert_close_rel(out, want, torch.float32)
    else:  # per-token int8 x over the real columns (zeros leave each token's absmax alone)
        args = (module.qweight, module.group_scales, module.group_zeros, module.channel_scales)
        w = dequantize_w4a8(PackedW4A8(*args, group))
        xq = dequantize_activations(*quantize_activations_per_token(x, "int8"))
        want = xq.double() @ w[:, :k].double().t() + linear.bias.double()
        assert_close_rel(out, want, torch.float32)
