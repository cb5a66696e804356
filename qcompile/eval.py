"""Perplexity on real text: the accuracy harness, for any causal LM that returns `.logits`.

Protocol (fixed, so rows are comparable): the corpus files sorted by name and joined with a
blank line, tokenized once, cut into `windows` non-overlapping windows of `window` tokens;
the score is exp(mean next-token loss over all predicted tokens).

With a KV4 scheme, every window runs on an empty `KV4Cache` and each token attends to the
4-bit K/V of the tokens before it and of itself, exactly as during decoding.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qcompile.config import KVScheme


def load_corpus(root: str | Path, pattern: str = "*.txt") -> str:
    """Every file under `root` matching `pattern`, sorted by name, joined by a blank line."""
    files = sorted(Path(root).glob(pattern))
    if not files:
        raise FileNotFoundError(f"load_corpus: no {pattern} files under {root}")
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    ids: torch.Tensor,
    window: int = 512,
    windows: int = 16,
    progress: bool = True,
    desc: str = "perplexity",
    kv: KVScheme | None = None,
) -> float:
    """exp(mean next-token loss) over `windows` consecutive `window`-token slices of `ids`.

    `kv`: read every window through a KV4 cache of that scheme (a transformers model; it is
    switched to the "qcompile_kv4" attention function, which reads other caches as SDPA)."""
    ids = ids.flatten()
    if ids.numel() < window * windows:
        raise ValueError(
            f"perplexity: {ids.numel()} tokens, need window * windows = {window * windows}"
        )
    forward = model if kv is None else _KV4Windows(model, kv)
    device = next(model.parameters(), torch.empty(0)).device
    total, count = 0.0, 0
    for i in tqdm(range(windows), desc=desc, disable=not progress, leave=False):
        chunk = ids[i * window : (i + 1) * window].to(device)[None]
        logits = forward(chunk).logits.float()
        loss = F.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
        total += loss.item()
        count += window - 1
    return math.exp(total / count)


class _KV4Windows:
    """Each call starts an empty KV4 cache: every token of the window attends to the 4-bit
    K/V of the tokens before it and itself, as in decoding (`fresh_prefill=False`: the default
    would read the window's own tokens in 16 bits, as a prompt, and measure nothing)."""

    def __init__(self, model: torch.nn.Module, scheme: KVScheme):
        from qcompile.integrations.kv4_cache import enable_kv4_attention

        self.model = enable_kv4_attention(model)
        self.scheme = dataclasses.replace(scheme, fresh_prefill=False)

    def __call__(self, ids: torch.Tensor):
        from qcompile.integrations.kv4_cache import KV4Cache

        cache = KV4Cache(self.model.config, ids.shape[1], self.scheme)
        if not self.scheme.key_tokens:  # per-token groups: one causal pass is the same math
            return self.model(ids, past_key_values=cache)
        # Keys per channel: a window read at once would show each query its own group
        # quantized with later tokens' range, where decoding shows it the residual. Feeding
        # each group as its first T - 1 tokens, then its last one, is token-by-token decoding
        # exactly: the chunk's queries see the earlier groups quantized and their own group's
        # tokens in the residual; the last token completes the group and sees it quantized.
        bounds = decode_chunks(ids.shape[1], self.scheme.key_tokens)
        steps = [
            self.model(ids[:, lo:hi], past_key_values=cache).logits
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        return SimpleNamespace(logits=torch.cat(steps, dim=1))


def decode_chunks(n: int, t: int) -> list[int]:
    """Chunk bounds of n tokens: each group of t as its first t - 1 tokens, then its last."""
    return sorted({0, n, *range(t - 1, n, t), *range(t, n, t)})
