"""End-to-end tuning of W4A16 scales and offsets (`qcompile.quant.finetune`) on a tiny Llama."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama

import qcompile
from qcompile import QuantConfig, Scheme
from qcompile.quant.finetune import finetune_scales_


def _kl(model, teacher, batches) -> float:
    with torch.no_grad():
        total = 0.0
        for ids in batches:
            t = F.log_softmax(teacher(ids).logits, -1).flatten(0, -2)
            s = F.log_softmax(model(ids).logits, -1).flatten(0, -2)
            total += F.kl_div(s, t, log_target=True, reduction="batchmean").item()
    return total / len(batches)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    teacher = tiny_llama(2)
    model = copy.deepcopy(teacher)
    qcompile.quantize_(model, QuantConfig(Scheme(group_size=32)))
    vocab = teacher.config.vocab_size
    return teacher, model, [torch.randint(0, vocab, (2, 64)) for _ in range(4)]


def test_tuning_lowers_the_kl_and_only_moves_scales_and_offsets(setup):
    """On its calibration batches the KL to the unquantized model falls (here ~4x in 40
    steps); codes, biases and every non-quantized weight stay as they were, gradients off
    nowhere, and the tuned layers are still `W4A16Linear` running the op."""
    teacher, model, batches = setup
    before = _kl(model, teacher, batches)
    fixed = {n: b.clone() for n, b in model.named_buffers() if n.endswith("qweight")}
    params = {n: p.clone() for n, p in model.named_parameters()}
    scales = {n: b.clone() for n, b in model.named_buffers() if n.endswith("scales")}
    training = model.training
    losses = finetune_scales_(model, teacher, batches, steps=40, lr=3e-5, progress=False)
    assert len(losses) == 40
    after = _kl(model, teacher, batches)
    assert after < 0.5 * before, (before, after)
    assert all(torch.equal(b, fixed[n]) for n, b in model.named_buffers() if n in fixed)
    assert all(torch.equal(p, params[n]) and p.requires_grad for n, p in model.named_parameters())
    assert any(not torch.equal(b, scales[n]) for n, b in model.named_buffers() if n in scales)
    layers = [m for m in model.modules() if isinstance(m, qcompile.W4A16Linear)]
    assert len(layers) == 14 and model.training == training


def test_bad_input_errors(setup):
    teacher, model, batches = setup
    with pytest.raises(ValueError, match="no calibration batches"):
        finetune_scales_(model, teacher, [], progress=False)
    with pytest.raises(ValueError, match="steps=0 must be >= 1"):
        finetune_scales_(model, teacher, batches, steps=0, progress=False)
    with pytest.raises(ValueError, match="no W4A16Linear or W4A8Linear layers"):
        finetune_scales_(copy.deepcopy(teacher), teacher, batches, progress=False)


def test_w4a8_channel_scales_tune_and_nothing_else_moves():
    """W4A8 layers: only s1 (channel_scales) moves; the KL on the calibration batches falls
    and the layers still run the W4A8 op (activations quantized per token)."""
    torch.manual_seed(1)
    teacher = tiny_llama(2)
    model = copy.deepcopy(teacher)
    qcompile.quantize_(model, QuantConfig(Scheme(name="w4a8", group_size=32)))
    batches = [torch.randint(0, teacher.config.vocab_size, (2, 64)) for _ in range(4)]
    before = _kl(model, teacher, batches)
    kept = {n: b.clone() for n, b in model.named_buffers() if not n.endswith("channel_scales")}
    s1 = {n: b.clone() for n, b in model.named_buffers() if n.endswith("channel_scales")}
    finetune_scales_(model, teacher, batches, steps=40, lr=1e-5, progress=False)
    assert _kl(model, teacher, batches) < 0.8 * before
    assert all(torch.equal(b, kept[n]) for n, b in model.named_buffers() if n in kept)
    assert any(not torch.equal(b, s1[n]) for n, b in model.named_buffers() if n in s1)
    assert sum(isinstance(m, qcompile.W4A8Linear) for m in model.modules()) == 14


@pytest.mark.parametrize("name", ["w4a16", "w4a8"])
def test_block_reconstruction_moves_codes_and_lowers_every_blocks_error(name):
    """Block by block, codes and scales move (codes stay on the layer's 0..15 grid, W4A8's
    integer group scales and zeros stay) and each block's output error falls; the result
    still runs the quantized op, its KL to the float model falls, and nothing else moved."""
    from qcompile.quant.finetune import reconstruct_blocks_

    torch.manual_seed(2)
    teacher = tiny_llama(2)
    model = copy.deepcopy(teacher)
    qcompile.quantize_(model, QuantConfig(Scheme(name=name, group_size=32)))
    batches = [torch.randint(0, teacher.config.vocab_size, (2, 64)) for _ in range(4)]
    before = _kl(model, teacher, batches)
    qweights = {n: b.clone() for n, b in model.named_buffers() if n.endswith("qweight")}
    grid = {n: b.clone() for n, b in model.named_buffers() if n.endswith("group_scales")}
    grid |= {n: b.clone() for n, b in model.named_buffers() if n.endswith("group_zeros")}
    params = {n: p.clone() for n, p in model.named_parameters()}
    stats = reconstruct_blocks_(model, teacher, batches, epochs=8, lr_codes=5e-2, progress=False)
    assert len(stats) == 2
    for s in stats:
        assert s["mse_after"] < 0.9 * s["mse_before"], stats
        assert 0 < s["changed"] < 0.5, stats
    assert _kl(model, teacher, batches) < 0.9 * before
    assert any(not torch.equal(b, qweights[n]) for n, b in model.named_buffers() if n in qweights)
    assert all(torch.equal(b, grid[n]) for n, b in model.named_buffers() if n in grid)
    assert all(torch.equal(p, params[n]) and p.requires_grad for n, p in model.named_parameters())
    module = qcompile.quantize.QUANTIZED_MODULES[name]
    assert sum(type(m) is module for m in model.modules()) == 14


def test_block_reconstruction_bad_input(setup):
    from qcompile.quant.finetune import reconstruct_blocks_

    teacher, model, batches = setup
    with pytest.raises(ValueError, match="no calibration batches"):
        reconstruct_blocks_(model, teacher, [], progress=False)
    with pytest.raises(ValueError, match="epochs=0 must be >= 1"):
        reconstruct_blocks_(model, teacher, batches, epochs=0, progress=False)
    with pytest.raises(ValueError, match="no W4A16Linear or W4A8Linear layers"):
        reconstruct_blocks_(copy.deepcopy(teacher), teacher, batches, progress=False)
    with pytest.raises(ValueError, match="no counterpart in the model"):
        reconstruct_blocks_(model, tiny_llama(3), batches, progress=False)


def test_block_reconstruction_refuses_a_teacher_in_another_basis():
    """A rotated model against the unrotated float model: the hidden states are in another
    basis, so the error names the fix instead of tuning toward the wrong targets."""
    from qcompile.quant.finetune import reconstruct_blocks_
    from qcompile.quant.rotate import rotate_model_

    torch.manual_seed(3)
    teacher = tiny_llama(2)
    model = copy.deepcopy(teacher)
    rotate_model_(model)
    qcompile.quantize_(model, QuantConfig(Scheme(group_size=32)))
    batches = [torch.randint(0, teacher.config.vocab_size, (1, 32)) for _ in range(2)]
    with pytest.raises(ValueError, match="rotated with the same seed"):
        reconstruct_blocks_(model, teacher, batches, progress=False)
    rotated = copy.deepcopy(teacher)
    rotate_model_(rotated)
    stats = reconstruct_blocks_(model, rotated, batches, epochs=4, lr_codes=5e-2, progress=False)
    assert all(s["mse_after"] < s["mse_before"] for s in stats), stats


def test_block_reconstruction_restores_a_block_it_made_worse():
    """With a learning rate far too high the codes scatter and the block's MSE rises: the
    block is restored (its buffers as before, MSE after = before, no code counted)."""
    from qcompile.quant.finetune import reconstruct_blocks_

    torch.manual_seed(4)
    teacher = tiny_llama(2)
    model = copy.deepcopy(teacher)
    qcompile.quantize_(model, QuantConfig(Scheme(name="w4a8", group_size=32)))
    batches = [torch.randint(0, teacher.config.vocab_size, (1, 32)) for _ in range(2)]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    stats = reconstruct_blocks_(
        model, teacher, batches, epochs=2, lr_codes=50.0, lr_scales=5.0, progress=False
    )
    assert all(s["mse_after"] == s["mse_before"] and s["changed"] == 0 for s in stats), stats
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
