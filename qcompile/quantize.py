"""Ahead-of-time quantization: swap nn.Linear for `W4A16Linear` / `W4A8Linear` in place,
freeing the fp16 weights."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qcompile.config import QuantConfig, Scheme
from qcompile.passes.linear import (
    UnsupportedLayerError,
    describe,
    execution_path,
    unsupported_reason,
)
from qcompile.quant.colocate import (
    colocated_views,
    column_slice_geometry,
    convert_colocated,
    spanning_view,
)
from qcompile.quant.int4 import NIBBLES_PER_WORD, PackedInt4
from qcompile.quant.rtn import quantize_weight_int4
from qcompile.quant.w4a8 import PackedW4A8, quantize_weight_w4a8
from qcompile.report import CompileReport, LayerRecord


class W4A16Linear(nn.Module):
    """A linear layer holding a packed int4 weight (layout: `qcompile.quant.int4`).

    Buffers: qweight [K/8, N] int32, scales and offsets [K/G, N], bias [N] or None, and
    perm [K] int64 or None. `perm` is set only for checkpoints whose groups are scattered along
    K (GPTQ act-order, see `qcompile.integrations.gptq`): the packed weight's input feature j
    is the original feature perm[j], so forward gathers x[..., perm] first.
    `scheme` is the `Scheme` the codes were made with, when known (saved in checkpoints).
    `in_features` below the packed K: the weight was padded to whole groups
    (`Scheme.pad_k`), and forward pads x with zeros to match.
    """

    def __init__(
        self,
        packed: PackedInt4,
        bias: torch.Tensor | None,
        perm: torch.Tensor | None = None,
        scheme: Scheme | None = None,
        in_features: int | None = None,
    ):
        super().__init__()
        self.out_features, packed_k = packed.shape
        self.in_features = _real_in_features(packed_k, in_features, packed.group_size)
        self.group_size = packed.group_size
        self.scheme = scheme
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("offsets", packed.offsets)
        self.register_buffer("bias", bias)
        self.register_buffer("perm", perm)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, scheme: Scheme, packed: PackedInt4 | None = None
    ) -> W4A16Linear:
        """Quantize `linear` with RTN, or wrap `packed` (e.g. from GPTQ) with its bias."""
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(
            packed if packed is not None else quantize_weight_int4(linear.weight, scheme),
            bias,
            scheme=scheme,
            in_features=linear.in_features,
        )

    def _apply(self, fn, recurse=True):
        # Module.to() / .half() convert every buffer on its own: co-located siblings would each
        # get contiguous copies of their floating-point scales and offsets while the int32
        # qweight stays a slice, breaking the op's one-row-stride contract and the fusion.
        groups = [
            names
            for names in (_COLOCATED_BUFFERS, ("bias",))
            if all(
                (b := self._buffers.get(n)) is not None and column_slice_geometry(b) is not None
                for n in names
            )
        ]
        hidden = {n: self._buffers[n] for names in groups for n in names}
        self._buffers.update(dict.fromkeys(hidden))  # None: skipped by Module._apply
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update(hidden)
        for names in groups:
            convert_colocated(self, names, fn)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        x = _pad_input(x, self.qweight.shape[0] * NIBBLES_PER_WORD)
        return torch.ops.qcompile.w4a16_linear(
            x, self.qweight, self.scales, self.offsets, self.bias, self.group_size
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class W4A8Linear(nn.Module):
    """A linear layer holding a QoQ W4A8 weight (layout: `qcompile.quant.w4a8`); its input is
    quantized per token to `scheme.act_dtype` by the op (int8 or float8_e4m3fn).

    Buffers: qweight [K/8, N] int32, group_scales and group_zeros [K/G, N] uint8,
    channel_scales [N] float32, bias [N] or None. `in_features` as for `W4A16Linear`.
    """

    def __init__(
        self,
        packed: PackedW4A8,
        bias: torch.Tensor | None,
        scheme: Scheme,
        in_features: int | None = None,
    ):
        super().__init__()
        self.out_features, packed_k = packed.shape
        self.in_features = _real_in_features(packed_k, in_features, packed.group_size)
        self.group_size = packed.group_size
        self.scheme = scheme
        self.act_dtype = scheme.act_dtype
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("group_scales", packed.group_scales)
        self.register_buffer("group_zeros", packed.group_zeros)
        self.register_buffer("channel_scales", packed.channel_scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, scheme: Scheme, packed: PackedW4A8 | None = None
    ) -> W4A8Linear:
        """Quantize `linear` (progressive RTN), or wrap an already `packed` weight."""
        if packed is not None and not isinstance(packed, PackedW4A8):
            raise TypeError(
                f"W4A8Linear.from_linear: got {type(packed).__name__}; W4A8 takes a PackedW4A8 "
                "(qcompile.quant.w4a8.quantize_weight_w4a8), not W4A16 codes"
            )
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(
            packed if packed is not None else quantize_weight_w4a8(linear.weight, scheme),
            bias,
            scheme,
            in_features=linear.in_features,
        )

    def _apply(self, fn, recurse=True):
        # channel_scales is float32 by the layout's contract: a model-wide dtype conversion
        # (.half(), .to(torch.bfloat16)) moves it with the model but must not round it.
        channel_scales = self.channel_scales
        super()._apply(fn, recurse)
        if self.channel_scales.dtype != channel_scales.dtype:
            self.channel_scales = channel_scales.to(self.channel_scales.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qcompile.w4a8_linear(
            _pad_input(x, self.qweight.shape[0] * NIBBLES_PER_WORD),
            self.qweight,
            self.group_scales,
            self.group_zeros,
            self.channel_scales,
            self.bias,
            self.group_size,
            self.act_dtype,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, act_dtype={self.act_dtype}"
        )


def _real_in_features(packed_k: int, in_features: int | None, group: int) -> int:
    """The layer's K: `in_features`, which may fall short of the packed K by padding to
    whole groups (less than one group), or the packed K."""
    if in_features is None:
        return packed_k
    if not 0 < in_features <= packed_k or packed_k - in_features >= group:
        raise ValueError(
            f"in_features={in_features} does not fit a packed K={packed_k} with group_size="
            f"{group} (padding to whole groups adds less than one group)"
        )
    return in_features


def _pad_input(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., K0] with zeros up to [..., k] (a layer padded to whole groups)."""
    return x if x.shape[-1] == k else F.pad(x, (0, k - x.shape[-1]))


