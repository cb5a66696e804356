"""Compile time of a tiny Llama decode step through the qcompile backend: the static compile
at batch 1, then Dynamo's dynamic-batch recompile at batch 16, with Dynamo's phase counters.

Runs on CPU in minutes: the Dynamo / AOT autograd costs of a graph depend on its op count,
not on its sizes, so a tiny model with the real layer structure shows them. Run it twice
with the same TORCHINDUCTOR_CACHE_DIR to time a warm restart (FX graph and AOT autograd
caches filled by the first run).

    TORCHINDUCTOR_CACHE_DIR=/tmp/ind python benchmarks/probe_compile_time.py --layers 16
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_e2e import decode_step, model_config, new_cache, prefill

import qcompile
from qcompile import QuantConfig

PHASES = (
    "bytecode_tracing", "create_aot_dispatcher_function", "compile_fx.<locals>.fw_compiler_base",
)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--backend", default="qcompile", choices=("qcompile", "inductor"))
    args = ap.parse_args()
    from torch._dynamo.utils import compile_times, counters
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(args.layers, tiny=True)).eval()
    backend = "inductor"
    if args.backend == "qcompile":
        config = QuantConfig(skip=())
        qcompile.quantize_(model, config)
        backend = qcompile.backend(config)
    step = torch.compile(decode_step, backend=backend, fullgraph=True)
    rows = []
    for batch in (1, 16):
        cache = new_cache(model, 64)
        ids = torch.randint(0, model.config.vocab_size, (batch, 8))
        with torch.no_grad():
            token = prefill(model, ids, cache)
            t0 = time.perf_counter()
            step(model, token, cache, torch.tensor([8]))
            seconds = time.perf_counter() - t0
        names, values = compile_times(repr="csv", aggregate=True)
        phases = {n: round(float(v), 2) for n, v in zip(names, values, strict=True) if n in PHASES}
        rows.append({"batch": batch, "first_step_s": round(seconds, 2), "phases_so_far": phases})
    rows.append({"aot_autograd": dict(counters["aot_autograd"])})
    meta = {"torch": torch.__version__, "layers": args.layers, "backend": args.backend}
    print(json.dumps({"meta": meta, "rows": rows}))


if __name__ == "__main__":
    main()
