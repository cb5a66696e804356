"""Hypothesis strategies for quantized-linear and KV4-attention problems (small, so the
interpreter is fast)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from qcompile.config import Scheme
from qcompile.quant.int4 import PackedInt4
from qcompile.quant.kv4 import PackedKV4
from qcompile.quant.rtn import quantize_weight_int4
from qcompile.quant.w4a8 import PackedW4A8, quantize_weight_w4a8


@dataclass
class LinearProblem:
    x: torch.Tensor  # [M, K]
    weight: torch.Tensor  # [N, K] float32 original
    packed: PackedInt4
    bias: torch.Tensor | None
    dtype: torch.dtype

    def reference64(self) -> torch.Tensor:
        """x @ dequant(W)^T + b in float64: the oracle every kernel is held to."""
        from qcompile.quant.int4 import dequantize_int4

        w = dequantize_int4(self.packed, torch.float64).to(self.x.device)
        out = self.x.double() @ w.t()
        return out + self.bias.double() if self.bias is not None else out


@st.composite
def linear_problems(draw, device: str = "cpu", max_m: int = 40) -> LinearProblem:
    m = draw(st.sampled_from([1, 2, 3, 5, 16, 17, 33, max_m]))
    n = draw(st.sampled_from([16, 40, 64, 72, 96]))  # 40, 72: N not a multiple of the tile
    group = draw(st.sampled_from([32, 64, 128, None]))
    k = (group or 32) * draw(st.integers(1, 4 if group != 128 else 2))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16]))
    symmetric = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen)
    x = torch.randn(m, k, generator=gen)
    if draw(st.booleans()):  # outliers: a few weights and activation channels 50x larger
        weight.view(-1)[torch.randint(0, n * k, (max(1, n * k // 100),), generator=gen)] *= 50
        x[:, torch.randint(0, k, (max(1, k // 32),), generator=gen)] *= 50
    bias = torch.randn(n, generator=gen).to(dtype).to(device) if draw(st.booleans()) else None
    packed = quantize_weight_int4(weight, Scheme(group_size=group, symmetric=symmetric), dtype)
    packed = PackedInt4(
        *(t.to(device) for t in (packed.qweight, packed.scales, packed.offsets)), packed.group_size
    )
    return LinearProblem(x.to(dtype).to(device), weight, packed, bias, dtype)


@dataclass
class W4A8Problem:
    x: torch.Tensor  # [M, K] float activations
    weight: torch.Tensor  # [N, K] float32 original
    packed: PackedW4A8
    bias: torch.Tensor | None
    dtype: torch.dtype  # x's and the output's dtype
    act_dtype: str  # "int8" or "float8_e4m3fn"

    def quantized_x(self) -> tuple[torch.Tensor, torch.Tensor]:
        from qcompile.quant.w4a8 import quantize_activations_per_token

        return quantize_activations_per_token(self.x, self.act_dtype)

    def accumulator64(self) -> torch.Tensor:
        """sum_k xq * (q - z) * s2 in float64 from the unpacked integers: exact."""
        from qcompile.quant.w4a8 import int8_weight

        p = self.packed
        w8 = int8_weight(p.qweight.cpu(), p.group_scales.cpu(), p.group_zeros.cpu(), p.group_size)
        return self.quantized_x()[0].cpu().double() @ w8.double().t()

    def reference64(self) -> torch.Tensor:
        """acc * x_scale[m] * s1[n] (+ bias) in float64: the oracle of the kernels' output."""
        scale = self.quantized_x()[1].cpu().double()
        out = self.accumulator64() * scale[:, None] * self.packed.channel_scales.cpu().double()
        return out + self.bias.cpu().double() if self.bias is not None else out