# W4A16Linear buffers that `colocate_siblings` stores as column slices of one tensor per kind.
_COLOCATED_BUFFERS = ("qweight", "scales", "offsets")


def colocate_siblings(model: nn.Module) -> list[list[str]]:
    """Store sibling `W4A16Linear`s' packed tensors as column slices of one tensor per kind.

    Siblings: direct children of one module with equal in_features, group size, tensor dtypes
    and device, and no `perm`, in child order. Their qweight / scales / offsets (and the biases
    of those that have one, if of one dtype) become views of one tensor each (layout:
    `qcompile.quant.colocate`), and the separate tensors are freed. Outputs are unchanged: each
    module still computes its own output from its own view; the backend's fusion pass turns
    siblings that read the same input into one launch. `quantize_` and the checkpoint loaders
    call this. A model-wide `.to()` / `.half()` keeps the layout (`W4A16Linear._apply`); call
    this again after converting sibling layers one by one, which leaves each its own copy.
    Returns the module paths of each group co-located.
    """
    groups: list[list[str]] = []
    seen: set[int] = set()
    for parent_name, parent in model.named_modules():
        by_key: dict[tuple, list[tuple[str, W4A16Linear]]] = {}
        for child_name, child in parent.named_children():
            if type(child) is not W4A16Linear or child.perm is not None or id(child) in seen:
                continue
            key = (
                child.in_features,
                child.group_size,
                *((getattr(child, b).dtype, getattr(child, b).device) for b in _COLOCATED_BUFFERS),
            )
            by_key.setdefault(key, []).append((child_name, child))
        for members in by_key.values():
            if len(members) < 2:
                continue
            modules = [m for _, m in members]
            seen.update(id(m) for m in modules)
            for buffer in _COLOCATED_BUFFERS:
                _colocate_buffer(modules, buffer)
            biased = [m for m in modules if m.bias is not None]
            if len(biased) > 1 and len({(m.bias.dtype, m.bias.device) for m in biased}) == 1:
                _colocate_buffer(biased, "bias")
            prefix = f"{parent_name}." if parent_name else ""
            groups.append([prefix + name for name, _ in members])
    return groups


def _colocate_buffer(modules: list[W4A16Linear], buffer: str) -> None:
    """Make `buffer` of `modules` views of one tensor, unless it already is."""
    tensors = [getattr(m, buffer) for m in modules]
    if spanning_view(tensors) is None:
        for m, view in zip(modules, colocated_views(tensors), strict=True):
            setattr(m, buffer, view)


