"""`make demo`: quantize and compile a small built-in model, print what happened and how well.

The model is a Llama-architecture decoder built from a transformers config with random
weights (no download). On CPU the quantized layers run the reference op; on a GPU they run
the Triton kernels and the demo also times a forward pass against the fp16 model.
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
    print(f"\nlogits vs the {dtype} model: relative error {rel:.3%}, top-1 agreement {agree:.1%}")
    if device == "cuda":
        one = ids[:, :1]
        with torch.no_grad():
            fp = _time_ms(lambda: model(one))
            q = _time_ms(lambda: compiled(one))
        print(f"one-token forward: fp16 eager {fp:.2f} ms, qcompile {q:.2f} ms")


if __name__ == "__main__":
    main()
