"""Attention pass: attention over a dequantized KV4 cache -> `qcompile::kv4_attention`.

Match (on Dynamo's torch-level graph):
  * `F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale,
    enable_gqa)`, and
  * the eager form `matmul(dropout?(to?(softmax(matmul(q, k.transpose(-2, -1)) [* c | / c]
    [+ mask], dim=-1))), v)` (transformers' `eager_attention_forward`),
  with k and v optionally repeated for grouped-query attention the way transformers'
  `repeat_kv` does it (`x[:, :, None].expand(B, Hkv, n_rep, S, D).reshape(B, Hq, S, D)`).
Check: K and V must be `qcompile::kv4_dequantize` outputs of one cache layer's packed
buffers (what `KV4Cache` returns to SDPA / eager attention), dropout must be 0, the eager
form's attention weights must have no other use, the mask must be 4-D, a causal SDPA must
have Sq == S (SDPA's causal mask is top-left aligned, the op's bottom-right; equal when
Sq == S), and the scale a constant.
Rewrite: `kv4_attention(q, k codes/scales/offsets, v codes/scales/offsets, None, mask,
is_causal, scale)`; the dequantize and repeat nodes die with their last use, so fp16 K/V
are never materialized. Keys stored per channel (`KVScheme.key_tokens`; their dequantize
carries the residual and the written length) add `seq_lens = length` and `k_residual`;
read through a prefix slice they are left alone (the residual's place depends on length).

Without a KV4 cache there is nothing to read in 4 bits: the attention is recorded as
"skipped" with the reason, and left as it was but for one rewrite
(`QuantConfig.pack_gqa_decode`): a one-token SDPA over repeat_kv'd K/V (transformers' decode
step under torch.compile) becomes `decode_attention(q, k, v, mask, scale)` on the KV heads
(the same attention: its reference is SDPA; on CUDA a flash-decoding kernel whose tiles hold
all the query heads of one KV head), so the repeated K/V copy is never built and each KV
head is read once. Attention that already calls `kv4_attention` (transformers'
"qcompile_kv4" attention function) is recorded as "prequantized".
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qcompile.config import QuantConfig
from qcompile.passes.linear import module_path
from qcompile.report import AttentionRecord, CompileReport

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
MATMUL_TARGETS = (torch.matmul, operator.matmul)
SOFTMAX_TARGETS = (F.softmax, torch.softmax)
KV4_ATTENTION = torch.ops.qcompile.kv4_attention.default
DECODE_ATTENTION = torch.ops.qcompile.decode_attention.default
KV4_ATTENTION_TARGETS = (KV4_ATTENTION, torch.ops.qcompile.kv4_attention)
# the qcompile_kv4 function's prompt op (`KVScheme.fresh_prefill`): reported, never emitted
KV4_PREFILL_TARGETS = (
    torch.ops.qcompile.kv4_prefill_attention.default,
    torch.ops.qcompile.kv4_prefill_attention,
)
_REWRITTEN = "qcompile_kv4_rewritten"  # node.meta key on the kv4_attention calls we emit
KV4_DEQUANTIZE_TARGETS = (
    torch.ops.qcompile.kv4_dequantize.default,
    torch.ops.qcompile.kv4_dequantize,
)


@dataclass
class AttentionMatch:
    """One attention found in the graph, in the terms of `kv4_attention`."""

    node: Node  # its output [B, Hq, Sq, D]
    form: str  # "sdpa" or "eager"
    query: Node
    key: Node  # K as attention reads it (possibly repeated for GQA)
    value: Node
    mask: Node | None = None
    scale: float | Node | None = None  # None: SDPA's default 1 / sqrt(D)
    is_causal: bool = False
    dropout: object = 0.0
    private: list[Node] = field(default_factory=list)  # eager: nodes only this match uses
    problem: str | None = None  # set when the match cannot be rewritten


# --------------------------------------------------------------------------- matching
def _arg(node: Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _match_sdpa(node: Node) -> AttentionMatch:
    q, k, v = node.args[:3]
    return AttentionMatch(
        node, "sdpa", q, k, v,
        mask=_arg(node, 3, "attn_mask"),
        dropout=_arg(node, 4, "dropout_p", 0.0),
        is_causal=bool(_arg(node, 5, "is_causal", False)),
        scale=node.kwargs.get("scale"),
    )  # fmt: skip


def _is_method(node: object, *names: str) -> bool:
    return isinstance(node, Node) and node.op == "call_method" and node.target in names


def _is_call(node: object, targets: tuple) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _is_key_transpose(node: object) -> bool:
    """k.transpose(2, 3) / (-2, -1) / (-1, -2), as a method or torch.transpose."""
    if not (_is_method(node, "transpose") or _is_call(node, (torch.transpose,))):
        return False
    dims = {d % 4 if isinstance(d, int) else d for d in node.args[1:3]}
    return dims == {2, 3}


def _match_eager(node: Node) -> AttentionMatch | None:
    """matmul(P, V) where P is softmax(matmul(Q, K^T) [*c | /c] [+ mask]) (+ to / dropout)."""
    if not _is_call(node, MATMUL_TARGETS) or len(node.args) != 2:
        return None
    probs, value = node.args
    private: list[Node] = []
    dropout = 0.0
    while True:  # walk back through the casts and dropout between softmax and the matmul
        if _is_method(probs, "to", "type_as", "float", "half", "bfloat16"):
            private.append(probs)
            probs = probs.args[0]
        elif _is_call(probs, (F.dropout,)):
            private.append(probs)
            training = _arg(probs, 2, "training", True)
            dropout = _arg(probs, 1, "p", 0.5) if training else 0.0
            probs = probs.args[0]
        else:
            break
    softmax_dim = None
    if _is_call(probs, SOFTMAX_TARGETS) or _is_method(probs, "softmax"):
        softmax_dim = _arg(probs, 1, "dim")
    if softmax_dim not in (-1, 3):
        return None
    private.append(probs)
    scores = probs.args[0]
    mask = None
    if _is_call(scores, (operator.add, torch.add)) or _is_method(scores, "add"):
        private.append(scores)
        scores, mask = scores.args[:2]
    scale: float | Node = 1.0
    if _is_call(scores, (operator.mul, torch.mul, operator.truediv, torch.div)):
        private.append(scores)
        product, c = scores.args[:2]
        if not isinstance(product, Node) or isinstance(c, Node):
            product, c = c, product  # c * matmul
        divide = scores.target in (operator.truediv, torch.div)
        scale = (1.0 / c if divide else c) if isinstance(c, (int, float)) else c
        scores = product
    if not _is_call(scores, MATMUL_TARGETS) or not _is_key_transpose(scores.args[1]):
        return None
    private += [scores, scores.args[1]]
    query, key = scores.args[0], scores.args[1].args[0]
    return AttentionMatch(
        node, "eager", query, key, value, mask=mask, scale=scale, dropout=dropout,
        private=private,
    )  # fmt: skip


def find_attention(gm: GraphModule) -> list[AttentionMatch]:
    """Every SDPA call and every eager matmul-softmax-matmul attention in `gm`."""
    found = []
    for node in gm.graph.nodes:
        if _is_call(node, SDPA_TARGETS):
            found.append(_match_sdpa(node))
        elif (match := _match_eager(node)) is not None:
            found.append(match)
    return found


def strip_repeat_kv(node: Node) -> tuple[Node, int]:
    """(x, n_rep) for `x[:, :, None].expand(B, H, n_rep, S, D).reshape(B, H * n_rep, S, D)`,
    else (node, 1). `contiguous()` calls are looked through."""
    while _is_method(node, "contiguous"):
        node = node.args[0]
    if not (_is_method(node, "reshape", "view") or _is_call(node, (torch.reshape,))):
        return node, 1
    expand = node.args[0]
    if not _is_method(expand, "expand") or len(expand.args) != 6:
        return node, 1
    index = expand.args[0]
    if not (_is_call(index, (operator.getitem,)) and isinstance(index.args[1], tuple)):
        return node, 1
    key = index.args[1]
    if len(key) != 5 or key[2] is not None or any(k != slice(None) for i, k in enumerate(key) if i != 2):  # fmt: skip
        return node, 1
    n_rep = expand.args[3]
    return index.args[0], n_rep if isinstance(n_rep, int) else 0


def strip_prefix_slice(node: Node) -> tuple[Node, int | Node | None]:
    """(x, n) for `x[:, :, :n, :]` (transformers' causal prefill over a static cache keeps only
    the first Sq positions): n a constant, or the graph's symbol for Sq once a second prompt
    length made it dynamic; else (node, None)."""
    if not (_is_call(node, (operator.getitem,)) and isinstance(node.args[1], tuple)):
        return node, None
    index = node.args[1]
    full = slice(None)
    if len(index) != 4 or index[0] != full or index[1] != full or index[3] != full:
        return node, None
    cut = index[2]
    if not (isinstance(cut, slice) and cut.start in (None, 0) and cut.step in (None, 1)):
        return node, None
    return (node.args[0], cut.stop) if isinstance(cut.stop, (int, Node)) else (node, None)


@dataclass(frozen=True)
class KV4Source:
    """Where a K or V operand comes from: one cache layer's packed buffers."""

    tensors: tuple[Node, Node, Node]  # codes, scales, offsets
    n_rep: int  # repeat_kv factor (1: none; 0: not a constant)
    prefix: int | Node | None  # only the first `prefix` positions are read (None: all)
    residual: Node | None = None  # keys per channel: the residual and the written length
    length: Node | None = None


