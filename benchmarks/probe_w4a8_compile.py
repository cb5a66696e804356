"""Compile and run a few W4A8 configs at M=16 on this GPU, printing each failure's cause
(the tuner keeps only the first failure; Triton versions differ in what they accept)."""

import sys

import torch

sys.path.insert(0, "benchmarks")
from weights import random_w4a8  # noqa: E402

from qcompile.lowering import w4a8 as L  # noqa: E402
from qcompile.lowering.autotune import KernelConfig  # noqa: E402

dev = "cuda" if torch.cuda.is_available() else "cpu"
p = random_w4a8(256, 512, 128, device=dev)
x = torch.randn(16, 512, device=dev, dtype=torch.float16)
for cfg in [
    KernelConfig("gemm", 16, 64, 64, 1, 4, 3),
    KernelConfig("gemm", 64, 64, 64, 1, 4, 3),
    KernelConfig("gemm", 16, 64, 64, 2, 4, 3),
    KernelConfig("gemm_planes", 16, 64, 256, 1, 4, 2),
    KernelConfig("gemv", 1, 256, 64, 1, 2, 1),
]:
    try:
        L.quantize_and_launch(cfg, x, *p.tensors(), None, 128, "int8")
        if dev == "cuda":
            torch.cuda.synchronize()
        print(cfg, "ok", flush=True)
    except Exception as e:  # noqa: BLE001
        print(cfg, "FAIL", type(e).__name__, str(e)[-1800:], flush=True)
