"""Do the tuner's two timing methods pick the config that is fastest in a CUDA graph?

For a few M=1 / M=16 shapes: every candidate timed by `time_us` (graph + L2 flush) and by
do_bench; the picks of each then re-timed as the benchmark times them (graph over rotating
weight copies). Prints one JSON line per shape; writes $OUT/probe_tune_timing.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).parent))
from bench_w4a16 import copies, time_graph  # noqa: E402
from weights import random_packed  # noqa: E402

from qcompile.lowering.autotune import time_us  # noqa: E402
from qcompile.lowering.w4a16 import candidate_configs, launch  # noqa: E402

SHAPES = [(1024, 4096, 1), (4096, 4096, 1), (14336, 4096, 1), (4096, 14336, 1), (6144, 4096, 1),
          (28672, 4096, 1), (4096, 4096, 16), (28672, 4096, 16)]  # fmt: skip


def main() -> None:
    out = Path(os.environ.get("OUT", "/tmp"))
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    for n, k, m in SHAPES:
        t0 = time.time()
        dtype = torch.bfloat16
        p = random_packed(n, k, 128, dtype)
        w = (p.qweight, p.scales, p.offsets)
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        cands = candidate_configs(m, n, k, 128)
        graph_t, bench_t = {}, {}
        for c in cands:
            try:
                fn = lambda c=c, x=x, w=w: launch(c, x, *w, None, 128)  # noqa: E731
                graph_t[c] = time_us(fn)
                bench_t[c] = 1000 * do_bench(fn, warmup=2, rep=10, return_mode="median")
            except Exception as err:  # noqa: BLE001
                print("fail", c, repr(err)[:200], flush=True)
        nbytes = w[0].numel() * 4 + w[1].numel() * 4
        r = copies(nbytes, l2)
        ws = [w] + [tuple(t.clone() for t in w) for _ in range(r - 1)]
        ref = {}
        top_g = sorted(graph_t, key=graph_t.get)[:3]
        top_b = sorted(bench_t, key=bench_t.get)[:3]
        for c in dict.fromkeys(top_g + top_b):
            ref[c] = time_graph([lambda c=c, x=x, ww=ww: launch(c, x, *ww, None, 128) for ww in ws])
        row = {
            "n": n, "k": k, "m": m, "candidates": len(cands), "seconds": round(time.time() - t0, 1),
            "floor_us": nbytes / 3.0e6,
            "graph_pick": [str(top_g[0]), graph_t[top_g[0]], ref[top_g[0]]],
            "do_bench_pick": [str(top_b[0]), bench_t[top_b[0]], ref[top_b[0]]],
            "best_ref": min(ref.values()),
            "ref_top": sorted([(round(v, 2), str(c)) for c, v in ref.items()])[:6],
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "probe_tune_timing.json").write_text(json.dumps(rows, indent=1))
        del ws


if __name__ == "__main__":
    main()
