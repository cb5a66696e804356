"""Tune the W4A16 (or W4A8) kernels for common shapes and write the shipped per-GPU config file.

Shapes: the kernel benchmark's N x K plus every Llama-3-8B linear (separate and fused
q/k/v and gate/up), for each M bucket a decode or prefill step can hit. The result is
`qcompile/lowering/configs/<gpu family>.json`, read before any tuning, so a user's first
compile on that GPU does not tune from scratch.

    python benchmarks/tune_shipped.py                  # on the GPU; rewrites configs/h100.json
    python benchmarks/tune_shipped.py --out $OUT/h100.json --ms 1,16
    python benchmarks/tune_shipped.py --out $OUT/d16.json --decode16 1,16 --seq 185 --ms ''
        # decode_attention (Llama-3-8B heads: 32 query / 8 KV, D=128) at those batches
    python benchmarks/tune_shipped.py --family w4a8 --out $OUT/w4a8.json --ms 256,1024
        # the W4A8 op (int8 activations, quantize kernel included), then --merge it in
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from weights import random_packed, random_w4a8

from qcompile.lowering import autotune
from qcompile.lowering.w4a16 import w4a16_linear_cuda

BENCH_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (8192, 28672)]
LLAMA3_8B_SHAPES = [(1024, 4096), (14336, 4096)]  # k/v proj; gate or up alone
M_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="default: the shipped file for this GPU")
    ap.add_argument("--ms", default=",".join(map(str, M_BUCKETS)))
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--family", default="w4a16", choices=("w4a16", "w4a8"))
    ap.add_argument(
        "--shapes", default=",".join(f"{n}x{k}" for n, k in BENCH_SHAPES + LLAMA3_8B_SHAPES),
        help="N x K list, e.g. 4096x4096,1024x4096",
    )  # fmt: skip
    ap.add_argument(
        "--merge", type=Path, default=None,
        help="no tuning: fold the entries of this file (an --out of an earlier run) into --out "
        "(default: the shipped file of the GPU it was tuned on), replacing entries with the "
        "same key",
    )  # fmt: skip
    ap.add_argument(
        "--decode16", default="",
        help="also tune decode_attention at these batch sizes (Llama-3-8B heads, one query)",
    )  # fmt: skip
    ap.add_argument("--seq", default="185,1024,4096", help="--decode16 cache lengths")
    ap.add_argument(
        "--kinds", default="",
        help="kernel kinds to add (e.g. mma): each key's candidates become its shipped "
        "config plus these kinds' candidates, timed side by side; for a new kernel kind "
        "without re-timing every old candidate",
    )  # fmt: skip
    args = ap.parse_args()
    # every candidate that fails (compile error, too much shared memory) on stderr: a tuning
    # run should show what it did not time
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("qcompile.autotune").addHandler(handler)
    logging.getLogger("qcompile.autotune").setLevel(logging.DEBUG)
    if args.merge is not None:
        # by default into the shipped file of the GPU the entries were tuned on
        gpu = json.loads(args.merge.read_text())["gpu"]
        out = args.out or autotune.SHIPPED_DIR / f"{autotune.shipped_config_name(gpu)}.json"
        print(merge(args.merge, out))
        return

    tuner = autotune.autotuner(0)
    gpu = tuner.gpu
    current: dict[str, str] = {}
    if args.kinds:
        _restrict_candidates(dict(tuner.shipped), set(args.kinds.split(",")), current, args.family)
    out = args.out or autotune.SHIPPED_DIR / f"{autotune.shipped_config_name(gpu)}.json"
    tuner.shipped = {}  # tune everything afresh: neither the old shipped file
    tuner.user = {}  # nor entries of the user cache (untimed) end up in the new file
    shapes = [tuple(map(int, spec.split("x"))) for spec in args.shapes.split(",")]
    t0 = time.time()
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        current["dtype"] = dtype_name
        for b in (int(v) for v in args.decode16.split(",") if v):
            for s in map(int, args.seq.split(",")):
                key = _tune_decode16(b, s, dtype)
                print(f"{time.time() - t0:7.1f}s {key} -> {tuner.lookup(key)}", flush=True)
                _write(out, gpu, tuner)
        for n, k in shapes if args.ms else ():
            if args.family == "w4a8":
                p = random_w4a8(n, k, args.group)
            else:
                p = random_packed(n, k, args.group, dtype)
            for m in map(int, args.ms.split(",")):
                x = torch.randn(m, k, dtype=dtype, device="cuda")
                key = _tune_linear(args.family, x, p, args.group)
                print(
                    f"{time.time() - t0:7.1f}s {key} -> {tuner.lookup(key)} ({tuner.timings.get(key, float('nan')):.1f} us)",
                    flush=True,
                )
                _write(out, gpu, tuner)  # after every key: a run cut short keeps what it tuned


def _tune_linear(family: str, x: torch.Tensor, p, group: int) -> autotune.TuneKey:
    """One call of the family's op on x (tuning its key on a miss); returns the key."""
    m, k = x.shape
    n = p.qweight.shape[1]
    if family == "w4a8":
        from qcompile.lowering.w4a8 import tune_key, w4a8_linear_cuda

        w4a8_linear_cuda(x, *p.tensors(), None, group, "int8")
        return tune_key(m, n, k, group, "int8", x.dtype)
    w4a16_linear_cuda(x, p.qweight, p.scales, p.offsets, None, group)
    dtype = str(x.dtype).removeprefix("torch.")
    return autotune.TuneKey("w4a16", autotune.m_bucket(m), n, k, group, dtype)


