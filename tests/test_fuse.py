"""Sibling fusion: co-located packed storage (`colocate_siblings`, the backend's own packs) and
the pass that turns sibling calls on one input into one op call (`passes/fuse.py`)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close_rel, tiny_causal_lm
from torch import nn
from torch._dynamo.utils import counters

import qcompile
from qcompile import QuantConfig, Scheme, W4A16Linear
from qcompile.passes.linear import W4A16_TARGETS, packed_weight
from qcompile.quant.int4 import PLANE_CHUNK, to_planes
from qcompile.quant.rtn import quantize_weight_int4

FUSED = QuantConfig()
UNFUSED = QuantConfig(fuse_siblings=False)
G32 = QuantConfig(Scheme(group_size=32), skip=())
UNFUSED_G32 = QuantConfig(Scheme(group_size=32), skip=(), fuse_siblings=False)
# Launches per decoder layer: q/k/v as one, o_proj, gate/up as one, down_proj (lm_head skipped).
FUSED_OPS_PER_LAYER = 4
UNFUSED_OPS_PER_LAYER = 7


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _ids(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _ops(gm) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in W4A16_TARGETS]


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _storage_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind the model's buffers."""
    storages = {_storage(b): b.untyped_storage().nbytes() for b in model.buffers()}
    return sum(storages.values())


def _compiled(model: nn.Module, config: QuantConfig, *args):
    be = qcompile.backend(config)
    with torch.no_grad():
        out = torch.compile(model, backend=be)(*args)
    return out, be


# --- co-located storage ----------------------------------------------------------------------


def test_quantize_colocates_siblings_as_views_of_one_storage_with_equal_outputs():
    model = tiny_causal_lm("llama", 1)
    separate = copy.deepcopy(model)
    qcompile.quantize_(separate, UNFUSED)
    qcompile.quantize_(model, FUSED)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    groups = ([attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj], [mlp.gate_proj, mlp.up_proj])
    for group in groups:
        widths = [m.out_features for m in group]
        for buffer in ("qweight", "scales", "offsets"):
            tensors = [getattr(m, buffer) for m in group]
            assert len({_storage(t) for t in tensors}) == 1, buffer
            starts = [sum(widths[:i]) for i in range(len(group))]
            assert [t.storage_offset() for t in tensors] == starts, buffer
            assert tensors[0].untyped_storage().nbytes() == sum(t.nbytes for t in tensors)
    assert _storage(mlp.down_proj.qweight) not in {_storage(b) for b in attn.buffers()}
    sep_attn = separate.model.layers[0].self_attn
    assert len({_storage(m.qweight) for m in sep_attn.children()}) == 4
    assert _storage_bytes(model) == _storage_bytes(separate)  # a layout, no extra memory
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, separate(ids).logits)
    before = _storage(attn.q_proj.qweight)
    assert qcompile.colocate_siblings(model) == [
        [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"],
        ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
    ]
    assert _storage(attn.q_proj.qweight) == before  # already co-located: nothing copied


@pytest.mark.parametrize("cast", ["double", "bfloat16"])
def test_a_cast_of_the_model_keeps_siblings_colocated(cast):
    """`.double()` / `.to(torch.bfloat16)` convert each sibling's slice through the shared base:
    one storage per kind afterwards, every slice at its place, outputs equal to the same cast
    of separately stored layers."""
    model = tiny_causal_lm("qwen2", 1)  # biased q/k/v, o_proj without bias; K=64: 2 groups
    separate = copy.deepcopy(model)
    qcompile.quantize_(model, G32)
    qcompile.quantize_(separate, UNFUSED_G32)
    attn = model.model.layers[0].self_attn
    qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
    qkvo = (*qkv, attn.o_proj)
    offsets_before = [m.scales.storage_offset() for m in qkvo]
    dtype = torch.float64 if cast == "double" else torch.bfloat16
    for m in (model, separate):
        m.double() if cast == "double" else m.to(dtype)
    assert {m.scales.dtype for m in qkvo} == {dtype} and attn.q_proj.bias.dtype == dtype
    assert len({_storage(m.scales) for m in qkvo}) == 1
    assert len({_storage(m.offsets) for m in qkvo}) == 1
    assert len({_storage(m.bias) for m in qkv}) == 1
    assert [m.scales.storage_offset() for m in qkvo] == offsets_before
    assert len({_storage(m.qweight) for m in qkvo}) == 1
    assert [m.qweight.storage_offset() for m in qkvo] == [m.scales.storage_offset() for m in qkvo]
    assert _storage_bytes(model) == _storage_bytes(separate)  # the old bases were freed
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, separate(ids).logits)
    scales = _storage(attn.q_proj.scales)
    assert qcompile.colocate_siblings(model)
    assert _storage(attn.q_proj.scales) == scales  # already co-located: nothing is copied


