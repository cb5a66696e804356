"""Compile the W4A16 kernels a new graph will launch while Inductor compiles the rest of it.

Triton compiles a kernel on its first launch, in the launching thread: after a batch-size
recompile, the first decode step compiles each new (config, dtype) of the step's linears
one after another (~5 for a Llama-3-8B step). `start` runs every distinct linear of the
graph once, on a zero input of the graph's example shape, in a background thread, so those
compiles overlap Inductor's work; the backend joins it before returning (no launch may
overlap a CUDA-graph capture). Opt-in (`QCOMPILE_PRECOMPILE=1`): on the H200 it moved those
compiles into Dynamo's compile but showed no net warm-up gain over run-to-run noise
(`benchmarks/results/h200/warmup_precompile/`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

log = logging.getLogger(__name__)


def enabled() -> bool:
    return os.environ.get("QCOMPILE_PRECOMPILE", "0") == "1"


@dataclass(frozen=True)
class LinearCall:
    """One launch shape of the op: what its kernels are compiled for (not the data)."""

    x_shape: tuple[int, ...]
    dtype: torch.dtype
    operands: tuple[torch.Tensor | None, ...]  # qweight, scales, offsets, bias
    group_size: int
    x_planes: int


def _hint(size: Any) -> int | None:
    """A size as an int: SymInts give Dynamo's example value."""
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if hint is not None else None


def linear_calls(
    gm: GraphModule, inputs: Sequence[Any], targets: Sequence[Any], device_type: str = "cuda"
) -> list[LinearCall]:
    """The distinct launches of `targets` ops in `gm` on `device_type` (inputs: the graph's
    real inputs in placeholder order), deduplicated by what the kernels specialize on; ops
    whose weights the graph computes, or whose x has no example shape, are left out."""
    real = dict(zip(gm.graph.find_nodes(op="placeholder"), inputs, strict=True))
    calls: dict[tuple, LinearCall] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in targets:
            continue
        x, *rest = node.args
        weights = rest[:4]
        group, x_planes = rest[4], rest[5] if len(rest) > 5 else node.kwargs.get("x_planes", 0)
        example = x.meta.get("example_value") if isinstance(x, Node) else None
        if example is None or not all(w is None or w in real for w in weights):
            continue
        operands = tuple(None if w is None else real[w] for w in weights)
        shape = tuple(_hint(s) for s in example.shape)
        if None in shape or not all(
            isinstance(t, torch.Tensor) and t.device.type == device_type
            for t in operands
            if t is not None
        ):
            continue
        key = (shape, example.dtype, group, x_planes) + tuple(
            None if t is None else (t.dtype, tuple(t.shape), t.stride(), t.data_ptr() % 16)
            for t in operands
        )
        calls.setdefault(key, LinearCall(shape, example.dtype, operands, group, x_planes))
    return list(calls.values())


def _run(op: Any, calls: list[LinearCall]) -> None:
    try:
        with torch.no_grad():
            for c in calls:
                x = torch.zeros(c.x_shape, dtype=c.dtype, device=c.operands[0].device)
                op(x, *c.operands, c.group_size, c.x_planes)
            if calls[0].operands[0].is_cuda:
                torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - a warm-up must never cost the compile
        log.warning("qcompile: kernel precompile stopped early: %r", e)


def start(
    gm: GraphModule,
    inputs: Sequence[Any],
    op: Any,
    targets: Sequence[Any],
    device_type: str = "cuda",
) -> threading.Thread | None:
    """A started thread running `op` once per distinct launch of `gm` (join it), or None."""
    calls = linear_calls(gm, inputs, targets, device_type)
    if not calls:
        return None
    thread = threading.Thread(target=_run, args=(op, calls), name="qcompile-precompile")
    thread.start()
    return thread