def _restrict_candidates(shipped: dict, kinds: set[str], current: dict, family: str) -> None:
    """Candidates of a key = its shipped config (if any) + those of `kinds`."""
    from qcompile.lowering import w4a8, w4a16

    module = w4a8 if family == "w4a8" else w4a16
    everything = module.candidate_configs

    def restricted(m: int, n: int, k: int, g: int, *act: str) -> list:
        if family == "w4a8":
            key = w4a8.tune_key(m, n, k, g, act[0], getattr(torch, current["dtype"]))
        else:
            key = autotune.TuneKey("w4a16", autotune.m_bucket(m), n, k, g, current["dtype"])
        old = [shipped[key]] if key in shipped else []
        return old + [c for c in everything(m, n, k, g, *act) if c.kernel in kinds]

    module.candidate_configs = restricted


def _tune_decode16(b: int, s: int, dtype: torch.dtype) -> autotune.TuneKey:
    """One decode step of Llama-3-8B's attention over a static cache of length s whose bool
    mask hides the unwritten tail, as transformers passes it."""
    from qcompile.lowering.decode_attention import decode_attention_cuda, tune_key

    q = torch.randn(b, 32, 1, 128, dtype=dtype, device="cuda")
    k, v = (torch.randn(b, 8, s, 128, dtype=dtype, device="cuda") for _ in "kv")
    mask = (torch.arange(s, device="cuda") < s - 8).view(1, 1, 1, s).expand(b, 1, 1, s)
    decode_attention_cuda(q, k, v, mask, 128**-0.5)
    return tune_key(q, k)


def merge(new: Path, into: Path) -> str:
    """Fold `new`'s entries into the tuned-config file `into` (same format); a key present
    in both takes `new`'s config and timing. Returns a one-line summary."""
    base, extra = json.loads(into.read_text()), json.loads(new.read_text())
    if base["gpu"] != extra["gpu"]:
        raise ValueError(f"merge: {new} was tuned on {extra['gpu']!r}, {into} on {base['gpu']!r}")

    def key(e: dict) -> str:  # normalized: older files lack fields that now have defaults
        return json.dumps(asdict(autotune.TuneKey(**e["key"])), sort_keys=True)

    entries = {key(e): e for e in base["entries"]}
    replaced = sum(key(e) in entries for e in extra["entries"])
    entries.update({key(e): e for e in extra["entries"]})
    base["entries"] = [entries[k] for k in sorted(entries)]
    base["triton"], base["torch"] = extra["triton"], extra["torch"]
    into.write_text(json.dumps(base, indent=1) + "\n")
    return f"{into}: {len(extra['entries'])} entries from {new} ({replaced} replaced), {len(entries)} in all"


def _write(out: Path, gpu: str, tuner: autotune.Autotuner) -> None:
    data = {
        "format": autotune.CACHE_FORMAT, "gpu": gpu, "triton": tuner.triton_version, "torch": torch.__version__,
        "entries": [
            {"key": asdict(k), "config": asdict(c), "us": tuner.timings.get(k)}
            for k, c in sorted(tuner.user.items(), key=lambda kv: str(asdict(kv[0])))
        ],
    }  # fmt: skip
    out.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
