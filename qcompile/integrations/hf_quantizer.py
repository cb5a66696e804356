"""transformers' own save and load for qcompile models: quant_method "qcompile".

    qcompile.quantize_(model, config)                    # or the calibrated / imported paths
    model.save_pretrained("llama-w4/")                   # safetensors + config.json
    model = AutoModelForCausalLM.from_pretrained("llama-w4/")  # after `import qcompile`

config.json's `quantization_config` holds the checkpoint record of `qcompile.checkpoint` (the
same JSON as quantization_config.json, plus `quant_method`), so the two loaders read one
description. Loading swaps the recorded layers in before the weights arrive (no fp16 weight
is allocated for them) and co-locates siblings after. The quantizer loads only checkpoints
quantized by qcompile; `from_pretrained(..., quantization_config=...)` of a float model is
refused with the way to quantize one.

Registration: at `import qcompile` if transformers' quantizer registry is already imported,
otherwise when transformers imports it (an import hook, so neither import pays for it). Without
qcompile imported, transformers warns "Unknown quantization type, got qcompile" and would
load the float layers uninitialized: import qcompile first.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

from torch import nn

QUANT_METHOD = "qcompile"
_registered = False


def register() -> None:
    """Register the config and quantizer classes with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    from transformers.quantizers.auto import register_quantization_config, register_quantizer

    config_cls, quantizer_cls = _classes()
    register_quantization_config(QUANT_METHOD)(config_cls)
    register_quantizer(QUANT_METHOD)(quantizer_cls)


def mark_quantized(model: nn.Module) -> None:
    """Give a transformers model holding qcompile layers the quantizer that `save_pretrained`
    asks for (no-op for other models). Its record is written at save time, from the layers as
    they are then (a cast after quantizing changes the scales' dtype)."""
    from qcompile.checkpoint import _is_transformers_model

    if not _is_transformers_model(model):
        return
    register()
    config_cls, quantizer_cls = _classes()
    config = config_cls()
    model.config.quantization_config = config
    model.hf_quantizer = quantizer_cls(config, pre_quantized=True)


# transformers looks quantization methods up in this module (from_pretrained, save_pretrained)
_WATCHED = "transformers.quantizers.auto"


class _OnQuantizersImport(importlib.abc.MetaPathFinder):
    """Runs `register` right after transformers first imports its quantizer registry, so
    neither `import qcompile` nor `import transformers` pays for importing it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _WATCHED:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    """Register now if transformers' quantizer registry is imported, else when it is."""
    if _WATCHED in sys.modules:
        register()
    elif importlib.util.find_spec("transformers") is not None and not any(
        isinstance(f, _OnQuantizersImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _OnQuantizersImport())


_CLASSES: tuple[type, type] | None = None


def _classes() -> tuple[type, type]:
    """The config and quantizer classes (defined on first use: they subclass transformers')."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from qcompile import checkpoint

    class QcompileConfig(QuantizationConfigMixin):
        """config.json's record of a qcompile model (`qcompile.checkpoint`'s format)."""

        def __init__(self, **record):
            self.quant_method = QUANT_METHOD
            record.pop("quant_method", None)
            self.record = record

        def to_dict(self) -> dict:
            return {"quant_method": QUANT_METHOD, **self.record}

        @classmethod
        def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
            config = cls(**config_dict)
            return (config, kwargs) if return_unused_kwargs else config

        def to_diff_dict(self) -> dict:
            return self.to_dict()

    class QcompileHfQuantizer(HfQuantizer):
        """Loads and saves models quantized by qcompile (never quantizes while loading)."""

        # False so that `validate_environment` refuses a float model with our message
        # (transformers' own check for calibrated methods names no way out).
        requires_calibration = False

        def validate_environment(self, *args, **kwargs):
            if not self.pre_quantized:
                raise ValueError(
                    "quant_method='qcompile' loads checkpoints quantized by qcompile; to quantize "
                    "a float model, load it and call qcompile.quantize_(model, config) (or run "
                    "`qcompile quantize`)"
                )
            checkpoint.check_record(self.quantization_config.record, "config.json")

        def _process_model_before_weight_loading(self, model, **kwargs):
            for name, entry in self.quantization_config.record["modules"].items():
                checkpoint._install_layer(model, name, entry)

        def _process_model_after_weight_loading(self, model, **kwargs):
            from qcompile.quantize import colocate_siblings

            # Scales and offsets come in the dtype they were saved in; the W4A16 kernels take
            # them in the activations' dtype, i.e. the one the model was loaded in (W4A8's
            # channel scales stay float32: `W4A8Linear._apply`).
            model.to(model.dtype)
            colocate_siblings(model)  # the siblings arrive as separate tensors
            return model

        def get_state_dict_and_metadata(self, model):
            # Written at save time from the layers as they are: the record, and separate,
            # contiguous tensors (safetensors and transformers' tied-weight check refuse
            # co-located sibling views), a tied tensor once (as save_quantized writes it).
            record = checkpoint.quantization_record(model)
            self.quantization_config.record = record
            state = model.state_dict()
            tensors = {n: t.detach() for n, t in state.items() if n not in record["tied"]}
            return checkpoint._unshared(tensors), {}

        def is_serializable(self, safe_serialization=None) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

        @property
        def is_compileable(self) -> bool:
            return True

    _CLASSES = (QcompileConfig, QcompileHfQuantizer)
    return _CLASSES
