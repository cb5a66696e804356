"""GPTQ: quantize a weight column by column, pushing each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's inputs (H = 2 X^T X).

A plain function of (weight, Hessian); `qcompile.quant.calibration` collects the Hessians.
With `act_order`, columns are visited by decreasing Hessian diagonal and groups are fitted on
the original weight first ("static groups"), so groups stay contiguous in K and the packed
layout needs no permutation index.

One loop serves every scheme's grid (`GPTQ_GRIDS`, keyed by `Scheme.name`): a grid fits a
group's parameters, rounds one column to codes and says what value each code stands for, in
the weight's own units (so the error pushed onward is the output error GPTQ minimizes), and
packs the result in the layout RTN produces for that scheme.
"""

from __future__ import annotations

import torch

from qcompile.config import Scheme
from qcompile.quant.int4 import PackedInt4, pack_int4_along_k, pad_columns
from qcompile.quant.rtn import fit_groups, round_to_codes
from qcompile.quant.w4a8 import (
    PackedW4A8,
    channel_scales_w4a8,
    check_w4a8_shape,
    fit_w4a8_groups,
    pack_w4a8,
    round_to_w4a8_codes,
    to_int8,
)

GroupParams = tuple[torch.Tensor, torch.Tensor]


class Int4Grid:
    """W4A16: a float scale and offset per group (`rtn.fit_groups`), w = q * scale + offset."""

    def __init__(
        self, w: torch.Tensor, scheme: Scheme, dtype: torch.dtype, clip_search: bool,
        channel_search: bool = False,
    ):  # fmt: skip
        if channel_search:
            raise ValueError("gptq_quantize_weight: channel_search is W4A8's (its s1 per row)")
        self.symmetric, self.dtype, self.clip_search = scheme.symmetric, dtype, clip_search

    def fit(self, w: torch.Tensor) -> GroupParams:
        """(scale, offset) of each group of w [N, ..., G]."""
        return fit_groups(w, self.symmetric, self.dtype, self.clip_search)

    def quantize(self, col: torch.Tensor, params: GroupParams) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, the values they stand for) of one column [N] with its group's params."""
        scales, offsets = params
        q = round_to_codes(col, scales, offsets)
        return q, q * scales + offsets

    def pack(self, codes: torch.Tensor, params: GroupParams) -> PackedInt4:
        scales, offsets = params
        return PackedInt4(
            qweight=pack_int4_along_k(codes),
            scales=scales.to(self.dtype).t().contiguous(),
            offsets=offsets.to(self.dtype).t().contiguous(),
            group_size=codes.shape[1] // scales.shape[1],
        )


class W4A8Grid:
    """W4A8 (QoQ progressive): s1 per row is fixed up front from the whole weight, as RTN
    fixes it; then each group's integer (s2, z) is fitted on w8 = round(w / s1) and a column
    rounds to q = clamp(round(w8 / s2) + z, 0, 15), standing for (q - z) * s2 * s1."""

    def __init__(
        self, w: torch.Tensor, scheme: Scheme, dtype: torch.dtype, clip_search: bool,
        channel_search: bool = False,
    ):  # fmt: skip
        g = scheme.group_size_for(w.shape[1])
        check_w4a8_shape("gptq_quantize_weight", w.shape[1], g)
        self.s1 = channel_scales_w4a8(w, g if channel_search else 0)
        self.clip_search = clip_search

    def fit(self, w: torch.Tensor) -> GroupParams:
        """(s2, z) of each group of w [N, ..., G], fitted on its int8 values."""
        return fit_w4a8_groups(to_int8(w, self.s1), self.clip_search)

    def quantize(self, col: torch.Tensor, params: GroupParams) -> tuple[torch.Tensor, torch.Tensor]:
        s2, z = params
        q = round_to_w4a8_codes(to_int8(col, self.s1), s2, z)
        return q, (q - z) * s2 * self.s1

    def pack(self, codes: torch.Tensor, params: GroupParams) -> PackedW4A8:
        s2, z = params
        return pack_w4a8(codes, s2, z, self.s1)


