"""AutoAWQ GEMM checkpoints -> the qcompile int4 layout (`qcompile.quant.int4`).

AutoAWQ's GEMM layout (`"version": "gemm"`), for a linear W [N, K] with group size G:
    qweight: [K, N // 8]      int32, packed along N, 8 output columns per word in the
                              interleaved order AWQ_ORDER: nibble i (bits 4i..4i+3) of word
                              [k, c] holds column 8c + AWQ_ORDER[i]
    qzeros:  [K // G, N // 8] int32, the same packing
    scales:  [K // G, N]      fp16
    bias:    [N], when the layer has one
    w[n, k] = (q[k, n] - z[k // G, n]) * s[k // G, n]       (z in 0..15, stored as is)
Conversion: unpack to [K, N] codes and repack along K (`pack_int4_along_k`), keep the scales,
offsets = -z * s (`offsets_from_zero_points`, which documents the rounding).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qcompile.integrations import CheckpointError, ImportedLinear, check_tensor, resolve_group_size
from qcompile.quant.int4 import PackedInt4, offsets_from_zero_points, pack_int4_along_k

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column 8c + AWQ_ORDER[i]
# Where column j of a word sits: the nibble i with AWQ_ORDER[i] == j -> (0, 4, 1, 5, 2, 6, 3, 7).
_NIBBLE_OF_COLUMN = tuple(AWQ_ORDER.index(j) for j in range(8))


@dataclass(frozen=True)
class AwqFormat:
    """An AutoAWQ checkpoint's quantization settings (`quant_method: "awq"`)."""

    group_size: int  # -1: one group per output channel
    tensor_names = ("qweight", "qzeros", "scales")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> AwqFormat:
        """Read transformers' `quantization_config` (or AutoAWQ's `quant_config.json`)."""
        bits = config.get("bits", config.get("w_bit", 4))
        if bits != 4:
            raise CheckpointError(f"AWQ checkpoint with bits={bits}: only 4-bit is supported")
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise CheckpointError(
                f"AWQ checkpoint with version={version!r}: only the GEMM layout is supported "
                "(GEMV, GEMV-fast, Marlin and ExLlama pack differently); export with version='gemm'"
            )
        if not config.get("zero_point", True):
            raise CheckpointError(
                "AWQ checkpoint with zero_point=false: only zero-point (asymmetric) AWQ is supported"
            )
        return cls(int(config.get("group_size", config.get("q_group_size", 128))))

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
            raise CheckpointError(f"{prefix}: N={n} is not divisible by 8 (AWQ packs along N)")
        qweight = check_tensor(f"{prefix}.qweight", tensors["qweight"], (k, n // 8), "int32")
        qzeros = check_tensor(f"{prefix}.qzeros", tensors["qzeros"], (k // g, n // 8), "int32")
        scales = check_tensor(f"{prefix}.scales", tensors["scales"], (k // g, n), "float")
        codes = unpack_awq(qweight)  # [K, N]
        packed = PackedInt4(
            pack_int4_along_k(codes.t()),
            scales.to(dtype).contiguous(),
            offsets_from_zero_points(unpack_awq(qzeros), scales, dtype),
            g,
        )
        return ImportedLinear(packed, perm=None, symmetric=False)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """[R, N // 8] int32 in AWQ's interleaved order -> [R, N] uint8 codes, columns in order."""
    shifts = 4 * torch.tensor(_NIBBLE_OF_COLUMN, dtype=torch.int32, device=words.device)
    codes = (words.unsqueeze(-1) >> shifts) & 0xF  # [R, N // 8, 8]: [r, c, j] is column 8c + j
    return codes.reshape(words.shape[0], -1).to(torch.uint8)
