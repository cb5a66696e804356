"""The torch.compile entry: run the qcompile passes, hand the rest of the graph to Inductor.

Registered as the `qcompile` entry point of `torch_dynamo_backends`, so
`torch.compile(model, backend="qcompile")` works after `pip install` with no import.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node

from qcompile.config import QuantConfig
from qcompile.lowering import precompile
from qcompile.passes.attention import rewrite_attention
from qcompile.passes.fuse import fuse_sibling_linears
from qcompile.passes.linear import W4A16_OP, W4A16_TARGETS, GraphConstants, rewrite_linears
from qcompile.report import CompileReport

log = logging.getLogger(__name__)


def _fresh_graph_module(gm: GraphModule) -> GraphModule:
    """A copy of Dynamo's graph that passes may edit, keeping the metadata Inductor reads.

    Dynamo's own graph must stay untouched (it looks its placeholders up again after the
    backend returns); AOT autograd reads `gm.meta`, `_param_name_to_source` and each
    placeholder's `_dynamo_source` to tell static inputs (weights) from activations.
    """
    graph = copy.deepcopy(gm.graph)
    new = GraphModule(gm, graph)
    new.meta = dict(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = gm._param_name_to_source
    for old, fresh in zip(
        gm.graph.find_nodes(op="placeholder"), graph.find_nodes(op="placeholder"), strict=True
    ):
        if hasattr(old, "_dynamo_source"):
            fresh._dynamo_source = old._dynamo_source
    return new


def _fill_example_values(gm: GraphModule, constants: list[torch.Tensor]) -> None:
    """Give the nodes the passes created Dynamo's `example_value` (a fake output), as every
    Dynamo node has. AOT autograd's cache refuses a graph with a method call on a node
    without one (`narrow(...).view(...)` after sibling fusion), and without that cache a
    warm restart repeats AOT's whole trace. Best effort: a node that cannot be evaluated
    keeps no value (the cache is then bypassed, as before)."""
    from torch._subclasses.fake_tensor import FakeTensor

    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    given = [p.meta.get("example_value") for p in placeholders]
    # Dynamo's tracing fake mode (the backend's own shares its ShapeEnv but not its tensors)
    fake_mode = next((v.fake_mode for v in given if isinstance(v, FakeTensor)), None)
    if fake_mode is None:
        return
    values: dict[Node, Any] = dict(zip(placeholders, given, strict=True))
    first_constant = len(placeholders) - len(constants)
    with fake_mode:
        for node, t in zip(placeholders[first_constant:], constants, strict=True):
            # the packed weights the passes added: fresh fakes of their layout (`from_tensor`
            # would rebuild each one's base, the whole co-located buffer)
            values[node] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if "example_value" in node.meta:
                values[node] = node.meta["example_value"]
                continue
            if node.op not in ("call_function", "call_method") or not any(
                isinstance(values.get(a), FakeTensor) for a in node.all_input_nodes
            ):
                continue  # not a tensor op (`_log_api_usage_once`) or its inputs are unknown
            try:
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
                if node.op == "call_function":
                    value = node.target(*args, **kwargs)
                else:
                    value = getattr(args[0], node.target)(*args[1:], **kwargs)
            except Exception:  # noqa: BLE001 - only the cache is at stake
                continue
            node.meta["example_value"] = values[node] = value


def _static_fakes(example_inputs: Sequence[Any], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Fake copies of the packed weights with static shapes, in Dynamo's fake mode.

    Real tensors without a Dynamo source would get symbolic sizes in a dynamic-shape graph,
    and guards on sizes nobody can name fail; weights never change shape.
    """
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    if fake_mode is None:
        return tensors
    return [fake_mode.from_tensor(t, static_shapes=True) for t in tensors]