# The grid GPTQ rounds to, per `Scheme.name`.
GPTQ_GRIDS: dict[str, type[Int4Grid] | type[W4A8Grid]] = {"w4a16": Int4Grid, "w4a8": W4A8Grid}


def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: Scheme,
    dtype: torch.dtype | None = None,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    clip_search: bool = False,
    channel_search: bool = False,
) -> PackedInt4 | PackedW4A8:
    """GPTQ-quantize a [N, K] weight given its input Hessian [K, K] onto `scheme`'s grid; the
    result has RTN's layout (`PackedInt4` for W4A16, `PackedW4A8` for W4A8). `dtype` is
    W4A16's scale dtype (default: the weight's)."""
    n, k = weight.shape
    if tuple(hessian.shape) != (k, k):
        raise ValueError(
            f"gptq_quantize_weight: Hessian {tuple(hessian.shape)} does not match K={k}"
        )
    k0, k = k, scheme.padded_k(k)  # pad_k: columns k0.. meet zero inputs (H = 0 there)
    g = scheme.group_size_for(k)
    if k % g:
        raise ValueError(
            f"gptq_quantize_weight: K={k} is not divisible by group_size={g}; use a group size "
            "that divides K, or Scheme(pad_k=True) to pad K to whole groups"
        )
    dtype = dtype or weight.dtype
    w = pad_columns(weight.detach().to(torch.float32), k).clone()
    h = hessian.new_zeros((k, k), dtype=torch.float32)
    h[:k0, :k0] = hessian.detach().to(torch.float32)
    dead = torch.diag(h) == 0  # inputs never active: any value works, choose 0
    dead[k0:] = False  # ... but the padding keeps its copies of the last column (the range)
    h[dead, dead] = 1
    # The padding: decoupled from the real columns (zero off-diagonal), its diagonal at theirs
    # on average so the damping below stays the unpadded one.
    h[k0:, k0:] = torch.eye(k - k0) * torch.diag(h)[:k0].mean()
    w[:, dead] = 0
    grid = GPTQ_GRIDS[scheme.name](w, scheme, dtype, clip_search, channel_search)

    params = (torch.zeros(n, k // g), torch.zeros(n, k // g))
    if act_order:
        params = grid.fit(w.reshape(n, k // g, g))
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
                for p, fitted in zip(params, grid.fit(wb[:, i : i + g]), strict=True):
                    p[:, grp] = fitted
            q, value = grid.quantize(wb[:, i], tuple(p[:, grp] for p in params))
            codes[:, col] = q
            err = (wb[:, i] - value) / hb[i, i]
            wb[:, i:] -= err[:, None] * hb[i, i:][None, :]
            errs[:, i] = err
        w[:, b1:] -= errs @ hinv[b0:b1, b1:]
    return grid.pack(codes, params)


def gptq_quantizer(hessians: dict[str, torch.Tensor], **options):
    """A `quantize_` quantizer running GPTQ with each layer's Hessian onto the scheme's grid
    (None where a layer has none: `quantize_` then uses the scheme's RTN)."""

    def quantize(
        name: str, linear: torch.nn.Linear, scheme: Scheme
    ) -> PackedInt4 | PackedW4A8 | None:
        h = hessians.get(name)
        if h is None:
            return None
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
    channel_search: bool = False,
):
    """GPTQ every supported linear of `model` in place, block by block (each block calibrated
    on the outputs of the already-quantized blocks before it); linears outside the repeated
    blocks get RTN. With `awq`, each block first gets AWQ's scales folded in (then GPTQ
    rounds the scaled weights against the correspondingly scaled Hessians). W4A8's
    `channel_search` picks each row's s1 by `channel_scales_w4a8`'s search. Returns the
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
        quantizer = gptq_quantizer(
            hessians, act_order=act_order, clip_search=clip_search, channel_search=channel_search
        )
        report.records.extend(quantize_(block, config, quantizer, prefix=prefix).records)

    quantize_sequentially(model, batches, quantize_block, progress=progress)
    # the rest (lm_head skipped); the blocks' fallback linears are still nn.Linear and
    # would be listed a second time
    seen = {r.name for r in report.records}
    report.records.extend(r for r in quantize_(model, config).records if r.name not in seen)
    return report
