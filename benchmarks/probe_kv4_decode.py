"""GPU probe: the KV4 decode kernels over a grid of configs, against fp16 SDPA, same run.

Llama-3-8B heads (32 query / 8 KV, D=128), one query token, KV4 group 128 (one group per
head: both "decode" and "decode_grouped" apply); CUDA-graph replays over caches rotated past
L2. Checks the fastest config of each kernel against the float64 reference first, then
prints each shape's fastest configs, SDPA and the int4 roofline floor.

    python benchmarks/probe_kv4_decode.py --shapes 1x8192,16x32768 --out $OUT/probe.json
    python benchmarks/probe_kv4_decode.py --prefetch 0,1 --splits 1,4,16,64  # scale prefetch
    python benchmarks/probe_kv4_decode.py --prefetch 0,1 --stage-v 0,1  # V through smem
    python benchmarks/probe_kv4_decode.py --stage-v 1 --key-bias16 0,1  # keys as 16 + code
    python benchmarks/probe_kv4_decode.py --prefetch 1 --stage-v 1 --q-rows 0,1  # q in registers
    python benchmarks/probe_kv4_decode.py --prefetch 1 --stage-v 1 --tiles 32x1 \
        --max-registers 0,184,168 --splits 8,16  # more resident programs per SM
    python benchmarks/probe_kv4_decode.py --kinds decode,decode_t --t-rows 4,8 --prefetch 1 \
        --stage-v 1  # keys on the MMA's M side
    python benchmarks/probe_kv4_decode.py --kinds decode_t --t-rows 8 --prefetch 1 --stage-v 1 \
        --fp16-keys 0,1 --dtype bfloat16 --tiles 32x1  # bf16 query, K planes in fp16
    python benchmarks/probe_kv4_decode.py --kinds decode_t --t-rows 4 --prefetch 1 --stage-v 1 \
        --tiles 32x1 --stages 3 --splits 12,96,128 --reduce-pdl 0,1  # the reduce under PDL
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_kv4 import kv_bytes, random_kv4
from bench_w4a16 import copies, hbm_bandwidth, time_graph

from qcompile.lowering import kv4_attention
from qcompile.lowering.autotune import KernelConfig
from qcompile.lowering.kv4_attention import launch_attention, valid_config

HQ, HKV, D, G = 32, 8, 128, 128
# module switches of `kv4_attention` read at launch: flag -> name
SWITCHES = {"key_bias16": "_KEY_BIAS16", "q_rows": "_Q_ROWS", "fp16_keys": "_FP16_KEYS",
            "reduce_pdl": "_REDUCE_PDL"}  # fmt: skip
# which kernel reads each switch (the others' rows skip it when it is on)
SWITCH_KERNEL = {"key_bias16": "decode", "q_rows": "decode", "fp16_keys": "decode_t",
                 "reduce_pdl": "decode_t"}  # fmt: skip


SELF_REDUCE = kv4_attention._SELF_REDUCE_SPLITS
# what the module ships with (unset switches keep it)
SHIPPED = {f: bool(getattr(kv4_attention, name)) for f, name in SWITCHES.items()}
SHIPPED_PDL = kv4_attention._REDUCE_PDL


def _flags(sw: dict) -> dict:
    return {f: bool(sw.get(f, SHIPPED[f])) for f in SWITCHES}


def _set(sw: dict) -> None:
    for f, v in _flags(sw).items():
        if f == "reduce_pdl":  # a row cutoff: every grid or none; unset, the shipped cutoff
            v = SHIPPED_PDL if f not in sw else (1 << 30 if v else 0)
        setattr(kv4_attention, SWITCHES[f], v)


def check(
    kind: str,
    dtype: torch.dtype,
    prefetch: bool = False,
    stage_v: bool = False,
    cap: int = 0,
    t_rows: int = 4,
    split: int = 4,
) -> float:
    """Relative error of one config against the float64 reference (quantized cache); with a
    register cap, of the shipped one-warp BLOCK_N 32 tile under it."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from helpers import rel_error
    from strategies import KV4Problem

    from qcompile.config import KVScheme
    from qcompile.quant.kv4 import quantize_kv4

    torch.manual_seed(0)
    s = 3000
    k, v = torch.randn(2, HKV, s, D), torch.randn(2, HKV, s, D)
    k[..., 5] *= 20
    keys, values = (quantize_kv4(t, KVScheme(group_size=G)) for t in (k, v))
    to = lambda p: type(p)(p.codes.cuda(), p.scales.cuda(), p.offsets.cuda(), G)  # noqa: E731
    q = torch.randn(2, HQ, 1, D).to(dtype)
    ref = KV4Problem(q, keys, values, None, None, False, D**-0.5).reference64()
    prob = KV4Problem(q.cuda(), to(keys), to(values), None, None, False, D**-0.5)
    cfg = KernelConfig(kind, 16, 128, 0, 4, 4, 2, prefetch, stage_v=stage_v)
    if kind == "decode_t":
        cfg = KernelConfig(kind, t_rows, 32, 0, split, 1, 2, prefetch, stage_v=stage_v)
    if cap:
        cfg = KernelConfig(kind, 16, 32, 0, 4, 1, 2, True, stage_v=True, max_registers=cap)
    out = launch_attention(cfg, *prob.args())
    return rel_error(out.cpu(), ref)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1x8192,1x32768,16x8192,16x32768,64x8192")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--prefetch", default="0",
        help="decode: the token-scale prefetch settings to time, e.g. 0,1",
    )  # fmt: skip
    ap.add_argument("--stage-v", default="0", help="decode: STAGE_V settings to time, e.g. 0,1")
    for flag in SWITCHES:
        ap.add_argument(f"--{flag.replace('_', '-')}", default=str(int(SHIPPED[flag])),
                        help=f"`{SWITCHES[flag]}` settings to check and time, e.g. 0,1")  # fmt: skip
    ap.add_argument(
        "--max-registers", default="0",
        help="decode: register caps per thread to time (0: none), e.g. 0,184,168",
    )  # fmt: skip
    ap.add_argument(
        "--kinds", default="decode", help="one-group decode kernels, e.g. decode,decode_t"
    )
    ap.add_argument("--t-rows", default="4", help="decode_t: BLOCK_M (query-head columns) list")
    ap.add_argument("--splits", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--tiles", default="", help="BLOCK_Nxwarps list, e.g. 64x1,128x4")
    ap.add_argument("--stages", default="2,3", help="num_stages list")
    ap.add_argument("--grouped", type=int, default=1, help="time decode_grouped too (0: no)")
    ap.add_argument(
        "--self-reduce-splits", default=str(kv4_attention._SELF_REDUCE_SPLITS),
        help="`_SELF_REDUCE_SPLITS` values: the most splits the last program combines itself "
        "(more: a second launch, `_kv4_split_reduce_kernel`), e.g. 8,16,128",
    )  # fmt: skip
    ap.add_argument("--top", type=int, default=4, help="configs printed per kernel and shape")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    prefetches = tuple(bool(int(v)) for v in args.prefetch.split(","))
    stage_vs = tuple(bool(int(v)) for v in args.stage_v.split(","))
    caps = tuple(int(v) for v in args.max_registers.split(","))
    values = {f: tuple(bool(int(v)) for v in getattr(args, f).split(",")) for f in SWITCHES}
    switches = [dict(zip(SWITCHES, vs, strict=True)) for vs in itertools.product(*values.values())]
    for sw in switches:
        _set(sw)
        for kind in {SWITCH_KERNEL[f] for f, v in sw.items() if v} or {"decode"}:
            for dt in (torch.float16, torch.bfloat16):
                err = check(kind, dt, prefetches[-1], stage_vs[-1])
                print(f"check {kind} {dt} {sw}: rel error {err:.2e}", flush=True)
    _set({})
    kinds = args.kinds.split(",")
    self_reduce = tuple(int(v) for v in args.self_reduce_splits.split(","))
    t_rows = tuple(int(v) for v in args.t_rows.split(","))
    for r in t_rows if "decode_t" in kinds else ():
        for dt in (torch.float16, torch.bfloat16):
            for pf, sv in itertools.product(prefetches, stage_vs):
                err = check("decode_t", dt, pf, sv, t_rows=r)
                print(f"check decode_t rows={r} {dt} prefetch={pf} stage_v={sv}: rel error "
                      f"{err:.2e}", flush=True)  # fmt: skip
    for srs in (v for v in self_reduce if v > 8 and "decode_t" in kinds):
        kv4_attention._SELF_REDUCE_SPLITS = srs  # splits past 8 combined by the last program
        for split in (12, srs):
            err = check("decode_t", torch.float16, True, True, t_rows=4, split=split)
            print(f"check decode_t self-reduced split {split} (<= {srs}): rel error {err:.2e}",
                  flush=True)  # fmt: skip
    kv4_attention._SELF_REDUCE_SPLITS = SELF_REDUCE
    for kind in ("decode", "decode_grouped"):
        for dt in (torch.float16, torch.bfloat16):
            one = kind == "decode"
            for pf, sv in itertools.product(
                prefetches if one else (False,), stage_vs if one else (False,)
            ):
                err = check(kind, dt, pf, sv)
                print(
                    f"check {kind} {dt} prefetch={pf} stage_v={sv}: rel error {err:.2e}", flush=True
                )
    for cap in (c for c in caps if c):
        for dt in (torch.float16, torch.bfloat16):
            print(f"check decode {dt} max_registers={cap}: rel error "
                  f"{check('decode', dt, cap=cap):.2e}", flush=True)  # fmt: skip
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    bw = hbm_bandwidth()
    results = []
    for spec in args.shapes.split(","):
        b, s = map(int, spec.split("x"))
        q = torch.randn(b, HQ, 1, D, dtype=dtype, device="cuda")
        int4, fp16 = kv_bytes(b, HKV, s, D, G), kv_bytes(b, HKV, s, D, None)
        caches = [random_kv4(b, HKV, s, D, G) for _ in range(copies(int4, l2, cap=16))]
        rows = []
        tiles = ((32, 1), (32, 2), (64, 1), (64, 2), (64, 4), (128, 2), (128, 4), (128, 8),
                 (256, 4), (256, 8))  # fmt: skip
        if args.tiles:
            tiles = tuple(tuple(map(int, t.split("x"))) for t in args.tiles.split(","))
        splits = tuple(int(v) for v in args.splits.split(","))
        stage_list = tuple(int(v) for v in args.stages.split(","))
        one_group = [(k, 16) for k in kinds if k == "decode"]
        one_group += [(k, r) for k in kinds if k == "decode_t" for r in t_rows]
        grid = list(itertools.chain(
            ((k, bm, bn, w, st, sp, pf, sv, sw, r) for (k, bm), (bn, w), st, sp, pf, sv, sw, r in
             itertools.product(one_group, tiles, stage_list, splits, prefetches, stage_vs, switches,
                               caps)),
            itertools.product(["decode_grouped"] if args.grouped else [], (16,), (64,), (4,), (2,), (4, 32), (False,),
                              (False,), ({},), (0,)),
        ))  # fmt: skip
        runs = [(srs, *g) for srs in self_reduce for g in grid]
        for srs, kind, bm, bn, warps, stages, split, pf, sv, sw, cap in runs:
            kv4_attention._SELF_REDUCE_SPLITS = srs  # read at launch, as the switches
            if any(v and SWITCH_KERNEL[f] != kind for f, v in sw.items()) or (
                cap and kind != "decode"
            ):
                continue  # a switch or cap another kernel reads
            cfg = KernelConfig(kind, bm, bn, 0, split, warps, stages, pf, stage_v=sv,
                               max_registers=cap)  # fmt: skip
            _set(sw)  # read at launch, i.e. when the graph is captured
            if (
                not valid_config(cfg, 4)
                # ~8 one-warp programs fit an SM uncapped, up to 12 capped
                or (split > 1 and b * HKV * split > (16 if cap or kind == "decode_t" else 8) * 132)
                or s < split * 64
            ):
                continue
            try:
                us = time_graph(
                    [
                        lambda k=k, v=v, c=cfg, q=q: launch_attention(
                            c,
                            q,
                            k.codes,
                            k.scales,
                            k.offsets,
                            v.codes,
                            v.scales,
                            v.offsets,
                            None,
                            None,
                            False,
                            D**-0.5,
                        )  # fmt: skip
                        for k, v in caches
                    ],
                    batches=7,
                    min_ms=10.0,
                )
            except Exception as e:  # noqa: BLE001 - out of shared memory, say, and go on
                print(f"{spec} {cfg}: {type(e).__name__} {str(e)[:100]}", flush=True)
                continue
            rows.append({"b": b, "s": s, "config": cfg.__dict__, **_flags(sw), "us": us,
                         "self_reduce_splits": srs})  # fmt: skip
        del caches
        kv = [
            tuple(torch.randn(b, HKV, s, D, dtype=dtype, device="cuda") for _ in "kv")
            for _ in range(copies(fp16, l2, cap=16))
        ]
        qp = q.view(b, HKV, HQ // HKV, D)
        sdpa = time_graph(
            [lambda k=k, v=v, qp=qp: F.scaled_dot_product_attention(qp, k, v) for k, v in kv]
        )
        del kv
        torch.cuda.empty_cache()
        rows.sort(key=lambda r: r["us"])
        floor = (int4 + 4 * b * HQ * D) / bw * 1e6
        print(f"B={b} S={s}: SDPA {sdpa:.1f} us, int4 floor {floor:.1f} us", flush=True)
        for kind in (*kinds, "decode_grouped"):
            best = [r for r in rows if r["config"]["kernel"] == kind][: args.top]
            for r in best:
                c = r["config"]
                print(
                    f"  {kind:15s} bm{c['block_m']} bn{c['block_n']} w{c['num_warps']} "
                    f"st{c['num_stages']} "
                    f"split{c['split_k']} pf{int(c['prefetch'])} sv{int(c['stage_v'])} "
                    f"kb{int(r['key_bias16'])} qr{int(r['q_rows'])} fk{int(r['fp16_keys'])} "
                    f"pdl{int(r['reduce_pdl'])} "
                    f"r{c.get('max_registers', 0)} srs{r['self_reduce_splits']}: {r['us']:.1f} us "
                    f"({sdpa / r['us']:.2f}x SDPA, "
                    f"{floor / r['us']:.0%} of floor)",
                    flush=True,
                )
        options = (  # each setting's effect alone: the best decode time with it on / off
            ("prefetch", lambda r: bool(r["config"]["prefetch"]), prefetches),
            ("stage_v", lambda r: bool(r["config"]["stage_v"]), stage_vs),
            ("max_registers", lambda r: r["config"]["max_registers"], caps),
            *((f, lambda r, f=f: r[f], values[f]) for f in SWITCHES),
        )
        for name, setting, settings in options:
            for v in settings if len(settings) > 1 else ():
                best = min((r["us"] for r in rows if r["config"]["kernel"] == "decode"
                            and setting(r) == v), default=float("nan"))  # fmt: skip
                print(f"  best decode with {name}={v}: {best:.1f} us", flush=True)
        results.append({"b": b, "s": s, "sdpa_us": sdpa, "floor_us": floor, "rows": rows})
    if args.out:
        meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                "triton": __import__("triton").__version__, "hbm_bytes_per_s": bw}  # fmt: skip
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
