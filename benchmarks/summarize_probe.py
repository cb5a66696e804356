"""Markdown table of a `probe_w4a8_swar.py` JSON: per (N x K, M), the reference times and the
fastest exact config, with its ratio to cuBLAS fp16 (and to `_scaled_mm` / W4A16 when the
probe timed them), so a probe's result goes into docs and notes without hand copying.

    python benchmarks/summarize_probe.py results/session19/probe_w4a8_swar_fp8.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _config(pair: dict) -> str:
    c = pair["config"]
    keys = ("block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages", "prefetch")
    names = ("BM", "BN", "BK", "split", "w", "s", "pf")
    tile = " ".join(f"{nm}{int(c[key])}" for key, nm in zip(keys, names, strict=True) if key in c)
    text = f"{c['kernel']} {tile}"
    if pair.get("self_reduce") is not None:  # the lane kernel's split-K reduction
        mode = "epilogue kernel"
        if pair["self_reduce"]:
            mode = "one launch, atomics" if pair["self_reduce"] == "atomic" else "one launch"
        unroll = pair.get("reduce_unroll", 1)
        text += f" ({mode}{f', unroll {unroll}' if unroll > 1 else ''})"
    return text


def table(data: dict) -> str:
    """The markdown table (header, one row per probed point)."""
    refs = [("cublas_us", "cuBLAS fp16"), ("int_mm_us", "`_int_mm`"),
            ("scaled_mm_us", "`_scaled_mm` fp8"), ("w4a16_us", "W4A16")]  # fmt: skip
    rows = data["rows"]
    present = [(k, name) for k, name in refs if any(k in r for r in rows)]
    head = ["N x K", "M", *(name for _, name in present), "best exact config", "us", "vs cuBLAS"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * 2 + "---:|" * len(present) + "---|---:|---:|",
    ]
    for r in rows:
        ok = [p for p in r["pairs"] if "us" in p and p.get("exact", True)]
        best = min(ok, key=lambda p: p["us"]) if ok else None
        cells = [f"{r['n']}x{r['k']}", str(r["m"])]
        cells += [f"{r[k]:.1f}" if k in r else "" for k, _ in present]
        if best is None:
            failed = [
                p.get("error", "inexact")
                for p in r["pairs"]
                if "us" not in p or not p.get("exact", True)
            ]
            cells += [f"none ({len(failed)} failed or inexact)", "", ""]
        else:
            cells += [
                _config(best),
                f"{best['us']:.1f}",
                f"{r['cublas_us'] / best['us']:.2f}x",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    meta = data.get("meta", {})
    device = ", ".join(f"{k} {meta[k]}" for k in ("device", "torch", "triton") if k in meta)
    return (f"{device}; microseconds\n\n" if device else "") + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path, nargs="+")
    for path in ap.parse_args().json:
        print(f"### {path}\n\n{table(json.loads(path.read_text()))}\n")


if __name__ == "__main__":
    main()
