"""Linear pass: `torch._C._nn.linear(x, W, b)` with a parameter W -> the scheme's op.

Match: every `linear` call whose weight is a graph input (a parameter, as Dynamo lifts them).
Check: skip patterns, then `unsupported_reason` (shape, dtype, device); a failing layer is
left as it was and recorded as a fallback (or raised, with on_unsupported="raise").
Rewrite: quantize W once (cached per tensor and version, so shared weights and recompiles
reuse it), feed the packed tensors in as extra trailing graph inputs, and emit the op of
`config.scheme.name` from the `LINEAR_SCHEMES` registry. W4A8 also puts the per-token
activation quantization in front of its op as plain torch ops, once per input, so Inductor
fuses it into the producer of x (an RMSNorm, SiLU * mul); the report says where that happens.
W4A16 does the same with the plane-major order of x its small-M kernels read
(`QuantConfig.plane_major_x`).
With `config.fuse_siblings`, the weights of linears reading one input are first packed as
column slices of one tensor per kind (`colocate_sibling_packs`), which `passes/fuse.py` then
runs as one launch.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node
from torch.utils.weak import WeakIdKeyDictionary

from qcompile.config import QuantConfig, Scheme
from qcompile.ops import w4a8 as w4a8_ops
from qcompile.ops import w4a16 as w4a16_ops
from qcompile.quant.colocate import colocated_views, spanning_view
from qcompile.quant.int4 import PLANE_CHUNK, to_planes
from qcompile.quant.rtn import quantize_weight_int4
from qcompile.quant.w4a8 import (
    absmax_chunks,
    quantize_activations_per_token,
    quantize_weight_w4a8,
)
from qcompile.report import CompileReport, LayerRecord

LINEAR_TARGETS = (torch._C._nn.linear, F.linear)
EMBEDDING_TARGETS = (F.embedding, torch.embedding, torch.ops.aten.embedding.default)
W4A16_OP = torch.ops.qcompile.w4a16_linear.default
W4A16_TARGETS = (W4A16_OP, torch.ops.qcompile.w4a16_linear)
W4A8_OP = torch.ops.qcompile.w4a8_linear.default
W4A8_QUANTIZED_ACT_OP = torch.ops.qcompile.w4a8_linear_quantized_act.default
W4A8_TARGETS = (W4A8_OP, torch.ops.qcompile.w4a8_linear)
# Node meta key: index of the op node's LayerRecord in the graph's report (for passes/fuse.py).
RECORD_META = "qcompile_record"


class UnsupportedLayerError(ValueError):
    """A layer the kernels cannot take, raised when QuantConfig.on_unsupported == 'raise'."""


def unsupported_reason(
    shape: tuple[int, ...], dtype: torch.dtype, device_type: str, scheme: Scheme
) -> str | None:
    """Why a weight of `shape`/`dtype` on `device_type` cannot use `scheme`, with the fix."""
    lowering = LINEAR_SCHEMES[scheme.name]
    label = scheme.name.upper()
    if len(shape) != 2:
        return f"weight has shape {tuple(shape)}, expected [N, K]"
    if not dtype.is_floating_point:
        return f"weight dtype {dtype} is not a float type"
    k = scheme.padded_k(shape[1])  # as stored: with pad_k, whole groups
    # K's own limits first: no group size fixes them, so none is suggested.
    if k % 8:
        return f"K={k} is not a multiple of 8 (int4 packing); skip this module"
    if device_type == "cuda" and k % lowering.k_multiple:
        return f"K={k} is not a multiple of {lowering.k_multiple} (kernel tile); skip this module"
    g = scheme.group_size_for(k)
    if k % g:
        fits = [s for s in (64, 32) if s < g and k % s == 0]
        fix = f"use group_size={fits[0]}" if fits else "use group_size=None (per-channel)"
        return (
            f"K={k} is not divisible by group_size={g}; {fix}, Scheme(pad_k=True) (K padded to "
            f"whole groups) or skip this module"
        )
    if device_type == "cuda":
        if dtype not in lowering.kernel_dtypes:
            return (
                f"{dtype} on CUDA: the {label} kernels take float16/bfloat16 activations; "
                "cast the model with .half() or .to(torch.bfloat16)"
            )
    elif device_type != "cpu":
        return f"device {device_type} has no {label} kernel; use CUDA or CPU"
    return None


def execution_path(weight: torch.Tensor) -> str:
    return "triton" if weight.is_cuda else "reference"


# Packed weights per source tensor, reused across graphs and recompiles while the tensor
# lives and is not modified in place (its version counter is part of the entry).
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def packed_weight(weight: torch.Tensor, scheme: Scheme) -> Any:
    """The scheme's packed weight (`PackedInt4`, `PackedW4A8`), quantized once per version."""
    entry = _PACKED.get(weight)
    if entry is not None and entry[0] == weight._version and entry[1] == scheme:
        return entry[2]
    packed = LINEAR_SCHEMES[scheme.name].quantize(weight, scheme)
    _PACKED[weight] = (weight._version, scheme, packed)
    return packed