def test_a_deep_copy_keeps_colocation_through_a_cast():
    """A deep copy's buffers are no longer views (`_base` is None) but still share one storage
    per kind; a cast of the copy keeps that (read from strides and storages, not `_base`)."""
    model = tiny_causal_lm("llama", 1)
    qcompile.quantize_(model, G32)
    twin = copy.deepcopy(model)
    attn = twin.model.layers[0].self_attn
    assert attn.q_proj.scales._base is None
    twin.half()
    for buffer in ("qweight", "scales", "offsets"):
        assert len({_storage(getattr(m, buffer)) for m in attn.children()}) == 1, buffer
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, model.half()(ids).logits)


def _to_double(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.is_floating_point() else t


class _Converter:
    def convert(self, t: torch.Tensor) -> torch.Tensor:
        return _to_double(t)


@pytest.mark.parametrize("kind", ["function", "bound method"])
def test_model_apply_with_a_long_lived_conversion_function(kind):
    """`_apply` with a module-level function (the groups it holds are dropped as they
    complete) or a bound method (no groups: its attributes are shared by every call): the
    model converts, every layer stays consistent, outputs equal the separately stored
    layers'; a function rejoins the siblings, a method leaves copies for colocate_siblings."""
    model = tiny_causal_lm("qwen2", 1)
    separate = copy.deepcopy(model)
    qcompile.quantize_(model, G32)
    qcompile.quantize_(separate, UNFUSED_G32)
    fn = _to_double if kind == "function" else _Converter().convert
    for _ in range(2):  # a second call finds no stale group
        model._apply(fn)
    separate.double()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, separate(ids).logits)
    attn = model.model.layers[0].self_attn
    qkvo = list(attn.children())
    shared = len({_storage(m.scales) for m in qkvo}) == 1
    assert shared == (kind == "function")
    assert _to_double.__dict__.get("_qcompile_colocated", {}) == {}
    qcompile.colocate_siblings(model)
    assert len({_storage(m.scales) for m in qkvo}) == 1


def test_colocate_again_after_layers_were_converted_one_by_one():
    """Converting one layer at a time cannot share a converted base with siblings converted
    later; `colocate_siblings` puts them back into one storage."""
    model = tiny_causal_lm("qwen2", 1)
    qcompile.quantize_(model, G32)
    attn = model.model.layers[0].self_attn
    qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
    ids = _ids()
    for m in (*qkv, attn.o_proj):
        m.double()  # a new conversion function per call: each layer gets its own copies
    assert len({_storage(m.scales) for m in qkv}) == 3
    assert len({_storage(m.qweight) for m in qkv}) == 3  # consistent strides per layer
    with torch.no_grad():
        before = model.double()(ids).logits
    qcompile.colocate_siblings(model)
    assert len({_storage(m.scales) for m in (*qkv, attn.o_proj)}) == 1
    assert len({_storage(m.bias) for m in qkv}) == 1
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


