"""GPTQ: quantize a weight column by column, pushing each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's inputs (H = 2 X^T X).

A plain function of (weight, Hessian); `qcompile.quant.calibration` collects the Hessians.
With `act_order`, columns are visited by decreasing Hessian diagonal and groups are fitted on
the original weight first ("static groups"), so groups stay contiguous in K and the packed
layout needs no permutation index.
"""

from __future__ import annotations

import torch

from qcompile.config import Scheme
from qcompile.quant.int4 import PackedInt4, pack_int4_along_k
from qcompile.quant.rtn import fit_groups, round_to_codes


def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: Scheme,
    dtype: torch.dtype | None = None,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    clip_search: bool = False,
) -> PackedInt4:
    """GPTQ-quantize a [N, K] weight given its input Hessian [K, K]; same layout as RTN."""
    n, k = weight.shape
    if tuple(hessian.shape) != (k, k):
        raise ValueError(
            f"gptq_quantize_weight: Hessian {tuple(hessian.shape)} does not match K={k}"
        )
    g = scheme.group_size_for(k)
    if k % g:
        raise ValueError(f"gptq_quantize_weight: K={k} is not divisible by group_size={g}")
    dtype = dtype or weight.dtype
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(torch.float32).clone()
    dead = torch.diag(h) == 0  # inputs never active: any value works, choose 0
    h[dead, dead] = 1
    w[:, dead] = 0

    scales = torch.zeros(n, k // g)
    offsets = torch.zeros(n, k // g)
    if act_order:
        scales, offsets = fit_groups(w.reshape(n, k // g, g), scheme.symmetric, dtype, clip_search)
        perm = torch.argsort(torch.diag(h), descending=True)
    else:
        perm = torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.diag(h).mean() * torch.eye(k)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.zeros(n, k)
    # Blocks hold whole groups, so a group's (error-updated) columns are all in the block.
    block = g * max(1, block_size // g) if g < k else k
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = w[:, b0:b1].clone()
        errs = torch.zeros_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = int(perm[b0 + i])
            grp = col // g
            if not act_order and col % g == 0:
                scales[:, grp], offsets[:, grp] = fit_groups(
                    wb[:, i : i + g], scheme.symmetric, dtype, clip_search
                )
            q = round_to_codes(wb[:, i], scales[:, grp], offsets[:, grp])
            codes[:, col] = q
            err = (wb[:, i] - (q * scales[:, grp] + offsets[:, grp])) / hb[i, i]
            wb[:, i:] -= err[:, None] * hb[i, i:][None, :]
            errs[:, i] = err
        w[:, b1:] -= errs @ hinv[b0:b1, b1:]
    return PackedInt4(
        qweight=pack_int4_along_k(codes),
        scales=scales.to(dtype).t().contiguous(),
        offsets=offsets.to(dtype).t().contiguous(),
        group_size=g,
    )


def gptq_quantizer(hessians: dict[str, torch.Tensor], **options):
    """A `quantize_` quantizer running GPTQ with each layer's Hessian (RTN where none)."""
    from qcompile.quant.rtn import quantize_weight_int4

    def quantize(name: str, linear: torch.nn.Linear, scheme: Scheme) -> PackedInt4:
        h = hessians.get(name)
        if h is None:
            return quantize_weight_int4(linear.weight, scheme)
        return gptq_quantize_weight(linear.weight, h.to(linear.weight.device), scheme, **options)

    return quantize


def gptq_quantize_model(
    model: torch.nn.Module,
    batches,
    config,
    act_order: bool = False,
    clip_search: bool = False,
    awq: bool = False,
    progress: bool = True,
):
    """GPTQ every supported linear of `model` in place, block by block (each block calibrated
    on the outputs of the already-quantized blocks before it); linears outside the repeated
    blocks get RTN. With `awq`, each block first gets AWQ's scales folded in (then GPTQ
    rounds the scaled weights against the correspondingly scaled Hessians). Returns the
    combined report."""
    from qcompile.quant.calibration import quantize_sequentially
    from qcompile.quantize import quantize_
    from qcompile.report import CompileReport

    report = CompileReport()

    def quantize_block(prefix: str, block: torch.nn.Module, hessians: dict) -> None:
        if awq:
            from qcompile.quant.awq import awq_scale_block

            # inputs became x / s: H = 2 X^T X turns into diag(1/s) H diag(1/s)
            for name, s in awq_scale_block(block, hessians, config.scheme).items():
                inv = (1.0 / s).to(hessians[name])
                hessians[name] = hessians[name] * inv[:, None] * inv[None, :]
        quantizer = gptq_quantizer(hessians, act_order=act_order, clip_search=clip_search)
        report.records.extend(quantize_(block, config, quantizer, prefix=prefix).records)

    quantize_sequentially(model, batches, quantize_block, progress=progress)
    report.records.extend(quantize_(model, config).records)  # the rest (lm_head skipped)
    return report