# Inductor options the backend sets unless the caller's `options` do. Coalescing analysis
# of tilings solves index equations with sympy (numerically: mpmath's pslq); on a 32-layer
# Llama-3-8B decode step at batch 16 it took ~14 of 69 s of compile time on the H100, and
# turning it off left the step time within noise (4.88 vs 4.90 ms). Inductor skips it for
# dynamic shapes anyway.
#
# Inductor's kernels are launched with programmatic dependent launch (PDL, sm_90+; Inductor
# checks the device), as the W4A16 lane kernel is (`lowering.w4a16._LANE_PDL`): each kernel
# starts while the one before drains. A 16-layer Llama-3-8B-shaped decode step at 8000
# tokens (bf16, H100, A/B/A/B, `results/session33/pdlaba/`) went 3.87 / 3.72 -> 3.54 / 3.33 ms
# (W4A16) and 3.55 / 3.10 -> 3.19 / 2.80 ms (W4A16 + KV4) with both on. `_INDUCTOR_PDL` is
# the switch the benchmarks flip.
_INDUCTOR_PDL = True


def _inductor_defaults() -> dict[str, Any]:
    import torch._inductor.config as inductor_config

    defaults: dict[str, Any] = {}
    if hasattr(inductor_config.triton, "coalesce_tiling_analysis"):
        defaults["triton.coalesce_tiling_analysis"] = False
    if hasattr(inductor_config.triton, "enable_pdl"):
        defaults["triton.enable_pdl"] = _INDUCTOR_PDL
    return defaults


def _with_constants(compiled: Callable, constants: list[torch.Tensor]) -> Callable:
    """Call `compiled` with the graph's inputs followed by the packed weights."""
    if not constants:
        return compiled

    def run(*args: Any) -> Any:
        return compiled(*args, *constants)

    return run


class QCompileBackend:
    """A torch.compile backend quantizing linear layers with one `QuantConfig`, running sibling
    linears on one input as one launch (`passes/fuse.py`), and rewriting attention that reads a
    KV4 cache into `kv4_attention` (`passes/attention.py`).

    `report` accumulates what every compiled graph matched, quantized and left alone.
    `mode` / `options` are Inductor's (`mode="reduce-overhead"` for CUDA graphs).
    """

    def __init__(self, config: QuantConfig | None = None):
        self.config = config or QuantConfig()
        self.report = CompileReport()
        self.graph_modules: list[GraphModule] = []  # the rewritten graphs, for inspection

    def __deepcopy__(self, memo: dict) -> QCompileBackend:
        """The backend itself: a copy would collect the report where nobody reads it.

        transformers deep-copies `CompileConfig.to_dict()` (backend included) before calling
        `torch.compile` in `generate`.
        """
        return self

    def __call__(
        self,
        gm: GraphModule,
        example_inputs: Sequence[Any],
        mode: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> Callable:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        t0 = time.perf_counter()
        report = CompileReport(graphs=1)
        new_gm = _fresh_graph_module(gm)
        constants = GraphConstants()
        rewrite_linears(new_gm, list(example_inputs), self.config, report, constants)
        fuse_sibling_linears(new_gm, list(example_inputs), self.config, report, constants)
        rewrite_attention(new_gm, self.config, report)
        report.log()
        self.report.records.extend(report.records)
        self.report.attention.extend(report.attention)
        self.report.graphs += 1
        self.report.pass_seconds += time.perf_counter() - t0
        self.graph_modules.append(new_gm)
        patches = {
            **_inductor_defaults(),
            **(list_mode_options(mode) if mode else {}),
            **(options or {}),
        }
        inputs = [*example_inputs, *_static_fakes(example_inputs, constants.tensors)]
        try:
            _fill_example_values(new_gm, constants.tensors)
        except Exception as e:  # noqa: BLE001 - only AOT autograd's cache is at stake
            log.debug("qcompile: example values not filled (%r); AOT's cache is bypassed", e)
        warm = None
        if precompile.enabled():  # the W4A16 kernels compile while Inductor works
            warm = precompile.start(
                new_gm, [*example_inputs, *constants.tensors], W4A16_OP, W4A16_TARGETS
            )
        try:
            compiled = compile_fx(new_gm, inputs, config_patches=patches)
        finally:
            if warm is not None:
                warm.join()
        return _with_constants(compiled, constants.tensors)


def backend(config: QuantConfig | None = None) -> QCompileBackend:
    """A backend for `torch.compile(model, backend=qcompile.backend(config))`."""
    return QCompileBackend(config)


DEFAULT_BACKEND = QCompileBackend()


def qcompile_backend(gm: GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
    """The backend registered as "qcompile": the default `QuantConfig`."""
    return DEFAULT_BACKEND(gm, example_inputs, **kwargs)
