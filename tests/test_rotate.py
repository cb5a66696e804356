"""Residual-stream rotation: orthogonal matrices, the same function after folding, clear errors
for models it cannot rotate, and the CLI / checkpoint path of a rotated, quantized model."""

from __future__ import annotations

import copy

import helpers
import pytest
import torch

import qcompile
from qcompile import QuantConfig, Scheme
from qcompile.quant.rotate import pick_rotation, rotate_model_, rotation_matrix

TOKENS = helpers.ROUND_TRIP_TOKENS


@pytest.mark.parametrize("d", [1, 7, 64, 96, 576])
def test_rotation_matrix_is_orthogonal_with_a_hadamard_factor(d):
    q = rotation_matrix(d, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    if d == 64:  # a randomized Hadamard: every entry +-1/8
        assert torch.allclose(q.abs(), torch.full_like(q, 1 / 8))
    assert not torch.equal(rotation_matrix(d, seed=4), q) or d == 1


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits.double()


@pytest.mark.parametrize(
    ("family", "overrides"),
    [("llama", {"tie_word_embeddings": True}), ("llama", {"hidden_size": 96, "head_dim": 24}),
     ("qwen2", {}), ("mistral", {"num_key_value_heads": 1})],
)  # fmt: skip
def test_rotation_keeps_the_function(family, overrides):
    """Tied or not, GQA / MQA, biased q/k/v (Qwen2), hidden 96 = 32 x 3 and a head_dim (24)
    that takes no value rotation: same logits (float32), different weights, norms all 1."""
    model = helpers.tiny_causal_lm(family, num_layers=2, **overrides)
    with torch.no_grad():  # non-trivial norms, so folding them matters
        for norm in [model.model.norm] + [
            n
            for layer in model.model.layers
            for n in (layer.input_layernorm, layer.post_attention_layernorm)
        ]:
            norm.weight.uniform_(0.5, 2.0)
    want = _logits(model)
    rotated = copy.deepcopy(model)
    rotate_model_(rotated, seed=1)
    helpers.assert_close_rel(_logits(rotated), want, torch.float32)
    layer, before = rotated.model.layers[0], model.model.layers[0]
    assert not torch.allclose(layer.self_attn.q_proj.weight, before.self_attn.q_proj.weight)
    assert torch.all(layer.input_layernorm.weight == 1) and torch.all(
        rotated.model.norm.weight == 1
    )
    assert rotated.lm_head.weight is not rotated.model.embed_tokens.weight
    assert rotated.config.tie_word_embeddings is False


def test_rotation_without_folding_a_norm_changes_the_function():
    """The test above can fail: rotating with one norm's weight left in place is not the same
    model (RMSNorm's per-channel weight does not commute with the rotation)."""
    model = helpers.tiny_llama(num_layers=2)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.uniform_(0.5, 2.0)
    want = _logits(model)
    rotate_model_(model, seed=1)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.uniform_(0.5, 2.0)
    assert helpers.rel_error(_logits(model), want) > 1e-3


def test_rotation_rejects_norms_and_layers_it_cannot_fold():
    gemma = helpers.tiny_causal_lm("gemma3", num_layers=2)
    with pytest.raises(ValueError, match="Gemma3RMSNorm is not a plain RMSNorm"):
        rotate_model_(gemma)
    model = helpers.tiny_llama(num_layers=2)
    qcompile.quantize_(model, QuantConfig(Scheme(group_size=32)))
    with pytest.raises(ValueError, match="rotate the float model before quantizing it"):
        rotate_model_(model)
    with pytest.raises(ValueError, match="is not a Llama-family causal LM"):
        rotate_model_(torch.nn.Linear(4, 4))


def test_rotated_quantized_model_round_trips_a_checkpoint(tmp_path):
    """Rotated, then quantized: the checkpoint keeps the untied lm_head and loads to the same
    logits."""
    model = helpers.tiny_llama(num_layers=2, tie_word_embeddings=True)
    rotate_model_(model)
    qcompile.quantize_(model, QuantConfig(Scheme(group_size=32)))
    qcompile.save_quantized(model, tmp_path / "rot")
    loaded = qcompile.load_quantized(tmp_path / "rot")
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(_logits(loaded), _logits(model))


def test_pick_rotation_keeps_the_seed_with_the_lowest_held_out_perplexity():
    """Every seed is scored on the held-out batches; the kept model is that seed's rotation,
    quantized, and the input model is left as it was."""
    from qcompile.eval import perplexity

    model = helpers.tiny_llama(num_layers=2)
    before = copy.deepcopy(model.state_dict())
    gen = torch.Generator().manual_seed(0)
    held_out = [torch.randint(0, 256, (1, 16), generator=gen) for _ in range(3)]

    def quantize(m):
        qcompile.quantize_(m, QuantConfig(Scheme(group_size=32)))

    best, _, seed, scores = pick_rotation(model, quantize, held_out, (0, 1, 2), progress=False)
    assert sorted(scores) == [0, 1, 2] and len(set(scores.values())) == 3
    assert scores[seed] == min(scores.values())
    again = copy.deepcopy(model)
    rotate_model_(again, seed=seed)
    quantize(again)
    assert torch.equal(_logits(best), _logits(again))
    ids = torch.cat([b.flatten() for b in held_out])
    assert perplexity(best, ids, window=16, windows=3, progress=False) == pytest.approx(
        scores[seed]
    )
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in before.items())
    with pytest.raises(ValueError, match="no seeds"):
        pick_rotation(model, quantize, held_out, seeds=())
