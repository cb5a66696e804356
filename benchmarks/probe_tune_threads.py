"""How long first-use tuning takes with the candidates compiled on N threads
(`QCOMPILE_TUNE_THREADS`) against one: each run in a fresh process with empty qcompile and
Triton caches, so every candidate compiles. Writes tune_threads.json and .md under --out.

    python benchmarks/probe_tune_threads.py --threads 1,8,16 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# one tuning run: the op's first call on a shape no cache holds
CHILD = r"""
import json, sys, time, torch
from qcompile.lowering import autotune
case = sys.argv[1]
gen = torch.Generator().manual_seed(0)
if case.startswith("w4a16"):
    from qcompile.config import Scheme
    from qcompile.quant.rtn import quantize_weight_int4
    _, m, n, k = case.split(":")
    p = quantize_weight_int4(torch.randn(int(n), int(k), generator=gen), Scheme(group_size=128),
                             torch.float16)
    args = [torch.randn(int(m), int(k)).half().cuda(), p.qweight.cuda(), p.scales.cuda(),
            p.offsets.cuda(), None, 128]
    op = lambda: torch.ops.qcompile.w4a16_linear(*args)
else:
    from qcompile.quant.kv4 import KVScheme, quantize_kv4
    _, b, s = case.split(":")
    kv = [t.cuda() for p in (quantize_kv4(torch.randn(int(b), 8, int(s), 128, generator=gen),
                                          KVScheme()) for _ in "kv")
          for t in (p.codes, p.scales, p.offsets)]
    q = torch.randn(int(b), 32, 1, 128).half().cuda()
    op = lambda: torch.ops.qcompile.kv4_attention(q, *kv, None, None, False, 128**-0.5)
autotune.autotuner(0).shipped = {}  # the shipped H100 configs cover these keys: tune anyway
torch.cuda.synchronize()
t0 = time.perf_counter()
op()
torch.cuda.synchronize()
wall = time.perf_counter() - t0
(trials,) = autotune.autotuner(0).trials.values()
print(json.dumps({"wall_s": wall, "candidates": len(trials), "best_us": trials[0][0],
                  "best": str(trials[0][1])}))
"""

ap = argparse.ArgumentParser()
ap.add_argument("--threads", default="1,8,16")
ap.add_argument("--cases", default="w4a16:16:28672:4096,kv4:16:8192")
ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
args = ap.parse_args()
args.out.mkdir(parents=True, exist_ok=True)
rows = []
for case in args.cases.split(","):
    for threads in args.threads.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, QCOMPILE_TUNE_THREADS=threads, QCOMPILE_AUTOTUNE="1",
                       QCOMPILE_CACHE_DIR=f"{tmp}/q", TRITON_CACHE_DIR=f"{tmp}/t")  # fmt: skip
            run = subprocess.run([sys.executable, "-c", CHILD, case], env=env,
                                 capture_output=True, text=True, timeout=900)  # fmt: skip
        if run.returncode:
            print(case, threads, "failed:", run.stderr[-2000:], flush=True)
            continue
        row = {"case": case, "threads": int(threads), **json.loads(run.stdout.splitlines()[-1])}
        rows.append(row)
        print(json.dumps(row), flush=True)
(args.out / "tune_threads.json").write_text(json.dumps(rows, indent=1))
lines = ["| case | threads | candidates | tuning wall (s) | best (us) | best config |",
         "|---|---:|---:|---:|---:|---|"]  # fmt: skip
lines += [f"| {r['case']} | {r['threads']} | {r['candidates']} | {r['wall_s']:.1f} | "
          f"{r['best_us']:.1f} | {r['best']} |" for r in rows]  # fmt: skip
(args.out / "tune_threads.md").write_text("\n".join(lines) + "\n")
