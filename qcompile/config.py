"""The one description of a quantization scheme, created once and passed down unchanged.

`Scheme` says how weights are stored; `QuantConfig` says which modules get it and what
happens to the ones that cannot. Pass -> op -> kernel launcher -> autotune key all read
the same `Scheme`; nothing downstream re-derives it from strings.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Literal

GROUP_SIZES = (32, 64, 128)
# K of a per-channel layer padded with `pad_k`: the kernels' smallest K tile
# (`ops.w4a16.KERNEL_K_MULTIPLE`, `ops.w4a8.KERNEL_K_MULTIPLE`; a multiple of int4's 8 per word).
PER_CHANNEL_K_MULTIPLE = 32
KEY_TOKENS = (32, 64, 128)  # KVScheme.key_tokens: tokens per per-channel K group
SCHEME_NAMES = ("w4a16", "w4a8")
# Activation formats of W4A8: per-token int8, or per-token FP8 e4m3 (Hopper's FP8 tensor cores).
W4A8_ACT_DTYPES = ("int8", "float8_e4m3fn")


@dataclass(frozen=True)
class Scheme:
    """How one linear layer's weight (and, for W4A8, its input) is quantized.

    name: "w4a16" (int4 weights, 16-bit activations) or "w4a8" (QoQ progressive int4
        weights, per-token 8-bit activations; see `qcompile.quant.w4a8`).
    group_size: number of consecutive K elements sharing one scale and offset;
        None means one group per output channel (per-channel, group = K).
    symmetric: codes centred on 8 (offset = -8 * scale) instead of a min-max fit (W4A16 only).
    act_dtype: W4A8's activation format, "int8" (default for w4a8) or "float8_e4m3fn";
        None for w4a16, whose activations stay in the model's dtype.
    pad_k: a layer whose K is not a multiple of group_size (per-channel: of the kernels' K
        tile, `PER_CHANNEL_K_MULTIPLE`) is quantized with K padded up to one (`padded_k`)
        instead of falling back: the weight's extra columns repeat its last
        column (so the last group's range is that of its real columns) and the input gets
        zeros there (a pad in the graph, which Inductor fuses into the input's producer), so
        the product is exact on the real columns. Off by default (the layer falls back, or
        raises with `on_unsupported="raise"`).
    """

    name: Literal["w4a16", "w4a8"] = "w4a16"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    act_dtype: Literal["int8", "float8_e4m3fn"] | None = None
    pad_k: bool = False

    def __post_init__(self) -> None:
        if self.name not in SCHEME_NAMES:
            raise ValueError(
                f"Scheme: name={self.name!r} is not supported; use one of {SCHEME_NAMES}"
            )
        if self.bits != 4:
            raise ValueError(f"Scheme {self.name}: bits={self.bits} is not supported; use bits=4")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"Scheme {self.name}: group_size={self.group_size} is not supported; "
                f"use one of {GROUP_SIZES} or None (per-channel)"
            )
        if self.name == "w4a16" and self.act_dtype is not None:
            raise ValueError(
                f"Scheme w4a16: act_dtype={self.act_dtype!r} is not supported (W4A16 keeps the "
                "model's activations); use Scheme(name='w4a8', act_dtype=...) for 8-bit activations"
            )
        if self.name == "w4a8":
            if self.act_dtype is None:
                object.__setattr__(self, "act_dtype", "int8")
            if self.act_dtype not in W4A8_ACT_DTYPES:
                raise ValueError(
                    f"Scheme w4a8: act_dtype={self.act_dtype!r} is not supported; "
                    f"use one of {W4A8_ACT_DTYPES}"
                )
            if self.symmetric:
                raise ValueError(
                    "Scheme w4a8: symmetric=True is not supported (QoQ's second level is "
                    "asymmetric uint4 with integer zero points); use symmetric=False"
                )

    def group_size_for(self, k: int) -> int:
        """The group size along K of a layer with `k` input features (per-channel -> k)."""
        return k if self.group_size is None else self.group_size

    def padded_k(self, k: int) -> int:
        """K as stored: `k` rounded up to a whole number of groups with `pad_k` (per-channel:
        of `PER_CHANNEL_K_MULTIPLE`), else `k`."""
        if not self.pad_k:
            return k
        multiple = self.group_size or PER_CHANNEL_K_MULTIPLE
        return -(-k // multiple) * multiple


@dataclass(frozen=True)
class KVScheme:
    """How a KV4 cache stores keys and values (`qcompile.quant.kv4` has the packed layout).

    group_size: consecutive head_dim channels of one token and head sharing one fp16 scale
        and offset; it must divide head_dim (head_dim 64 takes 32 or 64, not 128).
    rotate_keys: store K @ H (H the orthonormal Walsh-Hadamard matrix of size head_dim) and
        read it with query @ H: scores are unchanged (H H^T = I) and the rotation spreads
        outlier channels over the whole head before rounding. Needs head_dim a power of two.
    key_tokens: 0 (default) groups K like V, per token along head_dim. 32/64/128 groups K per
        channel over that many consecutive tokens (as KIVI): K's outliers sit in a few
        channels shared by every token, so each channel gets its own range. The tokens of
        the group still being written stay in the model's dtype (a residual of key_tokens
        tokens per head) until the group is complete. V stays per token with one group per
        head (group_size must equal head_dim). Not combined with rotate_keys.
    fresh_prefill: a chunk of several new tokens (a prompt) attends to its own tokens in
        the model's dtype and to earlier ones in 4 bits, as QServe and vLLM prefill do; the
        cache still stores all of them in 4 bits and one-token decode steps read only it.
        False reads the chunk back from the 4-bit cache too, the numerics of decoding it
        token by token (what the accuracy harness measures in one pass).
    """

    name: Literal["kv4"] = "kv4"
    bits: int = 4
    group_size: int = 128
    rotate_keys: bool = False
    key_tokens: int = 0
    fresh_prefill: bool = True

    def __post_init__(self) -> None:
        if self.bits != 4:
            raise ValueError(f"KVScheme: bits={self.bits} is not supported; use bits=4")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"KVScheme: group_size={self.group_size} is not supported; use one of {GROUP_SIZES}"
            )
        if self.key_tokens not in (0, *KEY_TOKENS):
            raise ValueError(
                f"KVScheme: key_tokens={self.key_tokens} is not supported; use 0 (keys per "
                f"token) or one of {KEY_TOKENS} (keys per channel over that many tokens)"
            )
        if self.key_tokens and self.rotate_keys:
            raise ValueError(
                "KVScheme: key_tokens and rotate_keys do not combine (per-channel groups "
                "already isolate the outlier channels that rotation spreads out); pick one"
            )

    def check_head_dim(self, head_dim: int) -> None:
        """Raise unless `head_dim` is a whole number of groups (a power of two if rotated)."""
        if self.rotate_keys and head_dim & (head_dim - 1):
            raise ValueError(f"KVScheme: rotate_keys needs a power-of-two head_dim, got {head_dim}")
        if self.key_tokens and head_dim != self.group_size:
            fix = (
                f"use group_size={head_dim} (head_dim)"
                if head_dim in GROUP_SIZES
                else f"head_dim must be one of {GROUP_SIZES}; use key_tokens=0"
            )
            raise ValueError(
                f"KVScheme: key_tokens={self.key_tokens} stores V with one group per token and "
                f"head, got group_size={self.group_size} for head_dim={head_dim}; {fix}"
            )
        if head_dim % self.group_size:
            fits = [g for g in GROUP_SIZES if head_dim % g == 0]
            fix = f"use group_size={max(fits)}" if fits else "head_dim must be a multiple of 32"
            raise ValueError(
                f"KVScheme: head_dim={head_dim} is not divisible by group_size="
                f"{self.group_size}; {fix}"
            )


@dataclass(frozen=True)
class QuantConfig:
    """What the backend and `quantize_` do to a model.

    skip: fnmatch patterns of module paths (`lm_head`, `model.layers.*.mlp.down_proj`) left
        in full precision; `lm_head` by default. In a compiled graph the path is the
        nn.Linear's (from Dynamo's module stack), so tied weights are judged per use.
    on_unsupported: "fallback" keeps a layer the kernels cannot take (K not divisible
        by the group size, float32 on CUDA, ...) as the original op and lists it in the
        report; "raise" turns that into an error naming the layer, shape and fix.
    fuse_siblings: sibling layers reading the same input (q/k/v, gate/up) run as one launch.
        `quantize_` stores their packed tensors as column slices of one tensor per kind
        (`colocate_siblings`; no extra memory), the backend co-locates the weights it quantizes
        itself the same way, and its fusion pass (`passes/fuse.py`) replaces the sibling calls
        by one op call on the spanning view, whose output is split along N. W4A16 only.
    pack_gqa_decode: a one-token SDPA over repeat_kv'd K/V (a grouped-query decode step)
        runs on the KV heads, the query heads of each KV head as query rows: the same
        attention without materializing the repeated K/V (an Inductor copy of the whole cache
        per layer) and with each KV head read once. Listed in the compile report.
    plane_major_x: W4A16 layers whose K is a multiple of 128 and whose input comes from a
        kernel Inductor generates (an RMSNorm, SiLU * mul) get that input in the plane-major
        order the "gemm_planes" kernels read (`qcompile.quant.int4.to_planes`), written by
        the producer itself instead of one copy per call. Listed in the report. Off by
        default: up to 16 rows the lane-MMA kernel reads x in natural order (and runs 2.5x
        slower on plane-major x); on, it helps batches of 17-64 rows.
    """

    scheme: Scheme = field(default_factory=Scheme)
    skip: tuple[str, ...] = ("lm_head", "*.lm_head")
    on_unsupported: Literal["fallback", "raise"] = "fallback"
    fuse_siblings: bool = True
    pack_gqa_decode: bool = True
    plane_major_x: bool = False

    def __post_init__(self) -> None:
        skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip)
        object.__setattr__(self, "skip", skip)
        if self.on_unsupported not in ("fallback", "raise"):
            raise ValueError(
                f"QuantConfig: on_unsupported={self.on_unsupported!r}; use 'fallback' or 'raise'"
            )

    def skips(self, name: str) -> bool:
        """True when `name` (a module path like `model.lm_head`) matches a skip pattern."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.skip)