# --- the fused graph -------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "layers"), [("llama", 2), ("qwen2", 1)])
@pytest.mark.parametrize("ahead_of_time", [True, False], ids=["quantize_", "backend"])
def test_compiled_graph_has_one_op_per_sibling_group(family, layers, ahead_of_time):
    """q/k/v and gate/up become one op each (4 ops per layer instead of 7), outputs match the
    unfused compiled graph and the eager reference op; no weight is copied for the launch."""
    model = tiny_causal_lm(family, layers)
    reference = copy.deepcopy(model)
    qcompile.quantize_(reference, UNFUSED)  # eager, separate storage: the oracle
    if ahead_of_time:
        qcompile.quantize_(model, FUSED)
    ids = _ids()
    out, be = _compiled(model, FUSED, ids)
    torch._dynamo.reset()
    unfused_out, unfused_be = _compiled(copy.deepcopy(model), UNFUSED, ids)
    with torch.no_grad():
        ref = reference(ids).logits
    gm = be.graph_modules[-1]
    assert len(_ops(gm)) == FUSED_OPS_PER_LAYER * layers
    assert len(_ops(unfused_be.graph_modules[-1])) == UNFUSED_OPS_PER_LAYER * layers
    assert_close_rel(out.logits, unfused_out.logits, torch.float32)
    assert_close_rel(out.logits, ref, torch.float32)
    assert be.report.summary().endswith(
        f"; {5 * layers} sibling layers fused into {2 * layers} launches; "
        f"{layers} attention: {layers} skipped"
    )
    record = {r.name: r for r in be.report.records}[f"model.layers.{layers - 1}.self_attn.k_proj"]
    assert record.fused_note == "fused with q_proj, v_proj: one launch of N=256"
    # The fused op reads views of the storage the separate layers use.
    attn = model.model.layers[0].self_attn
    if ahead_of_time:
        separate = [attn.q_proj.qweight, attn.k_proj.qweight, attn.v_proj.qweight]
        biases = [attn.q_proj.bias] if family == "qwen2" else []
    else:
        scheme = FUSED.scheme
        separate = [packed_weight(m.weight, scheme).qweight for m in (attn.q_proj, attn.k_proj)]
        biases = []
    qkv = _ops(gm)[0]  # layer 0's q/k/v: the first op in graph order
    assert qkv.args[1].meta["example_value"].shape == (16, 256)
    assert {_storage(qkv.args[1].meta["example_value"])} == {_storage(t) for t in separate}
    if biases:  # co-located biases: the fused bias is a view of them too
        assert _storage(qkv.args[4].meta["example_value"]) == _storage(biases[0])
    assert (qkv.args[4] is None) == (family == "llama")


@pytest.mark.parametrize("ahead_of_time", [True, False], ids=["quantize_", "backend"])
def test_a_second_compile_hits_aot_autograds_cache(ahead_of_time):
    """Every tensor node the passes add carries an `example_value`, as Dynamo's own do, so
    AOT autograd caches the rewritten graph: a second compile (a restarted process) loads it
    instead of tracing again, and computes the same logits. Before, the fused graph's
    `narrow(...).view(...)` made AOT bypass its cache on every compile."""
    from torch._inductor.utils import fresh_cache

    model = tiny_causal_lm("llama", 1)
    if ahead_of_time:
        qcompile.quantize_(model, FUSED)
    ids = _ids()
    with fresh_cache():
        out, be = _compiled(model, FUSED, ids)
        gm = be.graph_modules[-1]
        tensor_ops = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
        tensor_ops = [n for n in tensor_ops if n.target is not torch._C._log_api_usage_once]
        assert [n.name for n in tensor_ops if "example_value" not in n.meta] == []
        assert counters["aot_autograd"]["autograd_cache_hit"] == 0
        torch._dynamo.reset()
        again, _ = _compiled(model, FUSED, ids)
        assert counters["aot_autograd"]["autograd_cache_hit"] == 1
        assert counters["aot_autograd"]["autograd_cache_bypass"] == 0
    assert torch.equal(again.logits, out.logits)