def colocate_sibling_packs(layers: list[tuple[Node, torch.Tensor]], scheme: Scheme) -> None:
    """Pack the weights of sibling linears (same input node, dtype and device; each weight
    used by one of `layers` only) as column slices of one tensor per kind, in graph order,
    so that `passes/fuse.py` can run them as one launch. The packs stay in the `packed_weight`
    cache: a recompile finds them co-located and copies nothing."""
    uses: dict[int, int] = {}
    for _, weight in layers:
        uses[id(weight)] = uses.get(id(weight), 0) + 1
    groups: dict[tuple, list[torch.Tensor]] = {}
    for node, weight in layers:
        if uses[id(weight)] == 1:
            groups.setdefault((node.args[0], weight.dtype, weight.device), []).append(weight)
    for weights in groups.values():
        if len(weights) > 1:
            colocate_packed_weights(weights, scheme)


def colocate_packed_weights(weights: list[torch.Tensor], scheme: Scheme) -> None:
    """Re-home the cached packs of `weights` as views of one tensor per kind (layout:
    `qcompile.quant.colocate`), unless they already are; the separate packs leave the cache."""
    names = LINEAR_SCHEMES[scheme.name].tensor_names
    packs = [packed_weight(w, scheme) for w in weights]
    kinds = list(zip(*(p.tensors() for p in packs), strict=True))
    if all(spanning_view(tensors) is not None for tensors in kinds):
        return
    views = [colocated_views(tensors) for tensors in kinds]
    for i, (weight, packed) in enumerate(zip(weights, packs, strict=True)):
        fields = {name: kind[i] for name, kind in zip(names, views, strict=True)}
        _PACKED[weight] = (weight._version, scheme, dataclasses.replace(packed, **fields))


@dataclass
class GraphConstants:
    """Tensors the rewritten graph takes as extra trailing inputs, in placeholder order."""

    tensors: list[torch.Tensor] = field(default_factory=list)

    def add(self, gm: GraphModule, name: str, tensor: torch.Tensor) -> Node:
        last = list(gm.graph.find_nodes(op="placeholder"))[-1]
        with gm.graph.inserting_after(last):
            node = gm.graph.placeholder(f"qc_{name}_{len(self.tensors)}")
        # Dynamo-graph metadata: no user source, and static (weights) for CUDA graphs.
        node._dynamo_source = None
        node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
        node.meta["example_value"] = tensor
        self.tensors.append(tensor)
        return node


_SOURCE_ATTR = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]")
# The compiled function's argument the path starts from: `L['self']`, `L['model']`, or an item
# of a variadic argument, `L['args'][0]` (transformers >= 5.24 calls the model that way).
_SOURCE_ROOT = re.compile(r"^L\['[^']+'\](?:\[\d+\])*\.?")