@st.composite
def w4a8_problems(
    draw, device: str = "cpu", max_m: int = 33, act_dtypes=("int8", "float8_e4m3fn")
) -> W4A8Problem:
    m = draw(st.sampled_from([1, 2, 3, 5, 16, 17, max_m]))
    n = draw(st.sampled_from([16, 40, 64, 72]))  # 40, 72: N not a multiple of the tile
    group = draw(st.sampled_from([32, 64, 128, None]))
    k = (group or 64) * draw(st.integers(1, 4 if group != 128 else 2))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16]))
    act_dtype = draw(st.sampled_from(act_dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    weight = torch.randn(n, k, generator=gen)
    x = torch.randn(m, k, generator=gen)
    if draw(st.booleans()):  # outliers: a few weights and activation channels 50x larger
        weight.view(-1)[torch.randint(0, n * k, (max(1, n * k // 100),), generator=gen)] *= 50
        x[:, torch.randint(0, k, (max(1, k // 32),), generator=gen)] *= 50
    if draw(st.booleans()):
        x[0] = 0  # an all-zero token: finite scale, zero output row
    bias = torch.randn(n, generator=gen).to(dtype).to(device) if draw(st.booleans()) else None
    packed = quantize_weight_w4a8(weight, Scheme(name="w4a8", group_size=group))
    packed = PackedW4A8(*(t.to(device) for t in packed.tensors()), packed.group_size)
    return W4A8Problem(x.to(dtype).to(device), weight, packed, bias, dtype, act_dtype)


@dataclass
class KV4Problem:
    """Attention of `query` over a packed int4 K/V cache; masks as the op takes them."""

    query: torch.Tensor  # [B, Hq, Sq, D]
    keys: PackedKV4  # [B, Hkv, S, D]
    values: PackedKV4
    seq_lens: torch.Tensor | None  # [B]
    mask: torch.Tensor | None  # [B | 1, Hq | 1, Sq, S], bool or additive float
    is_causal: bool
    scale: float

    def args(self) -> tuple:
        """The op's arguments (k_residual last: None unless keys are stored per channel)."""
        k, v = self.keys, self.values
        return (
            self.query, k.codes, k.scales, k.offsets, v.codes, v.scales, v.offsets,
            self.seq_lens, self.mask, self.is_causal, self.scale, k.residual,
        )  # fmt: skip

    def reference64(self) -> torch.Tensor:
        """The op's reference math in float64 (dequantize, repeat heads, softmax attention)."""
        from qcompile.ops.kv4 import kv4_attention_reference

        query, *rest = self.args()
        return kv4_attention_reference(query.double(), *rest, compute_dtype=torch.float64)


@st.composite
def kv4_problems(
    draw,
    decode: bool,
    device: str = "cpu",
    max_blocks: int = 3,
    per_channel_keys: bool = False,
    one_group: bool = False,
) -> KV4Problem:
    """Sequence lengths from 1 to a few 32-token blocks (non-multiples included), head dims
    64/128, every group size that divides them, GQA ratios 1/4/8, masks and cache lengths.
    per_channel_keys: K per channel over 32 or 64 tokens (its tail in the residual, in the
    query's dtype), V with one group per head. one_group: one group per head (G = D)."""
    from qcompile.config import KVScheme
    from qcompile.quant.kv4 import quantize_kv4, quantize_kv4_keys_per_channel

    d = draw(st.sampled_from([64, 128]))
    group = draw(st.sampled_from([g for g in (32, 64, 128) if d % g == 0]))
    if per_channel_keys or one_group:
        group = d
    gqa = draw(st.sampled_from([1, 4, 8]))
    hkv = draw(st.sampled_from([1, 2])) if gqa < 8 else 1
    b = draw(st.sampled_from([1, 2]))
    s = draw(st.integers(1, 32 * max_blocks + 5))
    sq = 1 if decode else draw(st.integers(2, min(s, 20)) if s >= 2 else st.just(1))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(b, hkv * gqa, sq, d, generator=gen)
    k = torch.randn(b, hkv, s, d, generator=gen)
    v = torch.randn(b, hkv, s, d, generator=gen)
    if draw(st.booleans()):  # outlier channels in K (what SmoothAttention is for) and in V
        k[..., torch.randint(0, d, (2,), generator=gen)] *= 20
        v[..., torch.randint(0, d, (1,), generator=gen)] *= 10
    seq_lens = None
    if draw(st.booleans()):  # a pre-allocated cache only partly written
        seq_lens = torch.randint(sq, s + 1, (b,), generator=gen).to(torch.int32)
    is_causal = draw(st.booleans())
    mask = None
    kind = draw(st.sampled_from(["none", "bool", "float"]))
    if kind != "none":
        heads = draw(st.sampled_from([1, hkv * gqa]))
        shape = (b, heads, sq, s)
        if kind == "bool":
            mask = torch.rand(shape, generator=gen) > 0.3
            mask[..., 0] = True  # most rows see a key; a fully masked row is checked elsewhere
        else:
            mask = torch.randn(shape, generator=gen)
            mask[torch.rand(shape, generator=gen) > 0.8] = float("-inf")
            mask[..., 0] = 0.0
    scheme = KVScheme(group_size=group)
    values = quantize_kv4(v, scheme)

    def to(t):
        return None if t is None else t.to(device)

    if per_channel_keys:
        tokens = draw(st.sampled_from([32, 64]), label="key_tokens")
        keys = quantize_kv4_keys_per_channel(k.to(dtype), tokens)
        keys = PackedKV4(
            *(to(t) for t in (keys.codes, keys.scales, keys.offsets)), 1,
            residual=to(keys.residual),
        )  # fmt: skip
    else:
        keys = quantize_kv4(k, scheme)
        keys = PackedKV4(*(to(t) for t in (keys.codes, keys.scales, keys.offsets)), group)
    values = PackedKV4(*(to(t) for t in (values.codes, values.scales, values.offsets)), group)
    return KV4Problem(to(q.to(dtype)), keys, values, to(seq_lens), to(mask), is_causal, d**-0.5)


@dataclass
class HessianProblem:
    weight: torch.Tensor  # [N, K] float32
    hessian: torch.Tensor  # [K, K] = 2 X^T X / rows, from X [rows, K]
    group: int | None


def make_hessian_problem(
    n: int, group: int | None, k: int, rows: int, seed: int, outlier_weights: bool,
    input_outliers: float, dead_inputs: bool,
) -> HessianProblem:  # fmt: skip
    """A weight [n, k] and the Hessian of correlated activations [rows, k] (rank k / 4 plus
    noise) with k / 32 input channels scaled by `input_outliers`, optional 20x outlier
    weights and two never-active inputs."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen)
    if outlier_weights:
        weight.view(-1)[torch.randint(0, n * k, (max(1, n * k // 100),), generator=gen)] *= 20
    x = torch.randn(rows, k // 4, generator=gen) @ torch.randn(k // 4, k, generator=gen)
    x = x + 0.1 * torch.randn(rows, k, generator=gen)
    x[:, torch.randint(0, k, (max(1, k // 32),), generator=gen)] *= input_outliers
    if dead_inputs:
        x[:, torch.randint(0, k, (2,), generator=gen)] = 0  # dead inputs
    return HessianProblem(weight, 2 * x.t() @ x / rows, group)


@st.composite
def hessian_problems(draw, groups=(32, 64, None)) -> HessianProblem:
    """A weight and the input Hessian of correlated activations with a few outlier channels
    (scaled up to 20x), from as few rows as K / 2 (a singular X^T X, as for a rarely active
    layer), some input channels possibly never active (a zero row and column)."""
    n = draw(st.sampled_from([1, 8, 24]))
    group = draw(st.sampled_from(groups))
    k = (group or 64) * draw(st.integers(1, 3))
    rows = draw(st.sampled_from([k // 2, 2 * k, 8 * k]))
    seed = draw(st.integers(0, 2**31 - 1))
    outliers = draw(st.booleans())
    scale = draw(st.sampled_from([1, 20]))
    return make_hessian_problem(n, group, k, rows, seed, outliers, scale, draw(st.booleans()))


@dataclass
class DecodeProblem:
    """Attention of `query` over a 16-bit K/V cache with fewer KV heads than query heads."""

    query: torch.Tensor  # [B, Hq, Sq, D]
    key: torch.Tensor  # [B, Hkv, S, D], any strides
    value: torch.Tensor
    mask: torch.Tensor | None  # [B | 1, Hq | 1, Sq, S], bool or additive float
    scale: float

    def args(self) -> tuple:
        return self.query, self.key, self.value, self.mask, self.scale

    def reference64(self) -> torch.Tensor:
        """The op's reference (SDPA) in float64, on CPU."""
        from qcompile.ops.attention import decode_attention_reference

        def cpu64(t):
            return None if t is None else (t.cpu() if t.dtype == torch.bool else t.cpu().double())

        return decode_attention_reference(*map(cpu64, self.args()[:4]), self.scale)


@st.composite
def decode_problems(draw, device: str = "cpu") -> DecodeProblem:
    """One or two query positions over caches of 1 to ~3 tiles (non-multiples included),
    head dims 64/128, GQA ratios 1/4/8, K/V as strided views of a wider cache (as a static
    cache's slices are), bool or float masks, outlier channels."""
    d = draw(st.sampled_from([64, 128]))
    gqa = draw(st.sampled_from([1, 4, 8]))
    hkv = draw(st.sampled_from([1, 2]))
    b = draw(st.sampled_from([1, 2]))
    s = draw(st.integers(1, 200))
    sq = draw(st.sampled_from([1, 1, 2]))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(b, hkv * gqa, sq, d, generator=gen)
    # K and V as [B, Hkv, S, D] views of one [B, S, 2 * Hkv, D] buffer: no stride is dense
    kv = torch.randn(b, s, 2 * hkv, d, generator=gen)
    if draw(st.booleans()):  # outlier channels
        kv[..., torch.randint(0, d, (2,), generator=gen)] *= 20
    mask = None
    kind = draw(st.sampled_from(["none", "bool", "float"]))
    if kind != "none":
        heads = draw(st.sampled_from([1, hkv * gqa]))
        shape = (draw(st.sampled_from([1, b])), heads, sq, s)
        if kind == "bool":
            mask = torch.rand(shape, generator=gen) > 0.3
            mask[..., 0] = True  # a fully masked row is checked elsewhere
        else:
            mask = torch.randn(shape, generator=gen)
            mask[torch.rand(shape, generator=gen) > 0.8] = float("-inf")
            mask[..., 0] = 0.0
    kv = kv.to(dtype).to(device)
    key, value = kv[:, :, :hkv].transpose(1, 2), kv[:, :, hkv:].transpose(1, 2)
    return DecodeProblem(
        q.to(dtype).to(device), key, value, None if mask is None else mask.to(device), d**-0.5
    )
