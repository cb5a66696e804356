"""torch.library ops: schema, fake implementation, reference implementation, CUDA lowering."""

from qcompile.ops.w4a16 import w4a16_linear, w4a16_linear_reference

__all__ = ["w4a16_linear", "w4a16_linear_reference"]