def _param_fqn(source_name: str) -> str:
    """`L['self']._modules['a']._parameters['weight']` -> `a.weight`."""
    path = _SOURCE_ROOT.sub("", _SOURCE_ATTR.sub(r".\1", source_name))
    return re.sub(r"\[(\d+)\]", r".\1", path).strip(".")


def module_path(node: Node) -> str | None:
    """The innermost module of `node` in Dynamo's nn_module_stack (`model.embed_tokens`)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    return _SOURCE_ROOT.sub("", list(stack.values())[-1][0])


def layer_name(node: Node, weight_node: Node) -> str:
    """The module path of a linear node: its nn.Linear in nn_module_stack, else its weight's."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        _, cls = list(stack.values())[-1]
        if isinstance(cls, type) and (
            issubclass(cls, torch.nn.Linear) or hasattr(cls, "from_linear")
        ):
            return module_path(node)
    source = getattr(weight_node, "_dynamo_source", None)
    if source is not None:
        return _param_fqn(source.name).rpartition(".")[0] or _param_fqn(source.name)
    return weight_node.name


def tied_embeddings(w_node: Node) -> list[str]:
    """Embeddings reading the same weight placeholder as a linear (a tied `lm_head`)."""
    return [
        module_path(u) or u.name
        for u in w_node.users
        if u.op == "call_function" and u.target in EMBEDDING_TARGETS
    ]


def find_linears(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LINEAR_TARGETS]


@dataclass
class RewriteContext:
    """Per-graph state of one rewrite: whether autograd will trace the graph, and the
    activations already quantized (one quantization per (input node, act dtype)) or
    permuted plane-major (one permutation per input node)."""

    autograd: bool
    plane_major_x: bool = False
    quantized_inputs: dict[tuple[Node, str], tuple[Node, Node, str]] = field(default_factory=dict)
    planes_inputs: dict[Node, tuple[Node | None, str]] = field(default_factory=dict)
    padded_inputs: dict[tuple[Node, int], Node] = field(default_factory=dict)


