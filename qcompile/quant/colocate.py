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

import types
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


def column_slice_geometry(t: torch.Tensor) -> tuple[int, int] | None:
    """(first column, total columns) of `t` as a column slice of a row-major tensor that fills
    its storage from offset 0 (the layout above), or None where `t` is its whole storage or laid
    out otherwise. Read from strides and the storage, so it holds for views, deep copies and
    loaded tensors alike. 1-D (bias) or 2-D."""
    if t.dim() not in (1, 2) or t.numel() == 0 or (t.shape[-1] > 1 and t.stride(-1) != 1):
        return None
    total = t.untyped_storage().nbytes() // t.element_size()
    rows = t.shape[0] if t.dim() == 2 else 1
    width = t.stride(0) if rows > 1 else total
    start = t.storage_offset()
    if width * rows != total or t.shape[-1] >= width or start + t.shape[-1] > width:
        return None
    return start, width


@dataclass
class _Conversion:
    """The members of one co-located group converted so far by one conversion function."""

    width: int
    # first column -> (columns, module, its converted tensors in `names` order), the last two
    # held weakly: a group that never completes keeps nothing alive
    members: dict[int, tuple[int, weakref.ref, list[weakref.ref]]] = field(default_factory=dict)


def convert_colocated(
    module: torch.nn.Module, names: Sequence[str], fn: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """Apply a `Module._apply` conversion (`.to()`, `.half()`, `.cuda()`) to `module`'s buffers
    `names` (co-located with the same siblings, `column_slice_geometry`), keeping the layout.

    Each buffer becomes a contiguous copy of `fn(buffer)` (so the module is consistent on its
    own: the op needs one row stride for all of them), and once every member of the group has
    been converted by the same `fn` (one `Module.to()` call passes one fresh function to every
    module), the copies are joined into one tensor per name and each member's buffers become
    its slices again. The groups in progress live on `fn` itself and die with it. Members
    converted by different calls (layer by layer) keep their own copies: `colocate_siblings`
    joins them. A conversion that changes nothing copies nothing. Peak extra memory: one
    group."""
    tensors = [module._buffers[name] for name in names]
    converted = [fn(t) for t in tensors]
    if all(c is t for c, t in zip(converted, tensors, strict=True)):
        return
    geometry = {column_slice_geometry(t) for t in tensors}
    converted = [c.contiguous() for c in converted]
    for name, c in zip(names, converted, strict=True):
        module._buffers[name] = c
    # a bound method's attributes are its function's, shared by every call: no memo there
    state = None if isinstance(fn, types.MethodType) else getattr(fn, "__dict__", None)
    if len(geometry) != 1 or None in geometry or not isinstance(state, dict):
        return
    groups = state.setdefault("_qcompile_colocated", {})
    (start, width), key = geometry.pop(), tensors[0].untyped_storage().data_ptr()
    group = groups.setdefault(key, _Conversion(width))
    refs = [weakref.ref(c) for c in converted]
    group.members[start] = (converted[0].shape[-1], weakref.ref(module), refs)
    starts = sorted(group.members)
    ends = [c + group.members[c][0] for c in starts]
    if starts[0] != 0 or starts[1:] != ends[:-1] or ends[-1] != group.width:
        return  # not every member converted yet
    del groups[key]
    owners = [group.members[c][1]() for c in starts]
    pieces = [[ref() for ref in group.members[c][2]] for c in starts]
    for m, ts in zip(owners, pieces, strict=True):
        if m is None or any(m._buffers.get(n) is not t for n, t in zip(names, ts, strict=True)):
            return  # a member was freed, replaced or converted again meanwhile: keep the copies
    columns = [[ts[i] for ts in pieces] for i in range(len(names))]
    if any(len({(t.dtype, t.device) for t in column}) != 1 for column in columns):
        return  # mixed conversions: joining all names or none keeps each module consistent
    for name, column in zip(names, columns, strict=True):
        for m, view in zip(owners, colocated_views(column), strict=True):
            m._buffers[name] = view
