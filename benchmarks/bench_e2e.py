"""End-to-end decode speed of a Llama-3-8B-shaped model: bf16 eager vs Inductor vs qcompile W4A16.

One process, one model with random weights (speed does not depend on their values), built
directly in bf16 (--dtype) on the GPU. Side by side, in this order (the last quantizes in place):
  eager           the transformers model, no compile
  inductor        torch.compile(mode="reduce-overhead"): Inductor + CUDA graphs
  qcompile_w4a16  quantize_ (RTN, g128, lm_head kept 16-bit unless --lm-head) frees the 16-bit
                  linears, then torch.compile(backend=qcompile, mode="reduce-overhead")
Per batch size: a static KV cache, a random 128-token prompt, prefill run eagerly (as in
transformers' generate, which compiles the decode step only) and timed separately, then
greedy decode with one compiled call per step (forward + argmax). Decode tok/s counts decode
steps only, timed with CUDA events around the loop. The numbers are for the number of layers
run (--layers); nothing is extrapolated to 32 layers.

Time: each compiled variant compiles one graph per batch size (batch 16 recompiles with a
dynamic batch dimension); qcompile also tunes its kernels on first use of each (M bucket, N, K)
(h100.json ships float16 configs only; QCOMPILE_AUTOTUNE=0 uses defaults instead). Results
are written after every row, so a run cut off by a time limit keeps what it measured.

    python benchmarks/bench_e2e.py --out benchmarks/results              # on the H100, 32 layers
    python benchmarks/bench_e2e.py --layers 8 --out benchmarks/results   # within a 10-min limit
    python benchmarks/bench_e2e.py --tiny --out /tmp/e2e                 # CPU smoke run, same code
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import time
from collections.abc import Callable
from pathlib import Path

import torch

import qcompile
from qcompile import QuantConfig

VARIANTS = ("eager", "inductor", "qcompile_w4a16")
WARMUP_STEPS = 3  # compile, CUDA-graph warm-up run, recording
PROFILE_STEPS = 5  # --profile: steps replayed under torch.profiler (the cache grows by one each)


def model_config(layers: int, tiny: bool):
    """Llama-3-8B's shapes (or a tiny model of the same family for a CPU run)."""
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(
            vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        )  # fmt: skip
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )  # fmt: skip


