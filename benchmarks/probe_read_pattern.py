"""GPU probe: how fast the H100 streams a packed int4 weight [K / 8, N] (int32 words) in the
tile shapes the M = 1 lane kernel reads, with no arithmetic in the way.

Why: at M = 1 the W4A16 GEMV runs 28672x4096 at 79% of the int4 floor and 8192x28672 at 88%
(`results/session42/h100/all/`). The first reads rows of 128 columns (512-byte segments,
114 KB apart), the second rows of 256 (1 KB, 32 KB apart). If DRAM streams short strided
segments slower, a tiled weight layout is the lever; if every tile shape streams at the same
rate, the loss is in the kernel. Each program sums a [rows, cols] tile of words (one split of
K for one column block), 16-byte loads per thread as the lane kernel issues them; times are
CUDA-graph replays over copies rotated past L2, reported as TB/s of words read.

    python benchmarks/probe_read_pattern.py --out $OUT/read_pattern.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl
from bench_w4a16 import copies, hbm_bandwidth, time_graph

WARPS = 4  # (the lane kernel's M = 1 picks: 4 warps a program)


@triton.jit
def _read_tiles(w_ptr, out_ptr, N, rows_per_split, COLS: tl.constexpr, ROWS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * COLS + tl.arange(0, COLS)
    acc = tl.zeros((ROWS, COLS), dtype=tl.int32)
    r0 = pid_k * rows_per_split
    for r in range(r0, r0 + rows_per_split, ROWS):
        acc ^= tl.load(w_ptr + (r + tl.arange(0, ROWS))[:, None] * N + cols[None, :])
    tl.store(out_ptr + pid_k * N + cols, tl.reduce(acc, 0, _xor))


@triton.jit
def _xor(a, b):
    return a ^ b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="28672x4096,8192x28672")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    bw = hbm_bandwidth()
    rows = []
    for spec in args.shapes.split(","):
        n, k = map(int, spec.split("x"))
        words = k // 8
        r = copies(4 * words * n, l2)
        ws = [torch.randint(-(2**31), 2**31 - 1, (words, n), dtype=torch.int32, device="cuda")
              for _ in range(r)]  # fmt: skip
        nbytes = 4 * words * n
        row = {"n": n, "k": k, "copy_tb_s": bw / 1e12}
        row["torch_sum_us"] = time_graph([lambda w=w: w.sum(dtype=torch.int64) for w in ws])
        for cols in (64, 128, 256, 512):
            for split in (1, 2, 4, 8, 16):
                per = words // split
                for rows_ in (4, 16):
                    if per % rows_ or per < rows_:
                        continue
                    out = torch.empty(split, n, dtype=torch.int32, device="cuda")
                    grid = (n // cols, split)
                    us = time_graph(
                        [
                            lambda w=w, o=out, c=cols, p=per, rr=rows_, g=grid, n=n: _read_tiles[g](
                                w, o, n, p, COLS=c, ROWS=rr, num_warps=WARPS
                            )
                            for w in ws
                        ]
                    )
                    row[f"c{cols}_s{split}_r{rows_}_w{WARPS}_us"] = us
        best = min(
            (v, key) for key, v in row.items() if key.startswith("c") and key.endswith("_us")
        )
        row["best"] = {"key": best[1], "us": best[0], "tb_s": nbytes / best[0] / 1e6}
        for cols in (64, 128, 256, 512):
            mine = [v for key, v in row.items() if key.startswith(f"c{cols}_")]
            row[f"best_c{cols}_tb_s"] = nbytes / min(mine) / 1e6
        row["torch_sum_tb_s"] = nbytes / row["torch_sum_us"] / 1e6
        rows.append(row)
        print(
            f"N={n} K={k}: torch sum {row['torch_sum_tb_s']:.2f} TB/s; best per segment "
            + ", ".join(f"{4 * c} B {row[f'best_c{c}_tb_s']:.2f}" for c in (64, 128, 256, 512))
            + f" TB/s; best {row['best']}; copy {row['copy_tb_s']:.2f}",
            flush=True,
        )
    if args.out:
        args.out.write_text(
            json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
