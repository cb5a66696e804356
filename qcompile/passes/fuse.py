"""Sibling fusion: quantized linears that read the same input and co-located weights -> one op.

Runs after `rewrite_linears`, on its output. vLLM's fused QKV / gate-up GEMMs, found in any
model, without a second copy of the weights.

Match: calls of a fusable op (`LinearScheme.fusable_ops`: `qcompile::w4a16_linear`) with the
same activation node(s) and the same non-tensor arguments (group size), whose packed tensors
are graph inputs holding adjacent column slices of one storage per kind (layout:
`qcompile.quant.colocate`): siblings co-located by `quantize_` (`colocate_siblings`), or packed
together by `rewrite_linears` (`colocate_sibling_packs`). A fused run is adjacent slices of
calls that all have a bias or all have none; calls on other inputs, with other group sizes or
dtypes, or whose slices are not adjacent stay as they are.
Rewrite: one op call on views spanning the group (`spanning_view`, added as graph inputs: no
weight is copied) and a concatenated bias (a view too when the biases are co-located), then
`narrow` of its output along N for each original call's users. Records: each member's
`LayerRecord.fused_with` names the others and `fused_n` the launch's N.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from torch.fx import GraphModule, Node

from qcompile.config import QuantConfig
from qcompile.passes.linear import (
    LINEAR_SCHEMES,
    RECORD_META,
    GraphConstants,
    LinearScheme,
    layer_name,
)
from qcompile.quant.colocate import spanning_view
from qcompile.report import CompileReport


@dataclasses.dataclass
class Member:
    """One op call of a candidate group: its node, where its arguments sit, their tensors."""

    node: Node
    n_act: int  # leading activation arguments
    tensor_names: tuple[str, ...]  # the packed tensors after them (`LinearScheme.tensor_names`)
    tensors: list[torch.Tensor]  # their real values, op order
    bias: torch.Tensor | None

    @property
    def n(self) -> int:
        return self.tensors[0].shape[-1]

    @property
    def n_tensors(self) -> int:
        return len(self.tensor_names)

    @property
    def bias_node(self) -> Node | None:
        return self.node.args[self.n_act + self.n_tensors]


def _fusable_ops() -> dict[Any, tuple[LinearScheme, int]]:
    return {
        op: (lowering, n_act)
        for lowering in LINEAR_SCHEMES.values()
        for op, n_act in lowering.fusable_ops.items()
    }


def _member(node: Node, lowering: LinearScheme, n_act: int, real: dict[Node, Any]) -> Member | None:
    """`node` as a candidate, or None when a packed tensor or the bias is not a graph input."""
    n_tensors = len(lowering.tensor_names)
    if node.kwargs or len(node.args) <= n_act + n_tensors:
        return None  # not the positional call the passes and modules emit
    tensor_nodes = node.args[n_act : n_act + n_tensors]
    bias_node = node.args[n_act + n_tensors]
    values = [real.get(t) if isinstance(t, Node) else None for t in (*tensor_nodes, bias_node)]
    if not all(isinstance(v, torch.Tensor) for v in values[:-1]):
        return None
    if bias_node is not None and not isinstance(values[-1], torch.Tensor):
        return None
    return Member(node, n_act, lowering.tensor_names, values[:-1], values[-1])


def find_sibling_groups(gm: GraphModule, real: dict[Node, Any]) -> list[list[Member]]:
    """Groups (>= 2, in column order) of fusable calls with the same activations and arguments
    whose packed tensors are adjacent column slices of one storage per kind."""
    fusable = _fusable_ops()
    buckets: dict[tuple, list[Member]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in fusable:
            continue
        member = _member(node, *fusable[node.target], real)
        if member is None:
            continue
        acts = node.args[: member.n_act]
        rest = node.args[member.n_act + member.n_tensors + 1 :]
        storages = tuple(
            (t.untyped_storage().data_ptr(), t.dtype, t.device, t.stride()) for t in member.tensors
        )
        key = (node.target, acts, rest, member.bias is None, storages)
        buckets.setdefault(key, []).append(member)
    groups = []
    for members in buckets.values():
        members.sort(key=lambda m: m.tensors[0].storage_offset())
        run: list[Member] = []
        for m in members:
            if run and not _adjacent(run[-1], m):
                groups.extend([run] if len(run) > 1 else [])
                run = []
            run.append(m)
        groups.extend([run] if len(run) > 1 else [])
    return groups


def _adjacent(a: Member, b: Member) -> bool:
    """b's packed tensors start where a's end, for every kind."""
    return all(
        spanning_view([ta, tb]) is not None for ta, tb in zip(a.tensors, b.tensors, strict=True)
    )


def fuse_sibling_linears(
    gm: GraphModule,
    inputs: list,
    config: QuantConfig,
    report: CompileReport,
    constants: GraphConstants,
) -> GraphModule:
    """Replace each group of co-located sibling op calls of `gm` (in place) by one call."""
    if not config.fuse_siblings:
        return gm
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    values = [*inputs, *constants.tensors]
    assert len(values) == len(placeholders), "graph inputs and constants out of step"
    real = dict(zip(placeholders, values, strict=True))
    autograd = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in inputs
    )
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for group in find_sibling_groups(gm, real):
        spans = [spanning_view([m.tensors[i] for m in group]) for i in range(group[0].n_tensors)]
        if any(span is None for span in spans):
            continue  # pairwise adjacent, yet the span's rows would overlap: not one tensor
        names = _layer_names(report, group)
        tag = "fused_" + re.sub(r"\W", "_", names[0])
        _fuse(gm, group, spans, tag, constants, order, autograd)
        _record(report, group, names)
    gm.graph.lint()
    gm.recompile()
    return gm


def _fuse(
    gm: GraphModule,
    group: list[Member],
    spans: list[torch.Tensor],
    tag: str,
    constants: GraphConstants,
    order: dict[Node, int],
    autograd: bool,
) -> None:
    """One call of the op on `spans`, narrowed along N for each member's users."""
    first = group[0]
    nodes = {m.node for m in group}
    assert not any(u in nodes for m in group for u in m.node.users), "a sibling reads another"
    tensor_nodes = [
        constants.add(gm, f"{tag}_{name}", span)
        for name, span in zip(first.tensor_names, spans, strict=True)
    ]
    earliest = min((m.node for m in group), key=order.__getitem__)
    with gm.graph.inserting_before(earliest):
        bias = _fused_bias(gm, group, constants, tag, autograd)
        args = first.node.args
        acts, rest = args[: first.n_act], args[first.n_act + first.n_tensors + 1 :]
        fused = gm.graph.call_function(first.node.target, (*acts, *tensor_nodes, bias, *rest))
        fused.meta.update({k: v for k, v in first.node.meta.items() if k != "example_value"})
        fused.meta.pop(RECORD_META, None)
        pieces, start = [], 0
        for m in group:
            pieces.append(gm.graph.call_function(torch.narrow, (fused, -1, start, m.n)))
            start += m.n
    for m, piece in zip(group, pieces, strict=True):  # erased after inserting before one
        piece.meta.update({k: v for k, v in m.node.meta.items() if k != "example_value"})
        m.node.replace_all_uses_with(piece)
        gm.graph.erase_node(m.node)
        _view_users_reshape(piece)


