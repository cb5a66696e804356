"""Numerics on plain tensors: quantize, dequantize, pack and unpack int4 weights."""
