"""Launch the KV4 decode kernel a few times at one shape for Nsight Compute, with the config
the op would run (shipped or untuned default), so `ncu` can say what bounds it: issue-slot
use, warp stall reasons, DRAM and L2 throughput, shared-memory traffic.

    ncu --kernel-name regex:kv4_decode --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
        python benchmarks/ncu_kv4_decode.py --b 16 --s 32768
"""

from __future__ import annotations

import argparse

import torch
from bench_kv4 import random_kv4

from qcompile.lowering.autotune import autotuner
from qcompile.lowering.kv4_attention import default_config, launch_attention, tune_key

ap = argparse.ArgumentParser()
ap.add_argument("--b", type=int, default=16)
ap.add_argument("--s", type=int, default=32768)
ap.add_argument("--launches", type=int, default=4)
args = ap.parse_args()
hq, hkv, d = 32, 8, 128
keys, values = random_kv4(args.b, hkv, args.s, d, d)
q = torch.randn(args.b, hq, 1, d, dtype=torch.float16, device="cuda")
key = tune_key(q, keys.codes, values.scales)
cfg = autotuner(0).lookup(key) or default_config(args.b, hkv, 1, hq // hkv, args.s)
print(f"B={args.b} S={args.s}: {cfg}", flush=True)
args_ = (q, keys.codes, keys.scales, keys.offsets, values.codes, values.scales, values.offsets)
for _ in range(args.launches):  # the first compiles
    launch_attention(cfg, *args_, None, None, False, d**-0.5)
torch.cuda.synchronize()
