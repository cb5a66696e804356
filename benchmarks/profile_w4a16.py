"""Launch one W4A16 config a few times so Nsight Compute can profile the last launch.

    ncu --clock-control none -k regex:w4a16 --launch-skip 2 --launch-count 1 \\
        python benchmarks/profile_w4a16.py 8192x28672 1                  # tuned config
    python benchmarks/profile_w4a16.py 8192x28672 16 gemm_planes,16,128,128,8,4,2,1
The config is kernel,block_m,block_n,block_k,split_k,num_warps,num_stages,prefetch; without
one, the autotuned config for the shape is used (tuning first if no cache has it).
"""

from __future__ import annotations

import sys

import torch
from weights import random_packed

from qcompile.lowering.autotune import KernelConfig, TuneKey, autotuner, m_bucket
from qcompile.lowering.w4a16 import launch, w4a16_linear_cuda

GROUP = 128


def main() -> None:
    n, k = map(int, sys.argv[1].split("x"))
    m = int(sys.argv[2])
    p = random_packed(n, k, GROUP, torch.float16)
    x = torch.randn(m, k, dtype=torch.float16, device="cuda")
    if len(sys.argv) > 3:
        f = sys.argv[3].split(",")
        cfg = KernelConfig(f[0], *map(int, f[1:7]), bool(int(f[7])))
    else:
        w4a16_linear_cuda(x, p.qweight, p.scales, p.offsets, None, GROUP)  # tunes if needed
        cfg = autotuner(0).lookup(TuneKey("w4a16", m_bucket(m), n, k, GROUP, "float16"))
    print(f"N={n} K={k} M={m} {cfg}", file=sys.stderr)
    for _ in range(3):
        launch(cfg, x, p.qweight, p.scales, p.offsets, None, GROUP)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