class Siblings(nn.Module):
    """Three linears on x (b on x + 1 when `same_input` is False), K=64."""

    def __init__(self, bias=(True, True, True), widths=(32, 16, 48), same_input=True):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = (
            nn.Linear(64, n, bias=has) for n, has in zip(widths, bias, strict=True)
        )
        self.same_input = same_input

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x if self.same_input else x + 1), self.c(x)], -1)


@pytest.mark.parametrize("ahead_of_time", [True, False], ids=["quantize_", "backend"])
def test_plane_major_x_is_written_by_the_producers(ahead_of_time):
    """q/k/v and gate/up (after the RMSNorms) and down_proj (after SiLU * mul) read x in the
    plane-major order, permuted once per input in the graph, where Inductor fuses it into the
    producer; o_proj (after SDPA, an extern kernel) keeps the natural order. Same output as
    without the option (the reference op undoes the order exactly; Inductor's producers may
    round differently)."""
    layers = 2
    model = tiny_causal_lm("llama", layers)
    if ahead_of_time:
        qcompile.quantize_(model, QuantConfig(plane_major_x=True))
    ids = _ids()
    out, be = _compiled(model, QuantConfig(plane_major_x=True), ids)
    torch._dynamo.reset()
    plain_out, plain_be = _compiled(copy.deepcopy(model), FUSED, ids)  # off by default
    gm = be.graph_modules[-1]
    permutes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is to_planes]
    planes_ops = [n for n in _ops(gm) if n.args[6:] == (PLANE_CHUNK,)]
    assert len(permutes) == len(planes_ops) == 3 * layers  # q/k/v, gate/up, down
    assert {n.args[0] for n in planes_ops} == set(permutes)
    assert len(_ops(gm)) == FUSED_OPS_PER_LAYER * layers
    assert not any(n.args[6:] for n in _ops(plain_be.graph_modules[-1]))
    assert_close_rel(out.logits, plain_out.logits, torch.float32)
    by_name = {r.name.removeprefix("model.layers.0."): r for r in be.report.records}
    for proj in ("self_attn.q_proj", "mlp.up_proj"):
        assert by_name[proj].fusion.startswith("fused into mul of model.layers.0."), proj
    assert by_name["mlp.down_proj"].fusion == "fused into mul of model.layers.0.mlp (LlamaMLP)"
    assert by_name["self_attn.o_proj"].fusion.startswith(
        "not fused: producer scaled_dot_product_attention is an extern kernel"
    )
    assert {r.prologue for r in be.report.records if r.fusion} == {"plane-major x"}
    assert f"; plane-major x fused into its producer for {6 * layers}/{7 * layers}" in (
        be.report.summary()
    )
    assert not any(r.fusion for r in plain_be.report.records)


@pytest.mark.parametrize(
    ("kwargs", "ops", "fused"),
    [
        ({}, 1, 3),
        ({"bias": (False, False, False)}, 1, 3),
        ({"bias": (True, False, True)}, 3, 0),  # mixed: a and c are not adjacent
        ({"bias": (True, True, False)}, 2, 2),  # a and b (both biased) adjacent: fused
        ({"same_input": False}, 3, 0),  # b reads another x, a and c are not adjacent
    ],
)
def test_only_adjacent_siblings_with_one_input_and_bias_presence_fuse(kwargs, ops, fused):
    """`quantize_` co-locates by module (child order a, b, c); the fusion needs adjacency."""
    model = Siblings(**kwargs)
    reference = copy.deepcopy(model)
    qcompile.quantize_(reference, UNFUSED_G32)
    qcompile.quantize_(model, G32)
    x = torch.randn(5, 64)
    out, be = _compiled(model, G32, x)
    assert len(_ops(be.graph_modules[-1])) == ops
    with torch.no_grad():
        assert_close_rel(out, reference(x), torch.float32)
    assert len([r for r in be.report.records if r.fused_with]) == fused