def rewrite_linears(
    gm: GraphModule,
    inputs: list,
    config: QuantConfig,
    report: CompileReport,
    constants: GraphConstants,
) -> GraphModule:
    """Rewrite every supported linear of `gm` (in place) into the scheme's op; record all."""
    placeholders = {n: i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))}
    lowering = LINEAR_SCHEMES[config.scheme.name]
    # AOT autograd traces a backward exactly when grad mode is on and an input requires grad.
    ctx = RewriteContext(
        autograd=torch.is_grad_enabled()
        and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs),
        plane_major_x=config.plane_major_x,
    )
    # Decide every linear first (a record, or None: quantize it), so that siblings can be
    # packed together before any is emitted; records keep graph order.
    decisions: list[tuple[Node, LayerRecord | None, torch.Tensor | None]] = []
    for node in find_linears(gm):
        w_node = node.args[1]
        weight = inputs[placeholders[w_node]] if w_node in placeholders else None
        name = layer_name(node, w_node)
        record = None
        if not isinstance(weight, torch.Tensor):
            record = LayerRecord(name, (0, 0), "skipped", "weight is computed inside the graph")
        elif config.skips(name):
            shape = (weight.shape[0], weight.shape[-1])
            record = LayerRecord(name, shape, "skipped", "matches a skip pattern")
        elif (
            reason := unsupported_reason(
                tuple(weight.shape), weight.dtype, weight.device.type, config.scheme
            )
        ) is not None:
            if config.on_unsupported == "raise":
                raise UnsupportedLayerError(f"{name}: {reason}")
            record = LayerRecord(name, (weight.shape[0], weight.shape[-1]), "fallback", reason)
        decisions.append((node, record, weight))
    if config.fuse_siblings and lowering.fusable_ops:
        colocate_sibling_packs(
            [(node, weight) for node, record, weight in decisions if record is None], config.scheme
        )
    packed_nodes: dict[Node, tuple[list[Node], int]] = {}
    for node, record, weight in decisions:
        if record is not None:
            report.add(record)
            continue
        x, w_node, *rest = node.args
        bias = rest[0] if rest else node.kwargs.get("bias")
        name = layer_name(node, w_node)
        shape = (weight.shape[0], weight.shape[-1])
        if w_node not in packed_nodes:
            packed = packed_weight(weight, config.scheme)
            tag = re.sub(r"\W", "_", name)
            tensor_nodes = [
                constants.add(gm, f"{tag}_{tname}", t)
                for tname, t in zip(lowering.tensor_names, packed.tensors(), strict=True)
            ]
            packed_nodes[w_node] = (tensor_nodes, packed.group_size)
        tensor_nodes, group = packed_nodes[w_node]
        with gm.graph.inserting_before(node):
            x = _padded_input(gm, x, config.scheme.padded_k(shape[1]), ctx)
            new, fusion = lowering.emit(gm, x, tensor_nodes, bias, group, config.scheme, ctx)
        new.meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
        new.meta[RECORD_META] = len(report.records)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        report.add(
            LayerRecord(
                name,
                shape,
                "quantized",
                describe(config.scheme, group, tied_embeddings(w_node), shape[1]),
                execution_path(weight),
                fusion,
                prologue=lowering.prologue,
            )
        )
    ours = {nodes[0][0] for nodes in packed_nodes.values()}
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        prequantized = next(
            (lw for lw in LINEAR_SCHEMES.values() if node.target in lw.targets), None
        )
        if prequantized is None or node.args[1] in ours:
            continue
        qw = inputs[placeholders[node.args[1]]] if node.args[1] in placeholders else None
        n_k = (qw.shape[1], qw.shape[0] * 8) if isinstance(qw, torch.Tensor) else (0, 0)
        real_k = _share_input_padding(gm, node, ctx)  # a layer padded to whole groups
        how = f"quantize_(), K={real_k} padded to {n_k[1]}" if real_k else "quantize_()"
        n_k = (n_k[0], real_k or n_k[1])
        path = execution_path(qw) if isinstance(qw, torch.Tensor) else ""
        node.meta[RECORD_META] = len(report.records)  # kept by a re-emitted node
        fusion = prequantized.reemit(gm, node, ctx) if prequantized.reemit else ""
        report.add(
            LayerRecord(
                layer_name(node, node.args[1]), n_k, "prequantized", how, path, fusion,
                prologue=prequantized.prologue,
            )
        )  # fmt: skip
    gm.graph.lint()
    gm.recompile()
    return gm


def describe(
    scheme: Scheme, group: int, tied: list[str] | tuple[str, ...] = (), k: int | None = None
) -> str:
    """The report's detail for a quantized layer, e.g. `w4a16 int4 asym g128`, plus a note
    when K (`k`) was padded to whole groups or the weight is tied to embeddings."""
    g = "per-channel" if scheme.group_size is None else f"g{group}"
    text = LINEAR_SCHEMES[scheme.name].describe(scheme, g)
    if k is not None and (stored := scheme.padded_k(k)) != k:
        text += f", K={k} padded to {stored}"
    if tied:
        # The lookup reads the full-precision weight, which therefore stays resident.
        text += (
            f"; tied to {', '.join(tied)}, kept in full precision (embeddings are never quantized)"
        )
    return text