def _fused_bias(gm, group, constants, tag, autograd) -> Node | None:
    """The group's bias: None, a view of co-located biases, an in-graph concatenation (when
    autograd needs their gradients) or a concatenated copy (one small tensor per group)."""
    biases = [m.bias for m in group]
    if biases[0] is None:
        return None
    span = spanning_view(biases)
    if span is not None:
        return constants.add(gm, f"{tag}_bias", span)
    if autograd and any(b.requires_grad for b in biases):
        return gm.graph.call_function(torch.cat, ([m.bias_node for m in group], -1))
    return constants.add(gm, f"{tag}_bias", torch.cat([b.detach() for b in biases], -1))


def _view_users_reshape(piece: Node) -> None:
    """A narrowed output is not contiguous (its row stride is the group's N): its `.view(...)`
    users become `.reshape(...)`, which is the same view where one exists and a copy otherwise."""
    for user in list(piece.users):
        is_view = user.op == "call_method" and user.target == "view" and user.args[0] is piece
        if is_view and not any(isinstance(a, torch.dtype) for a in user.args[1:]):
            user.target = "reshape"


def _layer_names(report: CompileReport, group: list[Member]) -> list[str]:
    return [
        report.records[m.node.meta[RECORD_META]].name
        if RECORD_META in m.node.meta
        else layer_name(m.node, m.node.args[m.n_act])
        for m in group
    ]


def _record(report: CompileReport, group: list[Member], names: list[str]) -> None:
    """Name the other members and the launch's N on each member's LayerRecord."""
    n_total = sum(m.n for m in group)
    for i, m in enumerate(group):
        index = m.node.meta.get(RECORD_META)
        if index is None:
            continue
        others = (*names[:i], *names[i + 1 :])
        report.records[index] = dataclasses.replace(
            report.records[index], fused_with=others, fused_n=n_total
        )
