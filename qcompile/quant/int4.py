"""The packed int4 weight format shared by every W4A16 op and kernel.

Layout (the contract the kernels read; produced only by `pack_int4_along_k`):
    qweight: [K // 8, N] int32, 8 nibbles along K, low nibble first:
             code of w[n, k] = (qweight[k // 8, n] >> (4 * (k % 8))) & 0xF
    scales:  [K // G, N] activation dtype (fp16 / bf16; fp32 for CPU reference use)
    offsets: [K // G, N] same dtype;  w[n, k] ~= code * scales[k // G, n] + offsets[k // G, n]
Every tensor is N-contiguous: a kernel tile of BLOCK_K / 8 words x BLOCK_N columns is rows of
4 * BLOCK_N contiguous bytes (16-byte vector loads, full sectors), and nibble i of a word is
one k of a fixed stride, so unpacking needs no register shuffles (the same packing as GPTQ's
qweight). One group's scales for a BLOCK_N tile are one contiguous load. Storing the float offset
(code-0 value) instead of an integer zero point makes dequantization one FMA and lets
symmetric (offset = -8 * scale), min-max and imported AWQ/GPTQ zero points share one kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NIBBLES_PER_WORD = 8


@dataclass(frozen=True)
class PackedInt4:
    """A quantized [N, K] weight in the layout above."""

    qweight: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the original weight."""
        return self.qweight.shape[1], self.qweight.shape[0] * NIBBLES_PER_WORD

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The packed tensors in op argument order."""
        return self.qweight, self.scales, self.offsets

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def pad_columns(weight: torch.Tensor, k: int) -> torch.Tensor:
    """weight [N, K0] -> [N, k] (k >= K0), the new columns copies of the last one: padding
    that leaves the range of every group holding real columns as it was (`Scheme.pad_k`)."""
    extra = k - weight.shape[-1]
    if extra <= 0:
        return weight
    return torch.cat([weight, weight[..., -1:].expand(*weight.shape[:-1], extra)], dim=-1)


def pack_int4_along_k(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] integer codes in [0, 15] -> [K // 8, N] int32, low nibble first."""
    n, k = codes.shape
    if k % NIBBLES_PER_WORD:
        raise ValueError(f"pack_int4_along_k: K={k} is not divisible by {NIBBLES_PER_WORD}")
    nib = codes.to(torch.int64).t().reshape(k // NIBBLES_PER_WORD, NIBBLES_PER_WORD, n)
    shifts = torch.arange(0, 32, 4, device=codes.device, dtype=torch.int64)
    words = (nib << shifts[:, None]).sum(dim=1)  # < 2**32, exact in int64
    # Reinterpret the unsigned 32-bit value as int32 (two's complement).
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def unpack_int4_along_k(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4_along_k`: [K // 8, N] int32 -> [N, K] uint8 codes."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    codes = (qweight.unsqueeze(1) >> shifts[:, None]) & 0xF  # [K // 8, 8, N]
    return codes.reshape(-1, qweight.shape[1]).t().to(torch.uint8)


def offsets_from_zero_points(
    zeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Offsets (code-0 values) for integer zero points z: (q - z) * s = q * s + (-z * s).

    -z * s is computed exactly (float64) and rounded once to `dtype`. With a 16-bit `dtype` that
    rounding is the only difference from the source format's math: at most half an ulp of
    |z * s| <= 16 * s, i.e. |error| <= 2**-11 * 16 * s < 0.008 * s in fp16, under 2% of the
    half-step error the int4 codes already carry (s / 2); the source formats' own fp16 kernels
    round (q - z) * s to fp16 as well. bf16 storage: <= 2**-8 * 16 * s = s / 16. float32
    storage of 16-bit scales is exact (z * s has at most 16 significant bits).
    """
    return (-(zeros.to(torch.float64) * scales.to(torch.float64))).to(dtype).contiguous()


def dequantize_int4(packed: PackedInt4, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The [N, K] weight the codes stand for, computed in float32, returned in `dtype`."""
    codes = unpack_int4_along_k(packed.qweight).float()
    g = packed.group_size
    scales = packed.scales.float().t().repeat_interleave(g, dim=1)
    offsets = packed.offsets.float().t().repeat_interleave(g, dim=1)
    return (codes * scales + offsets).to(dtype or packed.scales.dtype)


# Activations in plane-major order: within each chunk of PLANE_CHUNK k's, position
# i * (PLANE_CHUNK // 8) + r holds k = 8 r + i, so the codes of nibble i of a chunk's word rows
# (one "plane") meet contiguous activations. The M <= 64 tensor-core kernels feed planes to
# `tl.dot`; the graph pass lets Inductor write x in this order inside its producer.
PLANE_CHUNK = 128


def to_planes(x: torch.Tensor, chunk: int = PLANE_CHUNK) -> torch.Tensor:
    """x [..., K] in natural k order -> contiguous [..., K] plane-major per `chunk`."""
    k = x.shape[-1]
    words = chunk // NIBBLES_PER_WORD
    return x.unflatten(-1, (k // chunk, words, NIBBLES_PER_WORD)).transpose(-1, -2).flatten(-3)


def to_even_odd(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """x [..., K] -> contiguous [..., K] with each `chunk` of k's split into its even k's, then
    its odd k's (position p * chunk/2 + c holds k = 2c + p): the W4A8 SWAR kernel's order,
    whose two int8 planes are a word's low and high nibbles."""
    k = x.shape[-1]
    return x.unflatten(-1, (k // chunk, chunk // 2, 2)).transpose(-1, -2).flatten(-3)


def from_even_odd(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """The inverse of `to_even_odd`."""
    k = x.shape[-1]
    return x.unflatten(-1, (k // chunk, 2, chunk // 2)).transpose(-1, -2).flatten(-3)


def from_planes(x: torch.Tensor, chunk: int = PLANE_CHUNK) -> torch.Tensor:
    """The inverse of `to_planes`."""
    k = x.shape[-1]
    words = chunk // NIBBLES_PER_WORD
    return x.unflatten(-1, (k // chunk, NIBBLES_PER_WORD, words)).transpose(-1, -2).flatten(-3)
