"""The perplexity harness on tiny models (the real-model numbers live in docs/accuracy.md)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from qcompile.eval import load_corpus, perplexity


class Unigram(torch.nn.Module):
    """Predicts the same distribution everywhere: perplexity has a closed form."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(probs.log())

    def forward(self, ids):
        return SimpleNamespace(logits=self.logits.expand(*ids.shape, -1))


def test_perplexity_matches_closed_form():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    ids = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(0))
    got = perplexity(Unigram(probs), ids, window=16, windows=4, progress=False)
    predicted = torch.cat([ids[i * 16 + 1 : (i + 1) * 16] for i in range(4)])
    expected = math.exp(-probs.log()[predicted].mean().item())
    assert got == pytest.approx(expected, rel=1e-6)


def test_uniform_model_has_vocab_size_perplexity():
    ids = torch.randint(0, 10, (40,))
    assert perplexity(Unigram(torch.full((10,), 0.1)), ids, 8, 5, progress=False) == pytest.approx(
        10.0
    )


def test_too_few_tokens_is_a_clear_error():
    with pytest.raises(ValueError, match="need window \\* windows = 64"):
        perplexity(Unigram(torch.full((4,), 0.25)), torch.zeros(10, dtype=torch.long), 16, 4)


def test_load_corpus_sorts_and_joins(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.rst").write_text("ignored")
    assert load_corpus(tmp_path) == "first\n\nsecond"
    with pytest.raises(FileNotFoundError, match="no \\*.md files"):
        load_corpus(tmp_path, "*.md")


def _decoded_perplexity(model, ids: torch.Tensor, window: int, windows: int, scheme) -> float:
    """The oracle: each window decoded one token at a time through a KV4 cache."""
    from qcompile.integrations.kv4_cache import KV4Cache, enable_kv4_attention

    enable_kv4_attention(model)
    total = 0.0
    for i in range(windows):
        chunk = ids[i * window : (i + 1) * window][None]
        cache = KV4Cache(model.config, window, scheme)
        logits = torch.cat(
            [model(chunk[:, t : t + 1], past_key_values=cache).logits for t in range(window)], 1
        )
        total += torch.nn.functional.cross_entropy(
            logits[0, :-1].float(), chunk[0, 1:], reduction="sum"
        ).item()
    return math.exp(total / (windows * (window - 1)))


@pytest.mark.parametrize("key_tokens", [0, 32])
def test_kv4_perplexity_is_token_by_token_decoding(key_tokens):
    """`kv=`: every window is read as generate() decodes it, keys per token or per channel
    (whose windows are fed in chunks: that must equal decoding one token at a time)."""
    from helpers import tiny_llama

    from qcompile.config import KVScheme

    model = tiny_llama(2)
    # sharper attention, so 4-bit keys change the result more
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(4)
            layer.self_attn.q_proj.weight.mul_(4)
    ids = torch.randint(0, 256, (2 * 40,), generator=torch.Generator().manual_seed(1))
    scheme = KVScheme(group_size=32, key_tokens=key_tokens)
    plain = perplexity(model, ids, window=40, windows=2, progress=False)
    got = perplexity(model, ids, window=40, windows=2, progress=False, kv=scheme)
    expected = _decoded_perplexity(model, ids, 40, 2, scheme)
    assert got == pytest.approx(expected, rel=1e-6)
    # the 4-bit cache was read, not the 16-bit K/V (a random model barely uses attention:
    # ~2e-4 here, against agreement to 1e-6 above)
    assert abs(got - plain) / plain > 5e-5
