"""KV4 keys per channel (`KVScheme.key_tokens`) vs per token on the GPU, side by side.

Decode (B in {1, 16, 64}, S in {8k, 32k}, 32 query / 8 KV heads, D=128, V one group per
head) and causal prefill (B=1, S in {4k, 8k}): the same autotuned op over a per-token cache
(K scales per token) and over keys per channel over T tokens (decode at length S - 32, so
the last 32 tokens are read from the 16-bit residual, as most decode steps do), plus
fp16 SDPA (the faster of the GQA and packed-query calls) and the decode step's cache write
(one token), and the transposed decode kernel over keys per channel at its one-wave split
(`_DECODE_T_KEY_TOKENS`, 4 and 8 head columns; `--sweep`: also 2 and 3 stages at the
splits of 10 / 11 / 12 programs per SM). Timings: median CUDA-graph replays over cache
copies covering >= 4x L2.

    python benchmarks/probe_kv4_key_channels.py --out $OUT   # on the GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

HQ, HKV, D = 32, 8, 128


def per_token(b: int, s: int) -> tuple:
    from bench_kv4 import random_kv4

    k = random_kv4(b, HKV, s, D, D)[0]  # one group per token and head
    return k.codes, k.scales, k.offsets


def per_channel(b: int, s: int, t: int) -> tuple:
    codes = torch.randint(0, 256, (b, HKV, s, D // 2), dtype=torch.uint8, device="cuda")
    scales = torch.rand(b, HKV, -(-s // t), D, device="cuda").half() * 0.05 + 1e-3
    residual = torch.randn(b, HKV, t, D, device="cuda").half()
    return codes, scales, -8 * scales, residual


def decode_row(b: int, s: int, t: int, l2: int, bw: float, sweep: bool = False) -> dict:
    from bench_w4a16 import copies, time_graph

    from qcompile.lowering.kv4_attention import kv4_attention_cuda, kv4_cache_write_cuda

    q = torch.randn(b, HQ, 1, D, dtype=torch.float16, device="cuda")
    scale = D**-0.5
    lens = torch.full((b,), s - 32, dtype=torch.int32, device="cuda")
    tok_bytes = 2 * b * HKV * s * (D // 2 + 4)
    n = copies(tok_bytes, l2, cap=16)
    row = {"phase": "decode", "b": b, "s": s, "key_tokens": t}
    caches = [(per_token(b, s), per_token(b, s)) for _ in range(n)]
    row["per_token_us"] = time_graph(
        [
            lambda k=k, v=v: kv4_attention_cuda(q, *k, *v, lens, None, False, scale)
            for k, v in caches
        ]
    )
    from qcompile.lowering import kv4_attention as kv4
    from qcompile.lowering.autotune import KernelConfig

    shipped = kv4._DECODE_T_KEY_TOKENS
    caches = [(per_channel(b, s, t), per_token(b, s)) for _ in range(n)]
    kv4._DECODE_T_KEY_TOKENS = False  # the decode kernel's default
    try:
        row["per_channel_us"] = time_graph(
            [
                lambda k=k, v=v: kv4_attention_cuda(q, *k[:3], *v, lens, None, False, scale, k[3])
                for k, v in caches
            ]
        )
    finally:
        kv4._DECODE_T_KEY_TOKENS = shipped

    def decode_t_us(cfg: KernelConfig, caches=caches) -> float:
        """The transposed kernel over keys per channel (`_DECODE_T_KEY_TOKENS` on) at `cfg`."""
        kv4._DECODE_T_KEY_TOKENS = True
        try:
            return time_graph(
                [
                    lambda k=k, v=v: kv4.launch_attention(
                        cfg, q, *k[:3], *v, lens, None, False, scale, k[3]
                    )
                    for k, v in caches
                ]
            )
        finally:
            kv4._DECODE_T_KEY_TOKENS = shipped

    for rows in (4, 8):  # at its one-wave split
        split = kv4._decode_t_wave(b * HKV, s, rows, 0, t)
        cfg = KernelConfig("decode_t", rows, 32, 0, split, 1, 3, True, stage_v=True)
        row[f"per_channel_decode_t{rows}_us"] = decode_t_us(cfg)
        row[f"per_channel_decode_t{rows}_split"] = split
    if sweep:  # decode_t over 4 / 8 columns, 2 / 3 stages, at the waves of 10 / 11 / 12 per SM
        row["sweep"] = []
        waves = sorted({kv4._wave_split(b * HKV, s, r, 64) for r in (10, 11, 12)})
        for cols, stages in ((4, 3), (8, 3), (4, 2), (8, 2)):
            for split in waves:
                cfg = KernelConfig("decode_t", cols, 32, 0, split, 1, stages, True, stage_v=True)
                got = {"cols": cols, "stages": stages, "split": split, "us": decode_t_us(cfg)}
                row["sweep"].append(got)
                print(f"  B={b} S={s} sweep {got}", flush=True)
    kv, vv = caches[0]
    new = torch.randn(b, HKV, 1, D, dtype=torch.float16, device="cuda")
    pos = torch.tensor([s - 33], device="cuda")
    row["write_per_channel_us"] = time_graph(
        [lambda: kv4_cache_write_cuda(new, new, *kv[:3], *vv, pos, k_residual=kv[3])]
    )
    tk = per_token(b, s)
    row["write_per_token_us"] = time_graph([lambda: kv4_cache_write_cuda(new, new, *tk, *vv, pos)])
    del caches, decode_t_us  # (its default argument holds the caches too)
    kv16 = [
        tuple(torch.randn(b, HKV, s, D, dtype=torch.float16, device="cuda") for _ in "kv")
        for _ in range(copies(4 * b * HKV * s * D, l2, cap=8))
    ]
    gqa = time_graph(
        [lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True) for k, v in kv16]
    )
    qp = q.view(b, HKV, HQ // HKV, D)
    packed = time_graph(
        [lambda k=k, v=v: F.scaled_dot_product_attention(qp, k, v) for k, v in kv16]
    )
    row["sdpa_us"] = min(gqa, packed)
    row["int4_floor_us"] = tok_bytes / bw * 1e6
    del kv16
    torch.cuda.empty_cache()
    return row


def prefill_row(s: int, t: int) -> dict:
    from bench_w4a16 import time_graph

    from qcompile.lowering.kv4_attention import kv4_attention_cuda

    q = torch.randn(1, HQ, s, D, dtype=torch.float16, device="cuda")
    scale = D**-0.5
    k16 = torch.randn(1, HKV, s, D, dtype=torch.float16, device="cuda")
    v16 = torch.randn_like(k16)
    tk, vv, kc = per_token(1, s), per_token(1, s), per_channel(1, s, t)
    row = {"phase": "prefill", "b": 1, "s": s, "key_tokens": t}
    row["per_token_us"] = time_graph(
        [lambda: kv4_attention_cuda(q, *tk, *vv, None, None, True, scale)]
    )
    row["per_channel_us"] = time_graph(
        [lambda: kv4_attention_cuda(q, *kc[:3], *vv, None, None, True, scale, kc[3])]
    )
    row["sdpa_us"] = time_graph(
        [lambda: F.scaled_dot_product_attention(q, k16, v16, is_causal=True, enable_gqa=True)]
    )
    torch.cuda.empty_cache()
    return row


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# KV4 keys per channel vs per token (same run)",
        "",
        f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; HBM "
        f"{meta['hbm_tb_s']:.2f} TB/s. {HQ} query / {HKV} KV heads, D={D}, V one group per "
        f"head, keys per channel over T={meta['key_tokens']} tokens; decode at length S - 32 "
        "(a residual tile every step). Microseconds, median of CUDA-graph replays.",
        "",
        "| phase | B | S | SDPA fp16 | per-token K | per-channel K | per-channel / per-token "
        "| vs SDPA | int4 floor | write per-token | write per-channel | per-channel decode_t "
        "(4 / 8 columns) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        floor = f"{r['int4_floor_us']:.1f}" if "int4_floor_us" in r else ""
        wt = f"{r['write_per_token_us']:.1f}" if "write_per_token_us" in r else ""
        wc = f"{r['write_per_channel_us']:.1f}" if "write_per_channel_us" in r else ""
        vs = r["sdpa_us"] / r["per_channel_us"]
        vs = f"{vs:.2f}x" if r["phase"] == "decode" else f"{1 / vs:.2f}x time"
        dt = " / ".join(
            f"{r[f'per_channel_decode_t{n}_us']:.1f}" for n in (4, 8)
            if f"per_channel_decode_t{n}_us" in r
        )  # fmt: skip
        lines.append(
            f"| {r['phase']} | {r['b']} | {r['s']} | {r['sdpa_us']:.1f} | "
            f"{r['per_token_us']:.1f} | {r['per_channel_us']:.1f} | "
            f"{r['per_channel_us'] / r['per_token_us']:.2f} | {vs} | {floor} | {wt} | {wc} | "
            f"{dt} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--key-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--lengths", default="8192,32768")
    ap.add_argument("--prefill", default="4096,8192")
    ap.add_argument("--sweep", action="store_true",
                    help="also decode_t at 4 / 8 columns, 2 / 3 stages, the waves of 10-12 "
                    "programs per SM")  # fmt: skip
    args = ap.parse_args()
    import triton
    from bench_w4a16 import hbm_bandwidth

    args.out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    bw = hbm_bandwidth()
    meta = {
        "device": props.name, "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "hbm_tb_s": bw / 1e12,
        "key_tokens": args.key_tokens,
    }  # fmt: skip
    print(meta, flush=True)
    rows: list[dict] = []
    for b in map(int, args.batches.split(",")):
        for s in map(int, args.lengths.split(",")):
            rows.append(decode_row(b, s, args.key_tokens, props.L2_cache_size, bw, args.sweep))
            print(rows[-1], flush=True)
            (args.out / "kv4_key_channels.json").write_text(
                json.dumps({"meta": meta, "rows": rows}, indent=1)
            )
    for s in (int(x) for x in args.prefill.split(",") if x):
        rows.append(prefill_row(s, args.key_tokens))
        print(rows[-1], flush=True)
    (args.out / "kv4_key_channels.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1)
    )
    (args.out / "kv4_key_channels.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
