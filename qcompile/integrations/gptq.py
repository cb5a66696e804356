"""GPTQ checkpoints (AutoGPTQ, GPTQModel, optimum) -> the qcompile int4 layout.

The GPTQ layout, for a linear W [N, K] with group size G (-1: G = K), 4 bits, int32 words:
    qweight: [K // 8, N]      int32, packed along K, low nibble first: our layout as is
    qzeros:  [K // G, N // 8] int32, packed along N, low nibble first (no interleave)
    scales:  [K // G, N]      fp16
    g_idx:   [K]              int32, the group of each input feature (k // G without act-order)
    bias:    [N], when the layer has one
    w[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]
with z = stored + 1 for `checkpoint_format: "gptq"` (v1, the default: AutoGPTQ and GPTQModel
store z - 1) and z = stored for `"gptq_v2"`. Symmetric checkpoints (`sym: true`) have z = 8.

Act-order (`desc_act`) checkpoints quantize K in the order of decreasing Hessian diagonal, so
group g holds the features {k : g_idx[k] == g}, scattered along K. Our kernels read a group
as G consecutive features, so the importer regroups: perm = argsort(g_idx) (stable) puts every
group's features side by side, the codes' K columns are permuted by perm and repacked, and
`W4A16Linear` gathers x[..., perm] before the op. This is exact, W x = W[:, perm] x[perm],
and costs one gather of K activations per token and layer; the weight stays read once, in
order. (`desc_act` with `static_groups` stores g_idx = k // G and needs no permutation.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qcompile.integrations import CheckpointError, ImportedLinear, check_tensor, resolve_group_size
from qcompile.quant.int4 import (
    PackedInt4,
    offsets_from_zero_points,
    pack_int4_along_k,
    unpack_int4_along_k,
)

# checkpoint_format -> what is added to the stored zero point
ZERO_POINT_OFFSET = {"gptq": 1, "gptq_v2": 0}
SYMMETRIC_ZERO_POINT = 8


@dataclass(frozen=True)
class GptqFormat:
    """A GPTQ checkpoint's quantization settings (`quant_method: "gptq"`)."""

    group_size: int  # -1: one group per output channel
    zero_offset: int  # added to the stored zero points (ZERO_POINT_OFFSET)
    symmetric: bool
    tensor_names = ("qweight", "qzeros", "scales", "g_idx")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> GptqFormat:
        """Read transformers' `quantization_config` (or `quantize_config.json`)."""
        bits = config.get("bits", 4)
        if bits != 4:
            raise CheckpointError(f"GPTQ checkpoint with bits={bits}: only 4-bit is supported")
        fmt = str(config.get("checkpoint_format", config.get("format", "gptq"))).lower()
        if config.get("is_marlin_format") or fmt not in ZERO_POINT_OFFSET:
            fmt = "marlin" if config.get("is_marlin_format") else fmt
            raise CheckpointError(
                f"GPTQ checkpoint_format={fmt!r} is not supported; "
                f"use one of {sorted(ZERO_POINT_OFFSET)}"
            )
        pack_dtype = str(config.get("pack_dtype", "int32")).removeprefix("torch.")
        if pack_dtype != "int32":
            raise CheckpointError(f"GPTQ checkpoint with pack_dtype={pack_dtype}: only int32")
        if config.get("dynamic"):
            raise CheckpointError(
                "GPTQ checkpoint with per-module `dynamic` overrides is not supported"
            )
        return cls(
            int(config.get("group_size", 128)),
            ZERO_POINT_OFFSET[fmt],
            bool(config.get("sym", True)),
        )

    def convert(
        self,
        prefix: str,
        tensors: Mapping[str, torch.Tensor | None],
        k: int,
        n: int,
        dtype: torch.dtype,
    ) -> ImportedLinear:
        """The layer `prefix` ([N, K]) in our layout, scales and offsets stored in `dtype`."""
        g = resolve_group_size(prefix, self.group_size, k)
        if n % 8:
            raise CheckpointError(f"{prefix}: N={n} is not divisible by 8 (qzeros pack along N)")
        qweight = check_tensor(f"{prefix}.qweight", tensors["qweight"], (k // 8, n), "int32")
        qzeros = check_tensor(f"{prefix}.qzeros", tensors["qzeros"], (k // g, n // 8), "int32")
        scales = check_tensor(f"{prefix}.scales", tensors["scales"], (k // g, n), "float")
        zeros = unpack_along_n(qzeros).to(torch.int32) + self.zero_offset
        if self.symmetric and (zeros != SYMMETRIC_ZERO_POINT).any():
            found = sorted(set(zeros.unique().tolist()) - {SYMMETRIC_ZERO_POINT})[:4]
            raise CheckpointError(
                f"{prefix}.qzeros: sym=true needs zero points of {SYMMETRIC_ZERO_POINT}, found "
                f"{found} with checkpoint_format={_format_name(self.zero_offset)!r}; is the "
                "checkpoint_format (gptq = stored z - 1, gptq_v2 = stored z) right?"
            )
        perm = None
        if tensors.get("g_idx") is not None:
            g_idx = check_tensor(f"{prefix}.g_idx", tensors["g_idx"], (k,), "int").to(torch.int64)
            perm = _regrouping(f"{prefix}.g_idx", g_idx, g)
        if perm is not None:
            qweight = pack_int4_along_k(unpack_int4_along_k(qweight)[:, perm])
        packed = PackedInt4(
            qweight.contiguous(),
            scales.to(dtype).contiguous(),
            offsets_from_zero_points(zeros, scales, dtype),
            g,
        )
        return ImportedLinear(packed, perm=perm, symmetric=self.symmetric)


def unpack_along_n(words: torch.Tensor) -> torch.Tensor:
    """[R, N // 8] int32, low nibble first along N -> [R, N] uint8 codes."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & 0xF).reshape(words.shape[0], -1).to(torch.uint8)


def _regrouping(name: str, g_idx: torch.Tensor, g: int) -> torch.Tensor | None:
    """None when g_idx is k // G; else the K permutation that makes every group contiguous."""
    k = g_idx.numel()
    if torch.equal(g_idx, torch.arange(k, device=g_idx.device) // g):
        return None
    groups = k // g
    counts = torch.bincount(g_idx.clamp(0, groups), minlength=groups + 1)
    if g_idx.min() < 0 or g_idx.max() >= groups or (counts[:groups] != g).any():
        raise CheckpointError(
            f"{name}: every group index 0..{groups - 1} must occur exactly G={g} times "
            f"(got min={g_idx.min().item()}, max={g_idx.max().item()}, counts "
            f"{sorted(set(counts[:groups].tolist()))})"
        )
    return torch.argsort(g_idx, stable=True)


def _format_name(zero_offset: int) -> str:
    return next(name for name, off in ZERO_POINT_OFFSET.items() if off == zero_offset)
