"""Activation statistics of a model's linear layers over calibration data, and the
block-by-block driver that lets each block be calibrated on already-quantized inputs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm


class InputRecorder:
    """Context manager: while active, feeds the input X [rows, K] of each named nn.Linear of
    `model` (default: all) to `_update` over whatever forward passes run; `result()` gives the
    per-layer statistic."""

    def __init__(self, model: nn.Module, names: Iterable[str] | None = None):
        wanted = set(names) if names is not None else None
        self._targets = [
            (name, mod)
            for name, mod in model.named_modules()
            if type(mod) is nn.Linear and (wanted is None or name in wanted)
        ]
        self._hooks: list = []

    def _update(self, name: str, x: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _hook(self, name: str):
        def record(_module, inputs, _output):
            self._update(name, inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float())

        return record

    def __enter__(self):
        self._hooks = [mod.register_forward_hook(self._hook(name)) for name, mod in self._targets]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


class HessianRecorder(InputRecorder):
    """Accumulates X^T X of each linear's input (GPTQ, AWQ)."""

    def __init__(self, model: nn.Module, names: Iterable[str] | None = None):
        super().__init__(model, names)
        self._sums: dict[str, torch.Tensor] = {}
        self._rows: dict[str, int] = {}

    def _update(self, name: str, x: torch.Tensor) -> None:
        if name not in self._sums:
            self._sums[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self._rows[name] = 0
        self._sums[name].addmm_(x.t(), x)
        self._rows[name] += x.shape[0]

    def hessians(self) -> dict[str, torch.Tensor]:
        """H = 2 X^T X / rows per layer (the GPTQ objective's Hessian)."""
        return {name: 2 * s / self._rows[name] for name, s in self._sums.items()}

    result = hessians


class AbsMaxRecorder(InputRecorder):
    """Per-input-channel max |X| of each linear's input (SmoothQuant's activation scales)."""

    def __init__(self, model: nn.Module, names: Iterable[str] | None = None):
        super().__init__(model, names)
        self._absmax: dict[str, torch.Tensor] = {}

    def _update(self, name: str, x: torch.Tensor) -> None:
        m = x.abs().amax(dim=0)
        self._absmax[name] = torch.maximum(self._absmax[name], m) if name in self._absmax else m

    def result(self) -> dict[str, torch.Tensor]:
        return dict(self._absmax)


@torch.no_grad()
def collect_input_hessians(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    names: Iterable[str] | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Input Hessians of the named nn.Linear layers over `model(batch)` for each batch.

    One pass of the full-precision model; memory is one K x K float32 matrix per layer.
    """
    with HessianRecorder(model, names) as recorder:
        for batch in tqdm(list(batches), desc="calibration", disable=not progress, leave=False):
            model(batch)
    return recorder.hessians()


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the inputs it needed were captured."""


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's repeated blocks: the longest nn.ModuleList whose blocks contain linears."""
    lists = [
        m
        for m in model.modules()
        if isinstance(m, nn.ModuleList)
        and len(m) > 1
        and any(isinstance(x, nn.Linear) for x in m[0].modules())
    ]
    if not lists:
        raise ValueError(
            f"find_blocks: {type(model).__name__} has no nn.ModuleList of blocks with linears"
        )
    return max(lists, key=len)


def _without_caches(kwargs: dict) -> dict:
    """The block's keyword arguments with any KV cache (a transformers `Cache`) dropped.

    A captured cache would make every later call of the block append its keys and values
    to the first call's, and causal attention (aligned to the first key) would go on
    reading the first call's: the block's output would miss its own K/V projections'
    quantization error."""
    out = {}
    for name, value in kwargs.items():
        if "Cache" in (c.__name__ for c in type(value).__mro__):
            value = None
        elif name == "use_cache":
            value = False
        out[name] = value
    return out


def block_output(out) -> torch.Tensor:
    """A block's hidden state (transformers blocks return it alone or first in a tuple)."""
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, block: nn.Module, batches: Iterable[torch.Tensor]
) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) `block` is called with for each batch, each forward stopped there
    (any KV cache dropped: `_without_caches`)."""
    captured: list[tuple[tuple, dict]] = []

    def capture(_module, args, kwargs):
        captured.append((args, _without_caches(kwargs)))
        raise _StopForward

    hook = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_StopForward):
                model(batch)
    finally:
        hook.remove()
    return captured


@torch.no_grad()
def quantize_sequentially(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    quantize_block: Callable[[str, nn.Module, dict[str, torch.Tensor]], None],
    progress: bool = True,
) -> None:
    """Calibrate block by block: each block's input Hessians come from the already-quantized
    blocks before it, so later layers see (and GPTQ compensates) the earlier layers' error.

    `quantize_block(prefix, block, hessians)` quantizes one block in place; `hessians` is
    keyed by module path inside the block. Memory: every batch's block input plus one
    block's Hessians. Modules before the first block run once per batch.
    """
    blocks = find_blocks(model)
    prefix = next(name for name, m in model.named_modules() if m is blocks)
    captured = capture_block_inputs(model, blocks[0], batches)

    for i, block in enumerate(tqdm(blocks, desc="blocks", disable=not progress, leave=False)):
        with HessianRecorder(block) as recorder:
            for args, kwargs in captured:
                block(*args, **kwargs)
        quantize_block(f"{prefix}.{i}", block, recorder.hessians())
        outputs = [block(*args, **kwargs) for args, kwargs in captured]
        captured = [
            ((block_output(out), *args[1:]), kwargs)
            for out, (args, kwargs) in zip(outputs, captured, strict=True)
        ]
