"""torch.library ops: schema, fake implementation, reference implementation, CUDA lowering."""

from qcompile.ops.attention import decode_attention, decode_attention_reference
from qcompile.ops.kv4 import (
    kv4_attention,
    kv4_attention_reference,
    kv4_cache_write,
    kv4_cache_write_channels,
    kv4_cache_write_reference,
    kv4_dequantize,
    kv4_prefill_attention,
    kv4_prefill_attention_reference,
)
from qcompile.ops.w4a8 import (
    w4a8_linear,
    w4a8_linear_quantized_act,
    w4a8_linear_quantized_act_reference,
    w4a8_linear_reference,
)
from qcompile.ops.w4a16 import w4a16_linear, w4a16_linear_reference

__all__ = [
    "decode_attention",
    "decode_attention_reference",
    "kv4_attention",
    "kv4_attention_reference",
    "kv4_cache_write",
    "kv4_cache_write_channels",
    "kv4_cache_write_reference",
    "kv4_dequantize",
    "kv4_prefill_attention",
    "kv4_prefill_attention_reference",
    "w4a8_linear",
    "w4a8_linear_quantized_act",
    "w4a8_linear_quantized_act_reference",
    "w4a8_linear_reference",
    "w4a16_linear",
    "w4a16_linear_reference",
]