def test_backend_packs_the_siblings_of_each_input_together():
    """Quantizing at compile time, siblings are the linears reading one input: a and c here."""
    model = Siblings(same_input=False)
    reference = copy.deepcopy(model)
    qcompile.quantize_(reference, UNFUSED_G32)
    x = torch.randn(5, 64)
    out, be = _compiled(model, G32, x)
    ops = _ops(be.graph_modules[-1])
    assert len(ops) == 2 and ops[0].args[1].meta["example_value"].shape == (8, 32 + 48)
    with torch.no_grad():
        assert_close_rel(out, reference(x), torch.float32)
    assert {r.name: r.fused_with for r in be.report.records} == {"a": ("c",), "b": (), "c": ("a",)}
    assert _storage(packed_weight(model.a.weight, G32.scheme).scales) == _storage(
        packed_weight(model.c.weight, G32.scheme).scales
    )


def _w4a16(k: int, n: int, group: int, perm: torch.Tensor | None = None) -> W4A16Linear:
    packed = quantize_weight_int4(torch.randn(n, k), Scheme(group_size=group))
    return W4A16Linear(packed, torch.randn(n), perm)


def test_different_group_sizes_and_permuted_layers_are_not_colocated_or_fused():
    torch.manual_seed(0)
    model = Siblings()
    model.a, model.b = _w4a16(64, 32, 32), _w4a16(64, 16, 64)  # same K, other group sizes
    model.c = _w4a16(64, 48, 32, perm=torch.randperm(64))
    assert qcompile.colocate_siblings(model) == []
    x = torch.randn(3, 64)
    with torch.no_grad():
        eager = model(x)
    out, be = _compiled(model, G32, x)
    assert len(_ops(be.graph_modules[-1])) == 3
    assert_close_rel(out, eager, torch.float32)
    assert not any(r.fused_with for r in be.report.records)


def test_fuse_siblings_false_keeps_the_unfused_graph_and_separate_storage():
    model = tiny_causal_lm("llama", 1)
    qcompile.quantize_(model, UNFUSED)
    attn = model.model.layers[0].self_attn
    assert len({_storage(m.qweight) for m in attn.children()}) == 4
    _, be = _compiled(model, UNFUSED, _ids())
    gm = be.graph_modules[-1]
    assert len(_ops(gm)) == UNFUSED_OPS_PER_LAYER
    assert not [n for n in gm.graph.nodes if n.target is torch.narrow]
    assert not any(r.fused_with for r in be.report.records)
    assert "sibling" not in be.report.summary()


def test_aliased_buffers_do_not_cause_recompiles():
    """Dynamo guards distinct tensor objects, not storages: co-located buffers (views of one
    storage) pass its NO_TENSOR_ALIASING guard, and AOT autograd only builds synthetic bases
    for aliased inputs that are mutated, which these never are."""
    model = tiny_causal_lm("llama", 1)
    qcompile.quantize_(model, FUSED)
    be = qcompile.backend(FUSED)
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        for seed in range(3):
            compiled(_ids(seed=seed))
    assert be.report.graphs == 1
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    assert len(_ops(be.graph_modules[-1])) == FUSED_OPS_PER_LAYER


def test_recompile_reuses_the_colocated_packs():
    model = tiny_causal_lm("llama", 1)
    _, first = _compiled(model, FUSED, _ids())
    torch._dynamo.reset()
    _, second = _compiled(model, FUSED, _ids(seed=1))

    def constants(be):
        return [n.meta["example_value"] for n in be.graph_modules[-1].graph.find_nodes(
            op="placeholder") if n.name.startswith("qc_fused")]  # fmt: skip

    assert [_storage(t) for t in constants(first)] == [_storage(t) for t in constants(second)]


