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