def build_model(config, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """Random weights allocated directly in `dtype` on `device` (no fp32 copy on the host)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers, each storage counted once (tied weights)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def decode_step(model, token: torch.Tensor, cache, position: torch.Tensor):
    """One greedy decode step: token [B, 1] at `position` [1] -> (next token [B, 1], logits)."""
    logits = model(
        input_ids=token, past_key_values=cache, cache_position=position, use_cache=True
    ).logits[:, -1]
    return logits.argmax(-1, keepdim=True), logits


def prefill(model, ids: torch.Tensor, cache):
    """The prompt through the model (eagerly), filling the cache; returns the first new token."""
    position = torch.arange(ids.shape[1], device=ids.device)
    logits = model(
        input_ids=ids, past_key_values=cache, cache_position=position, logits_to_keep=1
    ).logits[:, -1]
    return logits.argmax(-1, keepdim=True)


def new_cache(model, max_len: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


class Clock:
    """Milliseconds of GPU work between start() and stop() (CUDA events), or wall time on CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.begin, self.end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            self.begin.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            return self.begin.elapsed_time(self.end)
        return (time.perf_counter() - self.t0) * 1e3


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bench_batch(model, step: Callable, batch: int, args: argparse.Namespace, device: str) -> dict:
    """Prefill, warm-up, then `args.new_tokens` timed decode steps at one batch size."""
    clock = Clock(device)
    max_len = args.prompt + 1 + WARMUP_STEPS + args.new_tokens + PROFILE_STEPS * args.profile
    gen = torch.Generator().manual_seed(batch)  # the same prompt for every variant
    ids = torch.randint(0, model.config.vocab_size, (batch, args.prompt), generator=gen)
    ids = ids.to(device)
    pos = args.prompt
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        # First prefill: allocation and kernel tuning; then the uncompiled decode step on that
        # cache (the cache counts its own writes, so each step needs a cache in the same state).
        reference_cache = new_cache(model, max_len)
        token = prefill(model, ids, reference_cache)
        _, eager_logits = decode_step(
            model, token, reference_cache, torch.tensor([pos], device=device)
        )
        del reference_cache
        cache = new_cache(model, max_len)
        clock.start()
        token = prefill(model, ids, cache)
        prefill_ms = clock.stop()
        t0 = time.perf_counter()
        step_s = []  # compile, CUDA-graph warm-up run, recording
        for i in range(WARMUP_STEPS):
            t_step = time.perf_counter()
            torch.compiler.cudagraph_mark_step_begin()
            profiler = cProfile.Profile() if args.profile_compile and i == 0 else None
            if profiler is not None:
                profiler.enable()
            next_token, logits = step(model, token, cache, torch.tensor([pos + i], device=device))
            if profiler is not None:
                profiler.disable()
                save_compile_profile(profiler, args.out / f"compile_profile_b{batch}.txt")
            if i == 0:  # same cache state and token as the eager step: the compiled graph's error
                first_step_err = rel_err(logits.float(), eager_logits.float())
            token = next_token.clone()
            sync(device)
            step_s.append(time.perf_counter() - t_step)
        warmup_s = time.perf_counter() - t0
        positions = [
            torch.tensor([pos + WARMUP_STEPS + i], device=device) for i in range(args.new_tokens)
        ]
        tokens = []
        clock.start()
        for position in positions:
            torch.compiler.cudagraph_mark_step_begin()
            token = step(model, token, cache, position)[0].clone()
            tokens.append(token)
        decode_ms = clock.stop()
    step_ms = decode_ms / args.new_tokens
    profile = (
        profile_steps(step, model, token, cache, positions[-1], args) if args.profile else None
    )
    return {
        "batch": batch,
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "prefill_ms": prefill_ms,
        "prefill_tok_s": batch * args.prompt / (prefill_ms / 1e3),
        "decode_ms_per_step": step_ms,
        "decode_tok_s": batch / (step_ms / 1e3),
        "compile_warmup_s": warmup_s,
        "warmup_step_s": step_s,
        "dynamo_compile_times": _compile_times(),
        "first_step_rel_err_vs_eager": first_step_err,
        "peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "tokens_head": torch.cat(tokens[:8], dim=1)[0].tolist(),
        **({"profile_us_per_step": profile} if profile else {}),
    }


def save_compile_profile(profiler: cProfile.Profile, path: Path) -> None:
    """The compile step's Python profile: the top functions by cumulative and by own time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(80)
    stats.sort_stats("tottime").print_stats(40)
    path.write_text(text.getvalue())


def _compile_times() -> dict[str, float]:
    """Seconds per compile phase so far in this process (Dynamo's own counters, summed)."""
    try:
        names, values = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
        return {n: float(v) for n, v in zip(names, values, strict=True)}
    except Exception:  # a private API: its absence must not cost the run
        return {}


def kernel_kind(name: str) -> str:
    """A coarse class of a CUDA kernel's name, for the per-step time split."""
    name = name.lower()
    for kind, marks in (
        ("qcompile_w4a16", ("w4a16",)),
        ("qcompile_other", ("w4a8", "kv4")),
        ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
        ("cublas_gemm", ("gemm", "cutlass", "sm90", "nvjet", "gemv")),
        ("inductor_triton", ("triton",)),
    ):
        if any(m in name for m in marks):
            return kind
    return "other"


def profile_steps(
    step: Callable, model, token, cache, position, args, steps: int = PROFILE_STEPS
) -> dict:
    """GPU time per decode step by kernel kind and the top kernels, from torch.profiler over
    `steps` replays (the cache position stays put: the timing does not depend on it)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            torch.compiler.cudagraph_mark_step_begin()
            step(model, token, cache, position)
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels.setdefault(ev.name, [0.0, 0])
            entry[0] += ev.time_range.elapsed_us() / steps
            entry[1] += 1 / steps
    by_kind: dict[str, float] = {}
    for name, (us, _) in kernels.items():
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + us
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
    return {
        "total_us": sum(by_kind.values()),
        "by_kind_us": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "top": [
            {"kernel": n[:120], "us": round(us, 2), "calls": round(c, 1)} for n, (us, c) in top
        ],
    }


def cleanup(device: str) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run(args: argparse.Namespace, save: Callable[[dict], None]) -> dict:
    """Every variant at every batch size; `save(result)` after each row (a timeout keeps them)."""
    from torch._dynamo.utils import counters

    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else getattr(torch, args.dtype)
    mode = None if args.tiny else "reduce-overhead"  # CUDA graphs need CUDA
    batches = [int(b) for b in args.batches.split(",")]
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or ("qcompile_w4a16" in variants and variants[-1] != "qcompile_w4a16"):
        raise SystemExit(
            f"--variants: some of {VARIANTS}, qcompile_w4a16 last (it quantizes in place)"
        )
    config = model_config(args.layers, args.tiny)
    t0 = time.perf_counter()
    model = build_model(config, dtype, device)
    meta = run_meta(args, config, device, dtype, mode, build_s=time.perf_counter() - t0)
    print(json.dumps(meta), flush=True)
    qconfig = QuantConfig(skip=() if args.lm_head else QuantConfig().skip)
    rows: list[dict] = []
    result = {"meta": meta, "rows": rows}
    for variant in variants:
        extra: dict = {}
        cleanup(device)
        counters.clear()
        if variant == "eager":
            step = decode_step
        elif variant == "inductor":
            step = torch.compile(decode_step, mode=mode, fullgraph=True)
        elif variant == "qcompile_w4a16":
            sync(device)
            t0 = time.perf_counter()
            report = qcompile.quantize_(model, qconfig)
            sync(device)
            extra["quantize_s"] = time.perf_counter() - t0
            extra["quantize_report"] = report.summary()
            cleanup(device)  # the freed 16-bit weights leave the caching allocator
            backend = qcompile.backend(qconfig)
            step = torch.compile(decode_step, backend=backend, mode=mode, fullgraph=True)
        for batch in batches:
            row = {"variant": variant, "weight_bytes": weight_bytes(model), **extra}
            row.update(bench_batch(model, step, batch, args, device))
            row["graphs_so_far"] = counters["stats"]["unique_graphs"]
            row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
            if variant == "qcompile_w4a16":
                row["qcompile_pass_s_so_far"] = backend.report.pass_seconds
                row["compile_report"] = backend.report.summary()
            rows.append(row)
            print(json.dumps(row), flush=True)
            save(result)
        del step
    return result


def run_meta(args, config, device, dtype, mode, build_s: float) -> dict:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton_version,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "dtype": str(dtype).removeprefix("torch."), "mode": mode, "tiny": args.tiny,
        "layers": config.num_hidden_layers, "hidden": config.hidden_size,
        "intermediate": config.intermediate_size, "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads, "vocab": config.vocab_size,
        "lm_head_quantized": args.lm_head, "build_s": build_s,
        "qcompile_autotune": os.environ.get("QCOMPILE_AUTOTUNE", "1"),
        "inductor_config": json.loads(args.inductor_config), "gc_threshold": list(gc.get_threshold()),
    }  # fmt: skip


def apply_compile_settings(args: argparse.Namespace) -> None:
    """--inductor-config and --gc-threshold, applied before anything compiles."""
    import torch._inductor.config as inductor_config

    for name, value in json.loads(args.inductor_config).items():
        *path, attr = name.split(".")
        target = inductor_config
        for part in path:
            target = getattr(target, part)
        if not hasattr(target, attr):
            raise SystemExit(f"--inductor-config: torch._inductor.config has no {name!r}")
        setattr(target, attr, value)
    if args.gc_threshold:
        gc.set_threshold(*(int(v) for v in args.gc_threshold.split(":")))


def markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    base = {r["batch"]: r["decode_tok_s"] for r in rows if r["variant"] == "eager"}
    ind = {r["batch"]: r["decode_tok_s"] for r in rows if r["variant"] == "inductor"}
    gib = 1024**3
    lines = [
        "# End-to-end decode: Llama-3-8B shapes, static cache",
        "",
        f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, "
        f"transformers {meta['transformers']}. **{meta['layers']} layers** (hidden {meta['hidden']}, "
        f"intermediate {meta['intermediate']}, {meta['heads']} heads / {meta['kv_heads']} KV, vocab "
        f"{meta['vocab']}), random weights, {meta['dtype']}, mode={meta['mode']}; lm_head "
        f"{'int4' if meta['lm_head_quantized'] else meta['dtype']}. Not extrapolated to other "
        "layer counts.",
        "",
        f"Prompt {rows[0]['prompt']} tokens, prefill eager and timed apart; decode: "
        f"{rows[0]['new_tokens']} greedy steps after {WARMUP_STEPS} warm-up steps, one compiled "
        "call per step, CUDA events around the loop.",
        "",
        "| variant | batch | decode tok/s | ms/step | vs eager | vs Inductor | prefill ms | "
        "weights GiB | peak GiB | compile+warm-up s | 1st-step err vs eager |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        b = r["batch"]
        vs_eager = f"{r['decode_tok_s'] / base[b]:.2f}x" if b in base else "n/a"
        vs_ind = f"{r['decode_tok_s'] / ind[b]:.2f}x" if b in ind else "n/a"
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / gib:.2f}"
        lines.append(
            f"| {r['variant']} | {b} | {r['decode_tok_s']:.1f} | {r['decode_ms_per_step']:.2f} | "
            f"{vs_eager} | {vs_ind} | {r['prefill_ms']:.1f} | {r['weight_bytes'] / gib:.2f} | "
            f"{peak} | {r['compile_warmup_s']:.1f} | {r['first_step_rel_err_vs_eager']:.1e} |"
        )
    profiled = [r for r in rows if "profile_us_per_step" in r]
    if profiled:
        kinds = sorted({k for r in profiled for k in r["profile_us_per_step"]["by_kind_us"]})
        lines += [
            "",
            "GPU time per decode step by kernel kind (torch.profiler over CUDA-graph replays, us):",
            "",
            "| variant | batch | " + " | ".join(kinds) + " | total |",
            "|---|---:|" + "---:|" * (len(kinds) + 1),
        ]
        for r in profiled:
            prof = r["profile_us_per_step"]
            cells = [f"{prof['by_kind_us'].get(k, 0.0):.0f}" for k in kinds]
            lines.append(
                f"| {r['variant']} | {r['batch']} | "
                + " | ".join(cells)
                + f" | {prof['total_us']:.0f} |"
            )
    notes = sorted(
        {f"{r['variant']}: {r['quantize_report']}" for r in rows if "quantize_report" in r}
    )
    skips = [r for r in rows if r["cudagraph_skips"]]
    lines += ["", *notes]
    if skips:
        lines.append(f"CUDA graphs were skipped in: {sorted({r['variant'] for r in skips})}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> bool:
    """Decode tok/s per variant and batch size, as grouped bars; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    batches = sorted({r["batch"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, len(batches), figsize=(4 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches, strict=True):
        sel = {r["variant"]: r["decode_tok_s"] for r in rows if r["batch"] == b}
        ax.bar(
            variants, [sel.get(v, 0.0) for v in variants], color=["grey", "tab:blue", "tab:green"]
        )
        ax.set_title(f"batch {b}")
        ax.set_ylabel("decode tokens/s")
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(f"{result['meta']['layers']}-layer Llama-3-8B shapes, {result['meta']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (8B has 32)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=128, help="timed decode steps")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--lm-head", action="store_true", help="quantize lm_head too (off by default)")
    ap.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="model dtype (GPU)"
    )
    ap.add_argument(
        "--profile", action="store_true", help="also split each step's GPU time by kernel (CUDA)"
    )
    ap.add_argument(
        "--profile-compile", action="store_true",
        help="cProfile the compile step (first warm-up step) into --out/compile_profile_b*.txt",
    )  # fmt: skip
    ap.add_argument(
        "--inductor-config", default="{}",
        help='JSON of torch._inductor.config attributes set for the whole run, e.g. '
        '\'{"triton.autotune_pointwise": false}\' (compile-time experiments)',
    )  # fmt: skip
    ap.add_argument(
        "--gc-threshold", default=None,
        help="gc.set_threshold(a, b, c) for the run, as a:b:c (compile-time experiments)",
    )  # fmt: skip
    ap.add_argument("--tiny", action="store_true", help="tiny model, fp32 on CPU: a smoke run")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("bench_e2e.py needs a CUDA GPU; use --tiny for a CPU smoke run")
    args.out.mkdir(parents=True, exist_ok=True)
    apply_compile_settings(args)

    def save(result: dict) -> None:
        (args.out / "e2e.json").write_text(json.dumps(result, indent=1))
        (args.out / "e2e.md").write_text(markdown(result))

    result = run(args, save)
    plot(result, args.out / "e2e_decode.png")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