# The module `quantize_` swaps in, per `Scheme.name`.
QUANTIZED_MODULES: dict[str, type[W4A16Linear] | type[W4A8Linear]] = {
    "w4a16": W4A16Linear,
    "w4a8": W4A8Linear,
}

# (name, linear, scheme) -> the packed weight in the scheme's layout, or None for its RTN.
WeightQuantizer = Callable[[str, nn.Linear, Scheme], PackedInt4 | PackedW4A8 | None]


def quantize_(
    model: nn.Module,
    config: QuantConfig | None = None,
    quantizer: WeightQuantizer | None = None,
    prefix: str = "",
) -> CompileReport:
    """Replace every supported `nn.Linear` of `model` by the scheme's module (`W4A16Linear`,
    `W4A8Linear`; `QUANTIZED_MODULES`), in place.

    `quantizer(name, linear, scheme)` chooses the codes (default, or where it returns None:
    RTN, progressive for W4A8; `qcompile.quant.gptq.gptq_quantizer` runs GPTQ for either).
    The fp16 weights are released as each layer is swapped (peak extra memory: one layer). `prefix` is `model`'s path inside a larger model
    (skip patterns and the report use full paths). With `config.fuse_siblings`, sibling
    layers' packed tensors are then co-located (`colocate_siblings`) so the backend can run
    them as one launch. Returns the report of what was quantized, skipped or left in full
    precision and why.
    """
    config = config or QuantConfig()
    report = CompileReport()
    names = [name for name, mod in model.named_modules() if type(mod) is nn.Linear]
    embeddings: dict[int, list[str]] = {}  # id(weight) -> embeddings reading it (tied lm_head)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            embeddings.setdefault(id(mod.weight), []).append(f"{prefix}.{name}" if prefix else name)
    decisions: list[tuple[str, LayerRecord | None, list[str]]] = []
    for name in names:  # decide every layer first: "raise" leaves the model untouched
        full = f"{prefix}.{name}" if prefix else name
        weight = model.get_submodule(name).weight
        shape, dtype, device = tuple(weight.shape), weight.dtype, weight.device.type
        tied = embeddings.get(id(weight), [])
        del weight  # keep no reference: each fp16 weight is freed when its layer is swapped
        record = None
        if config.skips(full):
            record = LayerRecord(full, shape, "skipped", "matches a skip pattern")
        elif (reason := unsupported_reason(shape, dtype, device, config.scheme)) is not None:
            if config.on_unsupported == "raise":
                raise UnsupportedLayerError(f"{full}: {reason}")
            record = LayerRecord(full, shape, "fallback", reason)
        decisions.append((name, record, tied))
    for name, record, tied in decisions:
        if record is None:  # only the model refers to the layer: swapping it frees its weight
            parent_name, _, attr = name.rpartition(".")
            linear = model.get_submodule(name)
            packed = quantizer(name, linear, config.scheme) if quantizer is not None else None
            q = QUANTIZED_MODULES[config.scheme.name].from_linear(linear, config.scheme, packed)
            del linear
            setattr(model.get_submodule(parent_name), attr, q)
            shape = (q.out_features, q.in_features)
            detail = describe(config.scheme, q.group_size, tied, q.in_features)
            full = f"{prefix}.{name}" if prefix else name
            record = LayerRecord(full, shape, "quantized", detail, execution_path(q.qweight))
        report.add(record)
    if config.fuse_siblings:
        colocate_siblings(model)
    if not prefix and report.by_status("quantized"):
        from qcompile.integrations.hf_quantizer import mark_quantized

        mark_quantized(model)  # transformers' save_pretrained then writes a qcompile checkpoint
    report.log()
    return report


def quantize_and_compile(
    config: QuantConfig | None = None, *, mode: str | None = None, ahead_of_time: bool = True
):
    """Class decorator: every instance quantizes itself and compiles with the qcompile backend.

    The work happens on an instance's first forward call (after weights are loaded, e.g. by
    `from_pretrained`). `ahead_of_time=True` runs `quantize_` first so fp16 weights are freed.
    """
    from qcompile.backend import backend

    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        forward = cls.forward

        @functools.wraps(forward)
        def compiled_forward(self, *args, **kwargs):
            fn = self.__dict__.get("_qcompile_forward")
            if fn is None:
                if ahead_of_time:
                    self.qcompile_report = quantize_(self, config)
                self._qcompile_backend = backend(config)
                fn = torch.compile(forward.__get__(self), backend=self._qcompile_backend, mode=mode)
                self.__dict__["_qcompile_forward"] = fn
            return fn(*args, **kwargs)

        cls.forward = compiled_forward
        return cls

    return decorate
