"""Where a long-context decode step's time goes, W4A16 alone vs W4A16 + KV4: wall time per
generate() step, GPU time per forward (CUDA events around each model call: they also count
the host's work before the CUDA graph's launch), the top CUDA kernels / CPU ops of a few
generate() calls (torch.profiler, prompt included) and, from replays of the last compiled
decode call alone, each kernel's GPU time per decode step (`decode_kernels_*.txt`) and the
host's CPU ops (`decode_host_*.txt`).

    python benchmarks/probe_e2e_long.py --layers 8 --prompt 8000 --out $OUT
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import qcompile
from qcompile.integrations.generation import (
    _compile_kwargs,
    cache_kwargs,
    compile_config,
    generation_cache,
)
from qcompile.integrations.kv4_cache import enable_kv4_attention
from qcompile.lowering import kv4_attention as kv4_lowering
from qcompile.lowering import w4a16 as w4a16_lowering
from qcompile.lowering.autotune import _read_entries, autotuner

qcompile_backend = importlib.import_module("qcompile.backend")  # (`qcompile.backend` is a function)

ap = argparse.ArgumentParser()
ap.add_argument("--layers", type=int, default=8)
ap.add_argument("--prompt", type=int, default=8000)
ap.add_argument("--steps", type=int, default=16)
ap.add_argument("--out", type=Path, default=Path("."))
ap.add_argument(
    "--skip-module-guards", action="store_true",
    help="also run W4A16 + KV4 with Dynamo's guards on nn modules skipped "
    "(torch.compiler.skip_guard_on_all_nn_modules_unsafe): how much of the host's time per "
    "compiled call is guard evaluation",
)  # fmt: skip
ap.add_argument(
    "--pdl", action="store_true",
    help="also run both with programmatic dependent launch (the default since the thirty-third "
    "session; the plain variants then run without): the W4A16 lane kernel (`_LANE_PDL`) and "
    "Inductor's kernels (`backend._INDUCTOR_PDL`, Inductor's triton.enable_pdl)",
)  # fmt: skip
ap.add_argument(
    "--kv4-pdl", action="store_true",
    help="also run W4A16 + KV4 with PDL and the KV4 cache write and decode_t attention under "
    "it too (`kv4_attention._KV4_PDL`, off by default: untimed)",
)  # fmt: skip
ap.add_argument(
    "--rs-ab", action="store_true",
    help="W4A16 + KV4 under PDL as shipped, and with --alt-configs' picks over the shipped "
    "ones; no other variants. (Its wgmma_rs PDL and self-reducing variants went with those "
    "options in session 37.)",
)  # fmt: skip
ap.add_argument(
    "--alt-configs", type=Path, default=Path("benchmarks/configs/h100_lane_m16.json"),
    help="--rs-ab: the other picks (default: the M = 16 linears on the lane kernel, the "
    "thirty-fifth session's; `h100_session36.json`: the thirty-sixth session's whole file)",
)  # fmt: skip
ap.add_argument(
    "--repeat", type=int, default=1,
    help="run the variant list this many times, every other round in reverse (A/B/B/A: the "
    "host of the lent machine drifts by several percent within a call, and a fixed order "
    "would hand the drift to the later variants); the later rounds are named name#1, name#2",
)  # fmt: skip
ap.add_argument(
    "--no-profile", action="store_true", help="step and forward times only (no profiler files)"
)
args = ap.parse_args()

config = AutoConfig.from_pretrained("benchmarks/configs/llama-3-8b")
config.num_hidden_layers = args.layers
torch.manual_seed(0)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
model.requires_grad_(False)
qconfig = qcompile.QuantConfig()
qcompile.quantize_(model, qconfig)
ids = torch.randint(0, config.vocab_size, (1, args.prompt), device="cuda")
results = {}

# every compiled decode call (transformers' get_compiled_call): host time and GPU time
calls: list[tuple[float, torch.cuda.Event, torch.cuda.Event]] = []
last_call: list = [None, (), {}]  # the compiled call, its last args and kwargs
real_compiled_call = model.get_compiled_call


def timed_compiled_call(compile_config):
    fn = real_compiled_call(compile_config)

    def call(*a, **kw):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        e0.record()
        out = fn(*a, **kw)
        e1.record()
        last_call[:] = [fn, a, kw]
        calls.append((time.perf_counter() - t0, e0, e1))
        return out

    return call


model.get_compiled_call = timed_compiled_call

variants = [("w4a16", "off"), ("w4a16+kv4", "token")]
if args.skip_module_guards:
    variants.append(("w4a16+kv4+noguard", "token"))
if args.pdl:
    variants += [("w4a16+pdl", "off"), ("w4a16+kv4+pdl", "token")]
if args.kv4_pdl:
    variants.append(("w4a16+kv4+kv4pdl", "token"))
if args.rs_ab:  # (alone: the shipped setting, PDL on, is the baseline)
    variants = [("w4a16+kv4+pdl", "token"), ("w4a16+kv4+pdl+alt", "token")]
tuner = autotuner(0)
shipped = dict(tuner.shipped)
alt = _read_entries(args.alt_configs, tuner.gpu, None) if args.rs_ab else {}
plain_attention = model.config._attn_implementation
runs = [
    (f"{v}#{r}" if r else v, v, kv4)
    for r in range(args.repeat)
    for v, kv4 in (variants if r % 2 == 0 else variants[::-1])
]
for name, variant, kv4 in runs:
    if kv4 != "off":
        enable_kv4_attention(model)
    else:  # (after a KV4 round of --repeat)
        model.set_attn_implementation(plain_attention)
    kv4_pdl = variant.endswith("+kv4pdl")
    pdl = variant.endswith(("+pdl", "+alt")) or kv4_pdl
    tuner.shipped = {**shipped, **alt} if variant.endswith("+alt") else dict(shipped)
    w4a16_lowering._LANE_PDL = pdl
    qcompile_backend._INDUCTOR_PDL = pdl  # (the backend's default for Inductor's enable_pdl)
    kv4_lowering._KV4_PDL = kv4_pdl
    torch._dynamo.reset()
    compile = compile_config(
        qcompile.backend(qconfig), "reduce-overhead", module_guards=not variant.endswith("noguard")
    )
    length = args.prompt + args.steps + 1 + 32  # room for the replays below (13 tokens)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                  pad_token_id=0, **_compile_kwargs(compile))  # fmt: skip

    # one cache, emptied before each generate(): a new one would record the decode step's
    # CUDA graphs again in its first call (15-42 ms in the thirtieth session's run)
    cache = generation_cache(model, kv4, length, True)

    def gen(n, cache=cache, inputs=inputs):
        cache.reset()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **cache_kwargs(cache))
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    gen(4)
    gen(4)
    t1 = gen(1)
    calls.clear()
    tn = gen(args.steps + 1)
    decode = calls[:]
    host_ms = [1e3 * h for h, _, _ in decode]
    gpu_ms = [e0.elapsed_time(e1) for _, e0, e1 in decode]
    step_ms = 1e3 * (tn - t1) / args.steps
    summary = dict(
        step_ms=step_ms, forward_host_ms=sorted(host_ms)[len(host_ms) // 2],
        forward_gpu_ms=sorted(gpu_ms)[len(gpu_ms) // 2], gpu_ms_all=gpu_ms[:8],
    )  # fmt: skip
    if args.no_profile:
        results[name] = summary
        print(name, json.dumps(results[name]), flush=True)
        continue
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        gen(9)
    table_gpu = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
    table_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    (args.out / f"profile_{name.replace('+', '_')}.txt").write_text(table_gpu + "\n\n" + table_cpu)
    # the last decode call replayed alone (same position: its cache writes repeat), so every
    # kernel the profiler sees is the decode step's
    fn, a, kw = last_call
    for _ in range(3):
        fn(*a, **kw)
    torch.cuda.synchronize()
    replays = 10
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            fn(*a, **kw)
        torch.cuda.synchronize()
    # the host's side of the same replays: guards, CUDA-graph bookkeeping, the launch
    host = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    (args.out / f"decode_host_{name.replace('+', '_')}.txt").write_text(host)
    kernels = [
        e
        for e in prof.key_averages()  # GPU-side events only (ops carry their kernels')
        if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0
    ]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    lines = [f"{'us/step':>9} {'calls/step':>10}  kernel"]
    lines += [f"{e.self_device_time_total / replays:9.1f} {e.count / replays:10.1f}  {e.key[:110]}"
              for e in kernels]  # fmt: skip
    kernel_us = sum(e.self_device_time_total for e in kernels) / replays
    lines.append(f"{kernel_us:9.1f}  total kernel time per decode step")
    (args.out / f"decode_kernels_{name.replace('+', '_')}.txt").write_text("\n".join(lines))
    results[name] = dict(summary, decode_kernel_ms=kernel_us / 1e3)
    print(name, json.dumps(results[name]), flush=True)
(args.out / "e2e_long.json").write_text(json.dumps(results, indent=1))
