"""SmoothQuant: per-input-channel scales that move activation outliers into the weights.

For linears sharing an input x, W x = (W diag(s)) (x / s). With
    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)
(max over calibration tokens, and over the rows of every linear reading x; alpha is the
migration strength) the activation channels x_j / s_j become flatter, which per-token 8-bit
activations need, at the cost of wider weight columns. The 1/s is folded into the op that
produces x (an RMSNorm's weight, or the previous linear's rows: AWQ's `LLAMA_GROUPS` and
`fold_input_scales`), so nothing is added at run time.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from qcompile.quant.awq import LLAMA_GROUPS, fold_input_scales, scaling_groups

# SmoothQuant's floor on both statistics, so a dead channel gives a finite scale.
_MIN_STAT = 1e-5


def smooth_scales(
    act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float
) -> torch.Tensor:
    """s [K] = max|X_j|^alpha / max|W_j|^(1 - alpha), the max over every weight's rows."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth_scales: alpha={alpha} is outside [0, 1]")
    w_absmax = torch.stack([w.detach().abs().float().amax(dim=0) for w in weights]).amax(dim=0)
    a = act_absmax.float().to(w_absmax.device).clamp_min(_MIN_STAT)
    return (a.pow(alpha) / w_absmax.clamp_min(_MIN_STAT).pow(1 - alpha)).clamp_min(_MIN_STAT)


@torch.no_grad()
def smooth_block(
    block: nn.Module, act_absmax: dict[str, torch.Tensor], alpha: float, groups=LLAMA_GROUPS
) -> list[str]:
    """Fold SmoothQuant scales into `block` in place (same function in exact arithmetic);
    `act_absmax` is keyed by module path inside the block. Returns the linears smoothed."""
    smoothed: list[str] = []
    for producer, linears, names in scaling_groups(block, act_absmax, groups):
        s = smooth_scales(act_absmax[names[0]], [m.weight for m in linears], alpha)
        fold_input_scales(producer, linears, s)
        smoothed += list(names)
    return smoothed


@torch.no_grad()
def smooth_model_(model: nn.Module, batches, alpha: float = 0.5, progress: bool = True) -> None:
    """Fold SmoothQuant scales (strength `alpha`) into every block of `model` in place.
    Activation maxima come from one pass of the full-precision model over `batches` (as in
    SmoothQuant: maxima barely move with the upstream quantization error, and one pass costs a
    fraction of block-by-block calibration)."""
    from qcompile.quant.calibration import AbsMaxRecorder, find_blocks

    blocks = find_blocks(model)
    with AbsMaxRecorder(blocks) as recorder:
        for batch in tqdm(list(batches), desc="activation maxima", disable=not progress):
            model(batch)
    stats = recorder.result()  # keyed "<block index>.<path in the block>"
    for i, block in enumerate(blocks):
        mine = {k.removeprefix(f"{i}."): v for k, v in stats.items() if k.startswith(f"{i}.")}
        smooth_block(block, mine, alpha)


def smooth_quantize_model(
    model: nn.Module, batches, config, alpha: float = 0.5, progress: bool = True
):
    """SmoothQuant (`smooth_model_`) then `quantize_` every supported linear of `model` in
    place (RTN; for GPTQ on smoothed weights, call `smooth_model_` then
    `gptq_quantize_model`). Returns the report. Meant for W4A8."""
    from qcompile.quantize import quantize_

    smooth_model_(model, batches, alpha, progress)
    return quantize_(model, config)