# --------------------------------------------------------------------------- W4A8 activations
# Producers the activation quantization cannot fuse into: kernels Inductor does not generate.
_EXTERN_TARGETS = {
    *LINEAR_TARGETS,
    *W4A16_TARGETS,
    *W4A8_TARGETS,
    W4A8_QUANTIZED_ACT_OP,
    torch.matmul,
    torch.mm,
    torch.bmm,
    operator.matmul,
    F.scaled_dot_product_attention,
}
_EXTERN_METHODS = {"matmul", "mm", "bmm"}
# Ops that only move or relabel data (or cast, or zero-pad K: `Scheme.pad_k`, a pointwise
# read Inductor inlines): look through them for the real producer.
_LAYOUT_METHODS = {"view", "reshape", "contiguous", "transpose", "permute", "flatten", "to"}
_PAD_TARGETS = (F.pad, torch._C._nn.pad)  # (the second: F.pad as Dynamo records it)
_LAYOUT_FUNCTIONS = {torch.reshape, torch.flatten, torch.transpose, torch.permute, *_PAD_TARGETS}


def _producer(x: Node) -> Node:
    while (x.op == "call_method" and x.target in _LAYOUT_METHODS) or (
        x.op == "call_function" and x.target in _LAYOUT_FUNCTIONS
    ):
        x = x.args[0]
    return x


def _op_name(node: Node) -> str:
    return (
        node.target
        if isinstance(node.target, str)
        else getattr(node.target, "__name__", str(node.target))
    )


def activation_fusion(x: Node, otherwise: str = "its own quantization kernel") -> str:
    """Where Inductor can fuse an elementwise prologue of `x` (W4A8's per-token quantization):
    into its producer when that is an Inductor-generated (pointwise / reduction) op, else
    `otherwise` does it."""
    p = _producer(x)
    if p.op == "placeholder":
        return f"not fused: x is a graph input ({otherwise})"
    if p.op != "call_function" and p.op != "call_method":
        return f"not fused: producer {p.name} is a {p.op} ({otherwise})"
    if (p.op == "call_function" and p.target in _EXTERN_TARGETS) or (
        p.op == "call_method" and p.target in _EXTERN_METHODS
    ):
        return (
            f"not fused: producer {_op_name(p)} is an extern kernel, not generated by Inductor "
            f"({otherwise})"
        )
    stack = p.meta.get("nn_module_stack") or {}
    if stack:
        cls = list(stack.values())[-1][1]
        where = f"{module_path(p)} ({getattr(cls, '__name__', cls)})"
        return f"fused into {_op_name(p)} of {where}"
    return f"fused into {_op_name(p)}"


def _quantized_input(gm: GraphModule, x: Node, act_dtype: str, ctx: RewriteContext):
    """(xq, x_scale) nodes of `x`, created once per input; None when x's dtype is unknown."""
    key = (x, act_dtype)
    if key not in ctx.quantized_inputs:
        example = x.meta.get("example_value")
        if not isinstance(example, torch.Tensor):
            return None
        k = example.shape[-1]
        chunks = absmax_chunks(k) if isinstance(k, int) else 1
        q = gm.graph.call_function(quantize_activations_per_token, (x, act_dtype, chunks))
        xq = gm.graph.call_function(operator.getitem, (q, 0))
        xs = gm.graph.call_function(operator.getitem, (q, 1))
        ctx.quantized_inputs[key] = (xq, xs, activation_fusion(x))
    return ctx.quantized_inputs[key]


def _emit_w4a8(gm, x, tensor_nodes, bias, group, scheme, ctx) -> tuple[Node, str]:
    return _w4a8_call(gm, x, tensor_nodes, bias, group, scheme.act_dtype, ctx)


def _w4a8_call(gm, x, tensor_nodes, bias, group, act_dtype, ctx) -> tuple[Node, str]:
    """The W4A8 op on `x`: quantized activations from torch ops (fusable) unless autograd is
    on (the float-x op has the straight-through backward) or x's dtype is unknown."""
    if ctx.autograd:
        fusion = "not fused: autograd is on (compile under torch.no_grad() to fuse)"
    else:
        quantized = _quantized_input(gm, x, act_dtype, ctx)
        if quantized is not None:
            xq, xs, fusion = quantized
            out_dtype = x.meta["example_value"].dtype
            args = (xq, xs, *tensor_nodes, bias, group, out_dtype)
            return gm.graph.call_function(W4A8_QUANTIZED_ACT_OP, args), fusion
        fusion = "not fused: x's dtype is unknown at compile time"
    args = (x, *tensor_nodes, bias, group, act_dtype)
    return gm.graph.call_function(W4A8_OP, args), fusion


