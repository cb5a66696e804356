"""Linear pass: `torch._C._nn.linear(x, W, b)` with a parameter W -> `qcompile::w4a16_linear`.

Match: every `linear` call whose weight is a graph input (a parameter, as Dynamo lifts them).
Check: skip patterns, then `unsupported_reason` (shape, dtype, device); a failing layer is
left as it was and recorded as a fallback (or raised, with on_unsupported="raise").
Rewrite: quantize W once (cached per tensor and version, so shared weights and recompiles
reuse it) and feed the packed tensors in as extra trailing graph inputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node
from torch.utils.weak import WeakIdKeyDictionary

from qcompile.config import QuantConfig, Scheme
from qcompile.ops.w4a16 import KERNEL_DTYPES, KERNEL_K_MULTIPLE
from qcompile.quant.int4 import PackedInt4
from qcompile.quant.rtn import quantize_weight_int4
from qcompile.report import CompileReport, LayerRecord

LINEAR_TARGETS = (torch._C._nn.linear, F.linear)
EMBEDDING_TARGETS = (F.embedding, torch.embedding, torch.ops.aten.embedding.default)
W4A16_OP = torch.ops.qcompile.w4a16_linear.default
W4A16_TARGETS = (W4A16_OP, torch.ops.qcompile.w4a16_linear)


class UnsupportedLayerError(ValueError):
    """A layer the kernels cannot take, raised when QuantConfig.on_unsupported == 'raise'."""


def unsupported_reason(
    shape: tuple[int, ...], dtype: torch.dtype, device_type: str, scheme: Scheme
) -> str | None:
    """Why a weight of `shape`/`dtype` on `device_type` cannot use `scheme`, with the fix."""
    if len(shape) != 2:
        return f"weight has shape {tuple(shape)}, expected [N, K]"
    if not dtype.is_floating_point:
        return f"weight dtype {dtype} is not a float type"
    k = shape[1]
    g = scheme.group_size_for(k)
    if k % g:
        fits = [s for s in (64, 32) if s < g and k % s == 0]
        fix = f"use group_size={fits[0]}" if fits else "use group_size=None (per-channel)"
        return f"K={k} is not divisible by group_size={g}; {fix} or skip this module"
    if k % 8:
        return f"K={k} is not a multiple of 8 (int4 packing); skip this module"
    if device_type == "cuda":
        if k % KERNEL_K_MULTIPLE:
            return f"K={k} is not a multiple of {KERNEL_K_MULTIPLE} (kernel tile); skip this module"
        if dtype not in KERNEL_DTYPES:
            return (
                f"{dtype} on CUDA: the W4A16 kernels take float16/bfloat16 activations; "
                "cast the model with .half() or .to(torch.bfloat16)"
            )
    elif device_type != "cpu":
        return f"device {device_type} has no W4A16 kernel; use CUDA or CPU"
    return None


def execution_path(weight: torch.Tensor) -> str:
    return "triton" if weight.is_cuda else "reference"


# Packed weights per source tensor, reused across graphs and recompiles while the tensor
# lives and is not modified in place (its version counter is part of the entry).
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def packed_weight(weight: torch.Tensor, scheme: Scheme) -> PackedInt4:
    entry = _PACKED.get(weight)
    if entry is not None and entry[0] == weight._version and entry[1] == scheme:
        return entry[2]
    packed = quantize_weight_int4(weight, scheme)
    _PACKED[weight] = (weight._version, scheme, packed)
    return packed


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


def _param_fqn(source_name: str) -> str:
    """`L['self']._modules['a']._parameters['weight']` -> `a.weight`."""
    path = _SOURCE_ATTR.sub(r".\1", source_name)
    path = re.sub(r"^L\['[^']+'\]\.?", "", path)
    return re.sub(r"\[(\d+)\]", r".\1", path).strip(".")


def module_path(node: Node) -> str | None:
    """The innermost module of `node` in Dynamo's nn_module_stack (`model.embed_tokens`)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    return re.sub(r"^L\['[^']+'\]\.?", "", list(stack.values())[-1][0])


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


def rewrite_linears(
    gm: GraphModule,
    inputs: list,
    config: QuantConfig,
    report: CompileReport,
    constants: GraphConstants,
) -> GraphModule:
    """Rewrite every supported linear of `gm` (in place) into the W4A16 op; record all of them."""
    placeholders = {n: i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))}
    packed_nodes: dict[Node, tuple[Node, Node, Node, int]] = {}
    for node in find_linears(gm):
        x, w_node, *rest = node.args
        bias = rest[0] if rest else node.kwargs.get("bias")
        weight = inputs[placeholders[w_node]] if w_node in placeholders else None
        name = layer_name(node, w_node)
        if not isinstance(weight, torch.Tensor):
            report.add(LayerRecord(name, (0, 0), "skipped", "weight is computed inside the graph"))
            continue
        shape = (weight.shape[0], weight.shape[-1])
        if config.skips(name):
            report.add(LayerRecord(name, shape, "skipped", "matches a skip pattern"))
            continue
        reason = unsupported_reason(
            tuple(weight.shape), weight.dtype, weight.device.type, config.scheme
        )
        if reason is not None:
            if config.on_unsupported == "raise":
                raise UnsupportedLayerError(f"{name}: {reason}")
            report.add(LayerRecord(name, shape, "fallback", reason))
            continue
        if w_node not in packed_nodes:
            packed = packed_weight(weight, config.scheme)
            tag = re.sub(r"\W", "_", name)
            packed_nodes[w_node] = (
                constants.add(gm, f"{tag}_qweight", packed.qweight),
                constants.add(gm, f"{tag}_scales", packed.scales),
                constants.add(gm, f"{tag}_offsets", packed.offsets),
                packed.group_size,
            )
        qw, scales, offsets, group = packed_nodes[w_node]
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(W4A16_OP, (x, qw, scales, offsets, bias, group))
        new.meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        detail = describe(config.scheme, group, tied_embeddings(w_node))
        report.add(LayerRecord(name, shape, "quantized", detail, execution_path(weight)))
    ours = {nodes[0] for nodes in packed_nodes.values()}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in W4A16_TARGETS and node.args[1] not in ours:
            qw = inputs[placeholders[node.args[1]]] if node.args[1] in placeholders else None
            n_k = (qw.shape[1], qw.shape[0] * 8) if isinstance(qw, torch.Tensor) else (0, 0)
            path = execution_path(qw) if isinstance(qw, torch.Tensor) else ""
            report.add(
                LayerRecord(
                    layer_name(node, node.args[1]), n_k, "prequantized", "quantize_()", path
                )
            )
    gm.graph.lint()
    gm.recompile()
    return gm


def describe(scheme: Scheme, group: int, tied: list[str] | tuple[str, ...] = ()) -> str:
    """`w4a16 int4 asym g128`, plus a note when the weight is tied to embeddings."""
    kind = "sym" if scheme.symmetric else "asym"
    g = "per-channel" if scheme.group_size is None else f"g{group}"
    text = f"{scheme.name} int4 {kind} {g}"
    if tied:
        # The lookup reads the full-precision weight, which therefore stays resident.
        text += (
            f"; tied to {', '.join(tied)}, kept in full precision (embeddings are never quantized)"
        )
    return text