def kv4_source(node: Node) -> KV4Source | None:
    """The KV4 cache K or V `node` reads (through slicing and repeat_kv), or None."""
    node, prefix = strip_prefix_slice(node)
    base, n_rep = strip_repeat_kv(node)
    if prefix is None:  # the slice may also come before the repeat
        base, prefix = strip_prefix_slice(base)
    if _is_call(base, KV4_DEQUANTIZE_TARGETS):
        extra = [*base.args[4:6]] + [None] * 2
        residual = base.kwargs.get("residual", extra[0])
        length = base.kwargs.get("length", extra[1])
        return KV4Source(tuple(base.args[:3]), n_rep, prefix, residual, length)
    return None


# --------------------------------------------------------------------------- checks
def _shape(node: object) -> tuple | None:
    value = node.meta.get("example_value") if isinstance(node, Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _static(*sizes) -> bool:
    return all(isinstance(s, int) for s in sizes)


def _same_size(a: object, b: object) -> bool:
    """Equal constants, or symbolic sizes of one expression (compared without a guard: the
    graph is already traced)."""
    if _static(a, b):
        return a == b
    exprs = [getattr(getattr(x, "node", None), "expr", None) for x in (a, b)]
    return exprs[0] is not None and exprs[0] == exprs[1]


def rewrite_problem(match: AttentionMatch, k: KV4Source, v: KV4Source) -> str | None:
    """Why a KV4-fed attention cannot become `kv4_attention`, or None."""
    if not isinstance(match.dropout, (int, float)) or match.dropout:
        return f"dropout {match.dropout} (kv4 attention is inference only)"
    if k.n_rep != v.n_rep or k.n_rep == 0:
        return "K and V are repeated differently for grouped-query attention"
    if k.prefix != v.prefix:
        return "K and V are sliced differently"
    if v.residual is not None:
        return "V is read as keys stored per channel"
    if k.residual is not None:
        if k.prefix is not None or k.length is None:
            return "keys per channel read through a slice or without their length"
        if not isinstance((_shape(match.query) or (None,))[0], int):
            return "keys per channel with a symbolic batch size"
    if k.prefix is not None and not isinstance((_shape(match.query) or (None,))[0], int):
        return "a sliced cache with a symbolic batch size"
    if match.form == "eager" and any(len(n.users) > 1 for n in match.private):
        return "the attention weights are used elsewhere (output_attentions?)"
    if isinstance(match.scale, Node):
        return "the softmax scale is a tensor, not a constant"
    if match.mask is not None:
        shape = _shape(match.mask)
        if shape is None or len(shape) != 4:
            return f"mask of shape {shape}: only 4-D masks [B|1, H|1, Sq, S] are rewritten"
    if match.is_causal:
        q, k = _shape(match.query), _shape(match.key)
        if q is None or k is None or not _same_size(q[2], k[2]):
            return "causal SDPA with Sq != S (top-left aligned mask): not rewritten"
    return None


# --------------------------------------------------------------------------- pass
def _module_path(node: Node) -> str:
    return module_path(node) or node.name


def _heads(match: AttentionMatch) -> tuple[tuple[int, int], int]:
    """((Hq, Hkv), D) from the example values; 0 where unknown or symbolic."""
    q = _shape(match.query) or (0, 0, 0, 0)
    k = _shape(strip_repeat_kv(match.key)[0]) or (0, 0, 0, 0)
    known = [v if isinstance(v, int) else 0 for v in (q[1], k[1], q[3])]
    return (known[0], known[1]), known[2]


def _path(codes: Node) -> str:
    value = codes.meta.get("example_value")
    return "triton" if isinstance(value, torch.Tensor) and value.is_cuda else "reference"


def _rewrite(gm: GraphModule, match: AttentionMatch, k: KV4Source, v: KV4Source) -> None:
    q_shape = _shape(match.query)
    scale = match.scale
    if scale is None:  # SDPA's default
        scale = float(q_shape[-1]) ** -0.5
    with gm.graph.inserting_before(match.node):
        seq_lens = None
        if k.prefix is not None:  # K[:, :, :n]: the op reads the first n positions
            device = k.tensors[0].meta["example_value"].device
            seq_lens = gm.graph.call_function(
                torch.full, ((q_shape[0],), k.prefix), {"dtype": torch.int32, "device": device}
            )
        if k.residual is not None:  # the residual's tokens start at length // T * T
            one = gm.graph.call_method("view", (k.length, 1))
            seq_lens = gm.graph.call_method("expand", (one, q_shape[0]))
        args = (match.query, *k.tensors, *v.tensors, seq_lens, match.mask, match.is_causal)
        new = gm.graph.call_function(KV4_ATTENTION, (*args, float(scale), k.residual))
    new.meta.update({k: v for k, v in match.node.meta.items() if k != "example_value"})
    new.meta[_REWRITTEN] = True
    match.node.replace_all_uses_with(new)
    dead = [match.node, *match.private]
    for node in dead:
        if not node.users:
            gm.graph.erase_node(node)


def _gqa_decode_operands(match: AttentionMatch) -> tuple[Node, Node, int] | None:
    """(K, V before repeat_kv, n_rep) when the GQA packing applies to `match`, else None:
    SDPA, one query position, K and V repeated alike (constant n_rep > 1), no causal flag or
    dropout, and a mask (if any) shared by every head and query, i.e. [B|1, 1, 1, S]."""
    if match.form != "sdpa" or match.is_causal or match.node.kwargs.get("enable_gqa"):
        return None
    if not isinstance(match.dropout, (int, float)) or match.dropout:
        return None
    if isinstance(match.scale, Node):
        return None
    k, n_rep = strip_repeat_kv(match.key)
    v, n_rep_v = strip_repeat_kv(match.value)
    q, kb = _shape(match.query), _shape(k)
    if n_rep != n_rep_v or n_rep <= 1 or q is None or kb is None or len(q) != 4:
        return None
    if not _static(*q[1:], kb[1]) or q[2] != 1 or q[1] != kb[1] * n_rep:
        return None
    if match.mask is not None:
        mask = _shape(match.mask)
        if mask is None or len(mask) != 4 or mask[1] != 1 or mask[2] != 1:
            return None
    return k, v, n_rep


def _pack_gqa_decode(gm: GraphModule, match: AttentionMatch, k: Node, v: Node, n_rep: int) -> None:
    """sdpa(q, repeat_kv(k), repeat_kv(v), mask) -> decode_attention(q, k, v, mask, scale):
    query head h reads KV head h // n_rep, as repeat_kv orders them."""
    d = _shape(match.query)[3]
    scale = float(match.scale) if match.scale is not None else d**-0.5
    node = match.node
    with gm.graph.inserting_before(node):
        out = gm.graph.call_function(DECODE_ATTENTION, (match.query, k, v, match.mask, scale))
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


def _erase_unused(gm: GraphModule) -> None:
    """Drop the repeat_kv / kv4_dequantize nodes the rewrites left without users."""
    changed = True
    while changed:
        changed = False
        for node in reversed(gm.graph.nodes):
            pure = _is_call(node, KV4_DEQUANTIZE_TARGETS + (operator.getitem,)) or _is_method(
                node, "expand", "reshape", "view", "contiguous"
            )
            if pure and not node.users:
                gm.graph.erase_node(node)
                changed = True


def rewrite_attention(gm: GraphModule, config: QuantConfig, report: CompileReport) -> GraphModule:
    """Rewrite every attention reading a dequantized KV4 cache (in place); record them all."""
    rewrote = False
    for match in find_attention(gm):
        name = _module_path(match.node)
        k_src, v_src = kv4_source(match.key), kv4_source(match.value)
        heads, head_dim = _heads(match)
        if k_src is None or v_src is None:
            what = "K" if k_src is None else "V"
            detail = f"{what} is not read from a KV4 cache (no kv4_dequantize feeds it); left as is"
            gqa = _gqa_decode_operands(match) if config.pack_gqa_decode else None
            if gqa is not None:
                _pack_gqa_decode(gm, match, *gqa)
                rewrote = True
                detail += (
                    f" but for the GQA packing (one query, {gqa[2]} query heads per KV head):"
                    " qcompile decode_attention"
                )
            report.add(AttentionRecord(name, match.form, heads, head_dim, "skipped", detail))
            continue
        if config.skips(name):
            report.add(AttentionRecord(
                name, match.form, heads, head_dim, "skipped", "matches a skip pattern"
            ))  # fmt: skip
            continue
        problem = rewrite_problem(match, k_src, v_src)
        if problem is not None:
            report.add(AttentionRecord(
                name, match.form, heads, head_dim, "fallback",
                f"{problem}; attention reads the dequantized KV4 cache",
            ))  # fmt: skip
            continue
        _rewrite(gm, match, k_src, v_src)
        rewrote = True
        ng = (_shape(k_src.tensors[1]) or (0, 0, 0, 1))[-1]
        group = head_dim // ng if ng and head_dim else 0
        report.add(AttentionRecord(
            name, match.form, heads, head_dim, "quantized",
            f"kv4 int4 g{group}, causal={match.is_causal}, mask={match.mask is not None}",
            _path(k_src.tensors[0]),
        ))  # fmt: skip
    if rewrote:
        _erase_unused(gm)
    _record_prequantized(gm, report)
    gm.graph.lint()
    gm.recompile()
    return gm


def _record_prequantized(gm: GraphModule, report: CompileReport) -> None:
    """kv4_attention / kv4_prefill_attention calls the pass did not write (transformers'
    qcompile_kv4 function)."""
    for node in gm.graph.nodes:
        prefill = _is_call(node, KV4_PREFILL_TARGETS)
        if not (prefill or _is_call(node, KV4_ATTENTION_TARGETS)) or node.meta.get(_REWRITTEN):
            continue
        codes_arg = node.args[3] if prefill else node.args[1]  # after query (, key, value)
        q, codes = _shape(node.args[0]), _shape(codes_arg)
        heads = (q[1], codes[1]) if q and codes else (0, 0)
        detail = "qcompile_kv4 attention function"
        if prefill:
            detail += " (a prompt: its own K/V in 16 bits, earlier positions in 4)"
        report.add(AttentionRecord(
            name=_module_path(node), form="kv4", heads=heads, head_dim=q[3] if q else 0,
            status="prequantized", detail=detail, path=_path(codes_arg),
        ))  # fmt: skip
