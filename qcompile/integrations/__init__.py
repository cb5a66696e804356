"""Other libraries' formats -> qcompile: AutoAWQ (`awq.py`) and GPTQ (`gptq.py`) checkpoints.

Each importer turns one quantized linear's tensors into an `ImportedLinear` in the layout of
`qcompile.quant.int4`; `qcompile.checkpoint.import_checkpoint` reads the files and builds the
model. This module holds what both importers share: the error type and the tensor check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.quant.int4 import PackedInt4


class CheckpointError(ValueError):
    """A checkpoint that cannot be saved, loaded or imported; the message names the tensor."""


@dataclass(frozen=True)
class ImportedLinear:
    """One converted layer: the packed weight, its K permutation (act-order) and symmetry."""

    packed: PackedInt4
    perm: torch.Tensor | None  # [K] int64: packed input feature j is original feature perm[j]
    symmetric: bool


def check_tensor(
    name: str, tensor: torch.Tensor | None, shape: tuple[int, ...], kind: str
) -> torch.Tensor:
    """`tensor` if it exists with `shape` and a dtype of `kind` ("int32", "int" or "float")."""
    if tensor is None:
        raise CheckpointError(f"{name}: missing tensor, expected {list(shape)} {kind}")
    dtype_ok = {
        "int32": tensor.dtype == torch.int32,
        "int": not tensor.is_floating_point() and tensor.dtype != torch.bool,
        "float": tensor.is_floating_point(),
    }[kind]
    if tuple(tensor.shape) != shape or not dtype_ok:
        raise CheckpointError(
            f"{name}: expected {list(shape)} {kind}, got {list(tensor.shape)} "
            f"{str(tensor.dtype).removeprefix('torch.')}"
        )
    return tensor


def resolve_group_size(prefix: str, group_size: int, k: int) -> int:
    """The group size along K of one layer (-1 means one group per output channel)."""
    g = k if group_size == -1 else group_size
    if g <= 0 or k % g:
        raise CheckpointError(
            f"{prefix}: K={k} is not divisible by group_size={group_size}; the int4 layout "
            "needs whole groups along K"
        )
    return g