def _reemit_w4a8(gm: GraphModule, node: Node, ctx: RewriteContext) -> str:
    """A `quantize_()` layer's `w4a8_linear(x, ...)` call, rewritten like a fresh one."""
    x, *tensor_nodes, bias, group, act_dtype = node.args
    with gm.graph.inserting_before(node):
        new, fusion = _w4a8_call(gm, x, tensor_nodes, bias, group, act_dtype, ctx)
    _take_place(gm, node, new, changed=new.target is not W4A8_OP)
    return fusion


def _take_place(gm: GraphModule, node: Node, new: Node, changed: bool) -> None:
    """A re-emitted call: `new` replaces `node` (keeping its meta, less the stale example
    value), or is dropped when the rewrite left the call as it was."""
    if not changed:
        gm.graph.erase_node(new)
        return
    new.meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _planes_input(gm: GraphModule, x: Node, ctx: RewriteContext) -> tuple[Node | None, str]:
    """(x plane-major, where that is fused), created once per input; None (with the reason, ''
    when the option is off) when x keeps its order: K not a multiple of PLANE_CHUNK, or a
    producer Inductor does not generate (then the permutation would be a copy kernel of its
    own, as in the launcher, so the kernels keep doing it)."""
    if not ctx.plane_major_x:
        return None, ""
    if x not in ctx.planes_inputs:
        example = x.meta.get("example_value")
        where = activation_fusion(x, "the kernels order x themselves")
        if not isinstance(example, torch.Tensor) or example.dim() == 0:
            ctx.planes_inputs[x] = None, ""
        elif example.shape[-1] % PLANE_CHUNK:
            k = example.shape[-1]
            ctx.planes_inputs[x] = None, f"not used: K={k} is not a multiple of {PLANE_CHUNK}"
        elif not where.startswith("fused"):
            ctx.planes_inputs[x] = None, where
        else:
            ctx.planes_inputs[x] = gm.graph.call_function(to_planes, (x,)), where
    return ctx.planes_inputs[x]


def _padded_input(gm: GraphModule, x: Node, k: int, ctx: RewriteContext) -> Node:
    """x zero-padded along its last dim to `k` (a layer stored with K padded to whole
    groups), one pad node per (input, k) so siblings still share their input; x itself when
    it has k already. The pad is pointwise: Inductor fuses it into x's producer."""
    example = x.meta.get("example_value")
    if not isinstance(example, torch.Tensor) or example.shape[-1] == k:
        return x
    if (x, k) not in ctx.padded_inputs:
        pad = (0, k - example.shape[-1])
        node = gm.graph.call_function(F.pad, (x, pad))
        fake_mode = getattr(example, "fake_mode", None)
        if fake_mode is not None:
            with fake_mode:
                node.meta["example_value"] = F.pad(example, pad)
        ctx.padded_inputs[x, k] = node
    return ctx.padded_inputs[x, k]


def _share_input_padding(gm: GraphModule, node: Node, ctx: RewriteContext) -> int | None:
    """A `quantize_()` layer padded to whole groups pads its own input (`W4A16Linear.forward`),
    so siblings reading one x get one pad node each. Make them share the first (so sibling
    fusion still sees one input) and return the layer's real K; None for an unpadded layer."""
    pad = node.args[0]
    if not (isinstance(pad, Node) and pad.op == "call_function" and pad.target in _PAD_TARGETS):
        return None
    x0, widths, *rest = (*pad.args, *pad.kwargs.values())
    example = x0.meta.get("example_value") if isinstance(x0, Node) else None
    zero_fill = rest in ([], ["constant"], ["constant", None], ["constant", 0], ["constant", 0.0])
    if not (isinstance(example, torch.Tensor) and zero_fill and len(widths) == 2 and not widths[0]):
        return None
    k = example.shape[-1]
    shared = ctx.padded_inputs.setdefault((x0, k + widths[1]), pad)
    if shared is not pad:
        node.replace_input_with(pad, shared)
        if not pad.users:
            gm.graph.erase_node(pad)
    return k


