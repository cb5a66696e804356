"""SmoothQuant: the scale formula, folding keeps the function, and it helps W4A8 where
activations have outlier channels."""

from __future__ import annotations

import copy

import helpers
import pytest
import torch

import qcompile
from qcompile import QuantConfig, Scheme
from qcompile.quant.calibration import AbsMaxRecorder
from qcompile.quant.smooth import smooth_block, smooth_quantize_model, smooth_scales

W4A8 = QuantConfig(Scheme(name="w4a8", group_size=32))


@pytest.fixture(scope="module")
def outlier_llama():
    """A tiny Llama whose norms emit a few channels 30x larger (LLM-like activation outliers)."""
    model = helpers.tiny_llama(num_layers=2)  # find_blocks wants a list of several blocks
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] = 30.0
            layer.post_attention_layernorm.weight[5:8] = 30.0
    return model


def _tokens(n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, 48), generator=gen) for _ in range(n)]


def test_smooth_scales_formula():
    act = torch.tensor([4.0, 1.0, 0.0])
    w1 = torch.tensor([[1.0, -2.0, 0.5], [0.25, 1.0, -4.0]])
    w2 = torch.tensor([[-8.0, 0.5, 1.0]])
    s = smooth_scales(act, [w1, w2], alpha=0.5)
    w_max = torch.tensor([8.0, 2.0, 4.0])
    expected = act.clamp_min(1e-5).sqrt() / w_max.sqrt()
    torch.testing.assert_close(s, expected)
    torch.testing.assert_close(smooth_scales(act, [w1], alpha=1.0), act.clamp_min(1e-5))
    with pytest.raises(ValueError, match=r"alpha=1.5 is outside \[0, 1\]"):
        smooth_scales(act, [w1], alpha=1.5)


def test_smoothing_keeps_the_fp32_function_and_flattens_activations(outlier_llama):
    model = copy.deepcopy(outlier_llama)
    ids = _tokens(1, 5)[0]
    block = model.model.layers[0]
    with torch.no_grad():
        before = model(ids).logits
        with AbsMaxRecorder(block) as rec:
            for batch in _tokens(4, 1):
                model(batch)
        stats = rec.result()
        smoothed = smooth_block(block, stats, alpha=0.5)
        after = model(ids).logits
        with AbsMaxRecorder(block) as rec2:
            model(ids)
    assert set(smoothed) == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    }  # fmt: skip
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)

    def spread(a):  # outlier channels vs a typical channel
        return (a.max() / a.median()).item()

    old, new = stats["self_attn.q_proj"], rec2.result()["self_attn.q_proj"]
    assert spread(new) < 0.5 * spread(old), (spread(old), spread(new))


def test_smoothquant_lowers_w4a8_error_on_outlier_channels(outlier_llama):
    held_out = torch.cat(_tokens(2, 9))
    plain = copy.deepcopy(outlier_llama)
    qcompile.quantize_(plain, W4A8)
    smooth = copy.deepcopy(outlier_llama)
    report = smooth_quantize_model(smooth, _tokens(4, 1), W4A8, alpha=0.5, progress=False)
    assert len(report.by_status("quantized")) == 2 * 7
    assert isinstance(smooth.model.layers[0].mlp.down_proj, qcompile.W4A8Linear)
    with torch.no_grad():
        ref = outlier_llama(held_out).logits
        e_plain = helpers.rel_error(plain(held_out).logits, ref)
        e_smooth = helpers.rel_error(smooth(held_out).logits, ref)
    assert e_smooth < 0.9 * e_plain, f"smoothed {e_smooth:.4f} vs plain {e_plain:.4f}"
