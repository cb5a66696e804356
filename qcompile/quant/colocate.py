"""Co-located packed storage: sibling layers' tensors as column slices of one tensor.

Layout: the packed tensors of layers 1..L that read the same input (q/k/v, gate/up) become
views of one tensor per kind, concatenated along the last (N) dimension in layer order:
    qweight_i = base_qweight[:, c_i : c_i + N_i]    base_qweight: [K // 8, N_1 + ... + N_L]
and likewise scales / offsets ([K // G, sum N]) and bias ([sum N]). Each view keeps unit column
stride and the base's row stride, which the op contract accepts (`ops/w4a16.check_packed_strides`);
`spanning_view` recovers the [rows, sum N] base from the views, so one launch can compute every
sibling's output without copying a weight (`qcompile.passes.fuse`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


def colocated_views(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`tensors` (same leading shape, dtype, device) copied once into one tensor along the last
    dimension, returned as views of it in the same order."""
    base = torch.cat([t.detach() for t in tensors], dim=-1)
    starts = [0]
    for t in tensors[:-1]:
        starts.append(starts[-1] + t.shape[-1])
    return [base.narrow(-1, s, t.shape[-1]) for s, t in zip(starts, tensors, strict=True)]


def spanning_view(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The view covering all of `tensors` when they are adjacent column slices of one storage
    in this order (tensor i + 1 starts where tensor i ends), else None. 1-D or 2-D tensors."""
    first = tensors[0]
    if first.is_meta or first.dim() not in (1, 2) or first.numel() == 0:
        return None
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for t in tensors:
        same_layout = (
            t.device == first.device
            and t.dtype == first.dtype
            and t.shape[:-1] == first.shape[:-1]
            and t.stride() == first.stride()
            and (t.shape[-1] == 1 or t.stride(-1) == 1)
        )
        if not same_layout or t.untyped_storage().data_ptr() != storage:
            return None
        if t.storage_offset() != offset:
            return None
        offset += t.shape[-1]
    n_total = offset - first.storage_offset()
    stride = (*first.stride()[:-1], 1)
    if first.dim() == 2 and first.shape[0] > 1 and stride[0] < n_total:
        return None  # the rows of the span would overlap: not slices of one row-major tensor
    return first.as_strided((*first.shape[:-1], n_total), stride, first.storage_offset())


@dataclass
class _Conversion:
    """The members of one co-located group converted so far by one conversion function."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    # column start in the base -> (module, its converted tensors, in `names` order)
    members: dict[int, tuple[weakref.ref, list[torch.Tensor]]] = field(default_factory=dict)


def convert_colocated(
    module: torch.nn.Module, names: Sequence[str], fn: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """Apply a `Module._apply` conversion (`.to()`, `.half()`, `.cuda()`) to the co-located
    buffers `names` of `module` (column slices of one base per name, same members), keeping
    the layout: each becomes a contiguous copy of `fn(view)` (so the module is consistent on
    its own), and once every member of the group has been converted by the same `fn` (one
    `Module.to()` call passes one `fn` to every module) the copies are joined into one tensor
    per name and every member's buffers become its slices again. Members converted by
    different calls (layer by layer) keep their own copies, which `colocate_siblings` joins.
    Peak extra memory: one group."""
    views = [module._buffers[name] for name in names]
    converted = [fn(v).contiguous() for v in views]
    for name, tensor in zip(names, converted, strict=True):
        module._buffers[name] = tensor
    base = views[0]._base
    if base is None or not base.is_contiguous() or base.shape[:-1] != views[0].shape[:-1]:
        return
    conversion = getattr(base, "_qcompile_conversion", None)
    if conversion is None or conversion.fn is not fn:
        conversion = base._qcompile_conversion = _Conversion(fn)
    conversion.members[views[0].storage_offset() - base.storage_offset()] = (
        weakref.ref(module),
        converted,
    )
    starts = sorted(conversion.members)
    widths = [conversion.members[c][1][0].shape[-1] for c in starts]
    ends = [c + w for c, w in zip(starts, widths, strict=True)]
    if starts[0] != 0 or starts[1:] != ends[:-1] or ends[-1] != base.shape[-1]:
        return  # not every member converted yet
    del base._qcompile_conversion
    members = [conversion.members[c] for c in starts]
    owners = [owner() for owner, _ in members]
    if any(
        m is None or any(m._buffers.get(n) is not t for n, t in zip(names, tensors, strict=True))
        for m, (_, tensors) in zip(owners, members, strict=True)
    ):
        return  # a member was replaced or converted again meanwhile: leave the copies
    for i, name in enumerate(names):
        joined = colocated_views([tensors[i] for _, tensors in members])
        for m, view in zip(owners, joined, strict=True):
            m._buffers[name] = view
