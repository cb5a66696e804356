"""Perplexity on real text: the accuracy harness, for any causal LM that returns `.logits`.

Protocol (fixed, so rows are comparable): the corpus files sorted by name and joined with a
blank line, tokenized once, cut into `windows` non-overlapping windows of `window` tokens;
the score is exp(mean next-token loss over all predicted tokens).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm


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
) -> float:
    """exp(mean next-token loss) over `windows` consecutive `window`-token slices of `ids`."""
    ids = ids.flatten()
    if ids.numel() < window * windows:
        raise ValueError(
            f"perplexity: {ids.numel()} tokens, need window * windows = {window * windows}"
        )
    device = next(model.parameters(), torch.empty(0)).device
    total, count = 0.0, 0
    for i in tqdm(range(windows), desc=desc, disable=not progress, leave=False):
        chunk = ids[i * window : (i + 1) * window].to(device)[None]
        logits = model(chunk).logits.float()
        loss = F.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
        total += loss.item()
        count += window - 1
    return math.exp(total / count)