def test_fused_biases_get_their_gradients_under_autograd():
    """With grad on, a bias that requires grad is concatenated in the graph (differentiable):
    gradients match the eager reference op's (`quantize_` keeps biases as buffers, so the
    reference's bias gradients come from fresh leaf copies)."""
    model = Siblings()
    reference = copy.deepcopy(model)
    qcompile.quantize_(reference, UNFUSED_G32)
    for name in "abc":
        getattr(reference, name).bias.requires_grad_(True)
    x = torch.randn(4, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    be = qcompile.backend(G32)
    torch.compile(model, backend=be)(x).square().sum().backward()
    reference(x_ref).square().sum().backward()
    (fused,) = _ops(be.graph_modules[-1])
    assert fused.args[4].target is torch.cat  # the bias inputs, concatenated in the graph
    for name in "abc":
        grad, ref = getattr(model, name).bias.grad, getattr(reference, name).bias.grad
        assert_close_rel(grad, ref, torch.float32)
    assert_close_rel(x.grad, x_ref.grad, torch.float32)


# --- on the GPU: fused launches read strided column slices natively --------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_graph_matches_unfused_on_cuda(dtype, monkeypatch):
    """The fused op on co-located views (row stride = the group's N) gives what the seven
    separate launches give, under CUDA graphs too (`reduce-overhead`)."""
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "0")  # default configs: no tuning time
    model = tiny_causal_lm("llama", 2, hidden_size=256, intermediate_size=512).to("cuda", dtype)
    qcompile.quantize_(model, G32)
    ids = _ids(2, 9).cuda()
    with torch.no_grad():
        eager = model(ids).logits.float()
        unfused = torch.compile(model, backend=qcompile.backend(UNFUSED_G32))(ids).logits.float()
        torch._dynamo.reset()
        be = qcompile.backend(G32)
        step = torch.compile(model, backend=be, mode="reduce-overhead")
        for _ in range(3):  # warm-up, record, replay
            fused = step(ids).logits.float().clone()
    assert len(_ops(be.graph_modules[0])) == 2 * FUSED_OPS_PER_LAYER + 1  # + lm_head (skip=())
    assert_close_rel(fused, unfused, dtype)
    assert_close_rel(fused, eager, dtype)


def test_precompile_runs_each_distinct_linear_launch_once_and_is_opt_in(monkeypatch):
    """`QCOMPILE_PRECOMPILE=1`: the backend runs every distinct W4A16 launch of a new graph
    once (zero x of the graph's example shape) in a thread it joins before returning, so
    Triton compiles those kernels while Inductor works. Off by default (not yet measured on a
    GPU); outputs do not change."""
    from qcompile.lowering import precompile
    from qcompile.passes.linear import W4A16_OP

    model = tiny_causal_lm("llama", 2)
    qcompile.quantize_(model, FUSED)
    ids = _ids()
    seen = []

    def counting_op(x, qweight, *rest):
        seen.append((tuple(x.shape), tuple(qweight.shape)))
        return W4A16_OP(x, qweight, *rest)

    real_start = precompile.start
    started = []

    def start_on_cpu(gm, inputs, op, targets):
        started.append(gm)
        return real_start(gm, inputs, counting_op, targets, device_type="cpu")

    monkeypatch.setattr(precompile, "start", start_on_cpu)
    out, _ = _compiled(model, FUSED, ids)
    assert started == [] and seen == []  # opt-in
    torch._dynamo.reset()
    monkeypatch.setenv("QCOMPILE_PRECOMPILE", "1")
    again, be = _compiled(model, FUSED, ids)
    gm = be.graph_modules[-1]
    assert started == [gm]
    # one run per distinct (x shape, packed shape): q/k/v, o_proj, gate/up, down_proj of the
    # two identical layers -> 4, with x of the graph's [batch, seq, K]
    assert sorted(set(seen)) == sorted(seen) and len(seen) == FUSED_OPS_PER_LAYER
    k = model.config.hidden_size
    assert {s[0] for s in seen} == {(2, 7, k), (2, 7, model.config.intermediate_size)}
    assert torch.equal(again.logits, out.logits)
