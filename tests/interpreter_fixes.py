"""Test-only fixes to Triton's CPU interpreter (never imported by the package).

The interpreter stores bfloat16 as raw uint16 bits and its `create_dot` multiplies those
bits as integers (seen in triton 3.6-3.9), so any bf16 `tl.dot` returns garbage there while
the same kernel is right on a GPU. We upcast bf16 dot operands to float32 first, which is
what the tensor cores compute (bf16 products are exact in fp32).
"""

from __future__ import annotations


def patch_bf16_dot() -> None:
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_qcompile_bf16_dot", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 in (a.dtype.scalar, b.dtype.scalar):

            def up(h):
                if h.dtype.scalar != tl.bfloat16:
                    return h.data.astype(np.float32)
                return interpreter._convert_float(h.data, tl.bfloat16, tl.float32, None).view(
                    np.float32
                )

            out = np.matmul(up(a), up(b), dtype=np.float32).astype(d.data.dtype) + d.data
            return interpreter.TensorHandle(out, d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    builder._qcompile_bf16_dot = True
