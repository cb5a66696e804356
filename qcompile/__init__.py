"""qcompile: a quantizing compiler backend for PyTorch.

model = torch.compile(model, backend="qcompile")                         # defaults
model = torch.compile(model, backend=qcompile.backend(QuantConfig(...)))  # options
qcompile.quantize_(model, config)                                         # frees fp16 weights
qcompile.colocate_siblings(model)          # after casting layers one by one: siblings share storage
qcompile.save_quantized(model, path); model = qcompile.load_quantized(path)  # safetensors
model = qcompile.import_checkpoint(path)                                  # AWQ / GPTQ folders
"""

from __future__ import annotations

import qcompile.ops  # noqa: F401  (registers torch.ops.qcompile.*)
from qcompile.backend import DEFAULT_BACKEND as default_backend
from qcompile.backend import QCompileBackend, backend
from qcompile.checkpoint import import_checkpoint, load_quantized, save_quantized
from qcompile.config import QuantConfig, Scheme
from qcompile.integrations import CheckpointError
from qcompile.passes.linear import UnsupportedLayerError
from qcompile.quantize import (
    W4A8Linear,
    W4A16Linear,
    colocate_siblings,
    quantize_,
    quantize_and_compile,
)
from qcompile.report import CompileReport, LayerRecord

__all__ = [
    "CheckpointError",
    "CompileReport",
    "LayerRecord",
    "QCompileBackend",
    "QuantConfig",
    "Scheme",
    "UnsupportedLayerError",
    "W4A8Linear",
    "W4A16Linear",
    "backend",
    "colocate_siblings",
    "default_backend",
    "import_checkpoint",
    "load_quantized",
    "quantize_",
    "quantize_and_compile",
    "save_quantized",
]
__version__ = "0.1.0"

# transformers' from_pretrained / save_pretrained learn quant_method "qcompile" (now, or when
# transformers is imported).
from qcompile.integrations import hf_quantizer as _hf_quantizer  # noqa: E402

_hf_quantizer.install()
