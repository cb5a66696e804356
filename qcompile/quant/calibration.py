"""Activation statistics of a model's linear layers over calibration data."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm import tqdm


@torch.no_grad()
def collect_input_hessians(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    names: Iterable[str] | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """H = 2 X^T X / rows of the input X of each named nn.Linear (default: every nn.Linear).

    One forward pass per batch with hooks on the full-precision model; memory is one K x K
    float32 matrix per layer.
    """
    wanted = set(names) if names is not None else None
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name: str):
        def record(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                rows[name] = 0
            sums[name].addmm_(x.t(), x)
            rows[name] += x.shape[0]

        return record

    hooks = [
        mod.register_forward_hook(hook(name))
        for name, mod in model.named_modules()
        if type(mod) is nn.Linear and (wanted is None or name in wanted)
    ]
    try:
        for batch in tqdm(list(batches), desc="calibration", disable=not progress, leave=False):
            model(batch)
    finally:
        for h in hooks:
            h.remove()
    return {name: 2 * s / rows[name] for name, s in sums.items()}