def _emit_w4a16(gm, x, tensor_nodes, bias, group, scheme, ctx) -> tuple[Node, str]:
    xp, where = _planes_input(gm, x, ctx)
    if xp is None:
        return gm.graph.call_function(W4A16_OP, (x, *tensor_nodes, bias, group)), where
    return gm.graph.call_function(W4A16_OP, (xp, *tensor_nodes, bias, group, PLANE_CHUNK)), where


def _reemit_w4a16(gm: GraphModule, node: Node, ctx: RewriteContext) -> str:
    """A `quantize_()` layer's `w4a16_linear(x, ...)` call, given plane-major x where it helps."""
    x, *tensor_nodes, bias, group = node.args[:6]
    if len(node.args) > 6 and node.args[6] or node.kwargs:
        return ""  # already plane-major, or a call the modules do not make
    with gm.graph.inserting_before(node):
        new, where = _emit_w4a16(gm, x, tensor_nodes, bias, group, None, ctx)
    _take_place(gm, node, new, changed=len(new.args) > 6)
    return where


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class LinearScheme:
    """How the pass lowers one `Scheme.name`: preconditions, packing, the op it emits."""

    kernel_dtypes: tuple[torch.dtype, ...]
    k_multiple: int
    quantize: Callable[[torch.Tensor, Scheme], Any]  # -> packed with .tensors(), .group_size
    tensor_names: tuple[str, ...]  # graph-input names of packed.tensors(), in op order
    emit: Callable[..., tuple[Node, str]]  # (gm, x, tensors, bias, group, scheme, ctx)
    targets: tuple  # ops of already-quantized layers (recorded as "prequantized")
    describe: Callable[[Scheme, str], str]  # (scheme, "g128" / "per-channel") -> report detail
    reemit: Callable[[GraphModule, Node, RewriteContext], str] | None = None
    # What the op's activation prologue is, for the report (`LayerRecord.prologue`).
    prologue: str = "activation quantization"
    # Ops whose calls on co-located siblings `passes/fuse.py` may merge, each with its number of
    # leading activation arguments: args = (*activations, *packed tensors, bias, *rest). An op
    # is listed only once its kernels take packed tensors with a row stride >= N.
    fusable_ops: dict[Any, int] = field(default_factory=dict)


LINEAR_SCHEMES: dict[str, LinearScheme] = {
    "w4a16": LinearScheme(
        w4a16_ops.KERNEL_DTYPES,
        w4a16_ops.KERNEL_K_MULTIPLE,
        quantize_weight_int4,
        ("qweight", "scales", "offsets"),
        _emit_w4a16,
        W4A16_TARGETS,
        lambda scheme, g: f"w4a16 int4 {'sym' if scheme.symmetric else 'asym'} {g}",
        _reemit_w4a16,
        prologue="plane-major x",
        fusable_ops=dict.fromkeys(W4A16_TARGETS, 1),
    ),
    "w4a8": LinearScheme(
        w4a8_ops.KERNEL_DTYPES,
        w4a8_ops.KERNEL_K_MULTIPLE,
        quantize_weight_w4a8,
        ("qweight", "group_scales", "group_zeros", "channel_scales"),
        _emit_w4a8,
        W4A8_TARGETS,
        lambda scheme, g: (
            f"w4a8 int4 (QoQ progressive) {g}, {scheme.act_dtype} per-token activations"
        ),
        _reemit_w4a8,
    ),
}
