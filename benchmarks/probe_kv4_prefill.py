"""GPU probe: the KV4 prefill kernel against the float64 reference, one factor at a time.

The hypothesis test compiles a kernel per drawn example (and many more while shrinking), too
slow to finish on the device; this walks a fixed grid instead and prints every case's error,
so a failure names its shape, mask, dtype and config.

    python benchmarks/probe_kv4_prefill.py                      # on the GPU
    TRITON_INTERPRET=1 python benchmarks/probe_kv4_prefill.py   # the same cases on CPU
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import REL_TOL, rel_error  # noqa: E402
from strategies import KV4Problem  # noqa: E402

from qcompile.config import KVScheme  # noqa: E402
from qcompile.lowering.autotune import KernelConfig  # noqa: E402
from qcompile.lowering.kv4_attention import launch_attention  # noqa: E402
from qcompile.quant.kv4 import quantize_kv4  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: under TRITON_INTERPRET=1
BASE = dict(d=128, group=128, gqa=4, hkv=2, b=2, s=75, sq=20, dtype=torch.float16,
            causal=True, mask="none", lens=False, cfg=(32, 32, 4, 2))  # fmt: skip
VARY = {
    "cfg": [
        (16, 16, 4, 1),
        (16, 16, 1, 1),
        (16, 16, 2, 1),
        (16, 16, 4, 2),
        (16, 32, 4, 1),
        (32, 16, 4, 1),
        (32, 32, 4, 1),
        (64, 32, 4, 2),
        (64, 64, 4, 2),
        (128, 64, 8, 2),
    ],
    "d": [64],  # group 64 (below)
    "group": [32, 64],
    "gqa": [1, 8],
    "dtype": [torch.bfloat16],
    "causal": [False],
    "mask": ["bool", "float"],
    "lens": [True],
    "s": [2, 33, 96, 101],
    "sq": [2, 7],
}


def problem(p: dict) -> KV4Problem:
    gen = torch.Generator().manual_seed(0)
    hq = p["hkv"] * p["gqa"]
    s, sq, d = p["s"], min(p["sq"], p["s"]), p["d"]
    q = torch.randn(p["b"], hq, sq, d, generator=gen)
    k = torch.randn(p["b"], p["hkv"], s, d, generator=gen)
    v = torch.randn(p["b"], p["hkv"], s, d, generator=gen)
    mask = None
    if p["mask"] == "bool":
        mask = torch.rand(p["b"], hq, sq, s, generator=gen) > 0.3
        mask[..., 0] = True
    elif p["mask"] == "float":
        mask = torch.randn(p["b"], hq, sq, s, generator=gen)
        mask[torch.rand(mask.shape, generator=gen) > 0.8] = float("-inf")
        mask[..., 0] = 0.0
    lens = torch.full((p["b"],), s - 1 if s > sq else s, dtype=torch.int32) if p["lens"] else None
    scheme = KVScheme(group_size=p["group"])
    keys, values = quantize_kv4(k, scheme), quantize_kv4(v, scheme)

    def to_device(t):
        return None if t is None else t.to(DEVICE)

    keys = type(keys)(*(to_device(t) for t in (keys.codes, keys.scales, keys.offsets)), p["group"])
    values = type(values)(*(to_device(t) for t in (values.codes, values.scales, values.offsets)),
                          p["group"])  # fmt: skip
    return KV4Problem(to_device(q.to(p["dtype"])), keys, values, to_device(lens), to_device(mask), p["causal"],
                      d**-0.5)  # fmt: skip


def main() -> int:
    if DEVICE == "cpu":  # the interpreter's bf16 dot, as the tests' conftest patches it
        from interpreter_fixes import patch_bf16_dot

        patch_bf16_dot()
    cases = [dict(BASE)] + [dict(BASE, **{k: v}) for k, vals in VARY.items() for v in vals]
    for p in cases:
        p["group"] = min(p["group"], p["d"])
    bad = 0
    for p in cases:
        bm, bn, w, st = p["cfg"]
        label = {k: (str(v).removeprefix("torch.")) for k, v in p.items() if BASE[k] != v}
        try:
            prob = problem(p)
            out = torch.full_like(prob.query, float("nan"))
            launch_attention(KernelConfig("prefill", bm, bn, 0, 1, w, st), *prob.args(), out=out)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            err = rel_error(out.cpu().double(), prob.reference64().cpu().double())
            nan = bool(torch.isnan(out).any())
            ok = err <= REL_TOL[p["dtype"]] and not nan
        except Exception as e:  # noqa: BLE001 - a probe reports every failure and goes on
            err, nan, ok = float("nan"), False, False
            label["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} rel_err={err:.3e} nan={nan} {label or 'base'}",
              flush=True)  # fmt: skip
    print(f"{bad} of {len(cases)} cases failed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
