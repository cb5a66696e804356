"""Probe (GPU): which SWAR W4A8 GEMM tiles sum exactly. Session 42 found BLOCK_N = 16 with
K tiles of two groups of 128 wrong on the H100 (Triton 3.6); every other tile was exact, so
`valid_config` refuses BLOCK_N < 32 for "gemm_swar".

    python benchmarks/probe_swar_tiles.py     # one line per (shape, tile): ok / WRONG
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import conftest  # noqa: E402, F401  (the tests' environment: interpreter off with a GPU)
import test_w4a8  # noqa: E402
from strategies import W4A8Problem  # noqa: E402

from qcompile import Scheme  # noqa: E402
from qcompile.lowering.w4a8 import KernelConfig  # noqa: E402
from qcompile.quant.w4a8 import PackedW4A8, quantize_weight_w4a8  # noqa: E402

SHAPES = ((1, 16, 256, 128), (17, 64, 256, 128), (1, 64, 512, 128), (5, 72, 256, 64))


def main() -> None:
    for m, n, k, g in SHAPES:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(n, k, generator=gen)
        x = torch.randn(m, k, generator=gen)
        p = quantize_weight_w4a8(w, Scheme(name="w4a8", group_size=g))
        p = PackedW4A8(*(t.cuda() for t in p.tensors()), p.group_size)
        problem = W4A8Problem(x.half().cuda(), w, p, None, torch.float16, "int8")
        for bk in (64, 128, 256):
            for bn in (16, 32, 64):
                for sk in (1, 2):
                    if (k // sk) % bk:
                        continue
                    cfg = KernelConfig("gemm_swar", 16, bn, bk, sk, 4, 2, False)
                    try:
                        test_w4a8._check_config(problem, cfg)
                        result = "ok"
                    except AssertionError:
                        result = "WRONG"
                    except ValueError:  # refused by `valid_config` (BLOCK_N 16 since then)
                        result = "refused"
                    print(f"m{m} n{n} k{k} g{g} bk{bk} bn{bn} sk{sk}: {result}", flush=True)


if __name__ == "__main__":
    main()
