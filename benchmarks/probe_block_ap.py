"""Probe: block-wise reconstruction of W4A8's codes and s1 (EfficientQAT's Block-AP) after
rotated GPTQ, then the end-to-end s1 tuning of the accuracy table's best W4A8 row.

Each decoder block in turn: its W4A8 layers get a float code offset v per weight (init:
the GPTQ code, so the start is the GPTQ model exactly) rounded straight-through onto the
layer's fixed integer (s2, z) grid, and a per-channel factor r on s1; Adam minimizes the
MSE between the block's output on the quantized prefix's hidden states and the fp32
(rotated) block's output on the fp32 hidden states, over the calibration windows. The
codes and s1 are written back, and the next block sees this block's quantized output.

    python benchmarks/probe_block_ap.py --out DIR [--epochs 2 --lr-code 1e-2 --lr-scale 5e-4]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402  (the harness: model, text, windows)

from qcompile import QuantConfig, Scheme  # noqa: E402
from qcompile.eval import load_corpus, perplexity  # noqa: E402
from qcompile.quant.finetune import finetune_scales_, reconstruct_blocks_  # noqa: E402
from qcompile.quant.gptq import gptq_quantize_model  # noqa: E402
from qcompile.quant.rotate import rotate_model_  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr-code", type=float, default=1e-2)
    ap.add_argument("--lr-scale", type=float, default=5e-4)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--ft-steps", type=int, default=96)
    ap.add_argument(
        "--start", choices=("rot", "awq"), default="rot",
        help="rot: rotated GPTQ (seed 0); awq: AWQ + GPTQ + s1 search, unrotated",
    )  # fmt: skip
    ap.add_argument("--cache", type=Path, default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)

    def log(msg: str) -> None:
        print(msg, flush=True)
        with open(args.out / "log.txt", "a") as f:
            f.write(msg + "\n")

    log(f"args: {vars(args)}")
    tok, model = accuracy.load_smollm2()
    ids = torch.tensor(tok(load_corpus(accuracy.CORPUS))["input_ids"])
    scheme = Scheme(name="w4a8", group_size=128, pad_k=True)
    args.cache = args.cache or Path(f"/tmp/blockap_{args.start}.pt")
    rotated = copy.deepcopy(model)
    if args.start == "rot":
        rotate_model_(rotated)  # seed 0, as the table's row
    if args.cache.exists():
        m = torch.load(args.cache, weights_only=False)
        log(f"GPTQ model from {args.cache}")
    else:
        m = copy.deepcopy(rotated)
        gptq_quantize_model(
            m, accuracy.calibration_batches(tok), QuantConfig(scheme), act_order=True,
            clip_search=True, awq=args.start == "awq", channel_search=args.start == "awq",
        )  # fmt: skip
        torch.save(m, args.cache)
    results = {"args": {k: str(v) for k, v in vars(args).items()}}

    def ppl(label: str) -> None:
        p = perplexity(m, ids, window=512, windows=16, desc=label)
        results[label] = p
        log(f"{label}: ppl {p:.3f} ({100 * (p / accuracy.HARNESS_CHECK - 1):+.1f}% vs 14.36)")
        (args.out / "result.json").write_text(json.dumps(results, indent=1))

    ppl("gptq")
    cal = accuracy.calibration_batches(tok, count=args.windows)
    t = time.time()
    stats = reconstruct_blocks_(m, rotated, cal, args.epochs, args.lr_code, args.lr_scale)
    for i, st in enumerate(stats):
        log(
            f"block {i}: mse {st['mse_before']:.5f} -> {st['mse_after']:.5f}, "
            f"codes changed {100 * st['changed']:.2f}%"
        )
    log(f"block-ap: {time.time() - t:.0f} s")
    ppl("gptq+blockap")
    if args.ft_steps:
        finetune_scales_(m, model, cal, steps=args.ft_steps, lr=accuracy.FT_LR_W4A8)
        ppl("gptq+blockap+ft")


if __name__ == "__main__":
    main()
