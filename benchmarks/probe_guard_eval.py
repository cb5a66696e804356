"""Dynamo's guard lookup per compiled decode step, with and without
`torch.compiler.set_stance(skip_guard_eval_unsafe=True)` (a CLI option until the
thirty-second session, which found it slower on the H100 and removed it), on a tiny
random Llama: the profiler's "TorchDynamo Cache Lookup" per call and the wall time of a
generate() of 32 tokens, 16-bit cache or KV4. Runs on CPU (Inductor) or on a GPU.

    python benchmarks/probe_guard_eval.py --layers 8 --kv4 token
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.profiler import profile
from transformers import LlamaConfig, LlamaForCausalLM

from qcompile.integrations.generation import (
    _compile_kwargs,
    cache_kwargs,
    compile_config,
    generation_cache,
)
from qcompile.integrations.kv4_cache import enable_kv4_attention

ap = argparse.ArgumentParser()
ap.add_argument("--layers", type=int, default=8)
ap.add_argument("--kv4", default="off", choices=("off", "token"))
ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = ap.parse_args()

torch.manual_seed(0)
config = LlamaConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers,
    num_attention_heads=2, num_key_value_heads=1, head_dim=64, vocab_size=128,
    max_position_embeddings=4096,
)  # fmt: skip
model = LlamaForCausalLM(config).eval().to(args.device)
if args.kv4 != "off":
    enable_kv4_attention(model)
compile = compile_config("inductor", mode=None)
cache = generation_cache(model, args.kv4, 48, True)
ids = torch.randint(0, 128, (1, 8), device=args.device)


def generate() -> torch.Tensor:
    cache.reset()
    return model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
        min_new_tokens=32, pad_token_id=0, **_compile_kwargs(compile), **cache_kwargs(cache),
    )  # fmt: skip


want = generate()  # compiles (the warm-up)
generate()
for skip in (False, True):
    stance = torch.compiler.set_stance(skip_guard_eval_unsafe=True)
    with stance if skip else contextlib.nullcontext():
        assert torch.equal(generate(), want)
        t0 = time.perf_counter()
        generate()
        seconds = time.perf_counter() - t0
        with profile() as prof:
            generate()
    lookups = [e for e in prof.key_averages() if "Cache Lookup" in e.key]
    per_call = " ".join(f"{e.cpu_time_total / e.count:.1f} us x{e.count}" for e in lookups)
    print(f"layers={args.layers} kv4={args.kv4} skip_guard_eval={skip}: generate "
          f"{seconds * 1e3:.1f} ms, guard lookup {per_call}")  # fmt: skip
