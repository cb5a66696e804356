"""Launch the W4A8 large-M kernels once each (after a warm-up) for Nsight Compute: the SWAR
GEMM and the int_mm path's unpacking kernel at one shape, so `ncu` can say what bounds them
(L2 / DRAM throughput, issue stalls, tensor-core utilization).

    ncu --kernel-name regex:"w4a8|int_mm|gemm" --launch-skip 0 --launch-count 4 \
        --section SpeedOfLight python benchmarks/ncu_w4a8_swar.py --n 28672 --k 4096 --m 256
"""

from __future__ import annotations

import argparse

import torch
from weights import random_w4a8

from qcompile.lowering.autotune import KernelConfig
from qcompile.lowering.w4a8 import launch, quantize_per_token

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=28672)
ap.add_argument("--k", type=int, default=4096)
ap.add_argument("--m", type=int, default=256)
ap.add_argument("--configs", default="gemm_swar,256,64,128,1,4,3;gemm_swar,256,128,128,1,8,3")
args = ap.parse_args()
p = random_w4a8(args.n, args.k, 128)
x = torch.randn(args.m, args.k, dtype=torch.float16, device="cuda")
xq, xs = quantize_per_token(x, "int8", 0, 128)
for spec in args.configs.split(";"):
    kind, *vals = spec.split(",")
    cfg = KernelConfig(kind, *map(int, vals))
    for _ in range(2):  # the first call compiles
        launch(cfg, xq, xs, *p.tensors(), None, 128, torch.float16, xq_even_odd=True)
    torch.cuda.synchronize()
