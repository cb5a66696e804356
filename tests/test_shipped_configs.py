"""Every shipped config (`qcompile/lowering/configs/*.json`) through its op at its key's shape,
natively, against float64 (`pytest -m gpu`, an sm_90 GPU). The tuner keeps the fastest
candidate without looking at its output, so a config that is fast and wrong would ship; this
is where it fails. Each config is served to the op as the only shipped entry, with tuning
off, and the test checks the op launched it (not a default) and what it computed."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_close_rel

from qcompile.config import KVScheme, Scheme
from qcompile.lowering import autotune
from qcompile.lowering.autotune import KernelConfig, TuneKey

_FILES = sorted(autotune.SHIPPED_DIR.glob("*.json"))
_ENTRIES = [
    (path.stem, TuneKey(**e["key"]), KernelConfig(**e["config"]))
    for path in _FILES
    for e in json.loads(path.read_text())["entries"]
]
# ||out - ref|| / ||ref||: fp16 outputs of weights dequantized to fp16 (or exact integer sums)
# land near 5e-4 at these K; bf16 rounds each dequantized weight to 2**-9. KV4 over a randn
# cache (flat attention, outputs ~1/sqrt(S)) reached 2.2e-3 at 4096 keys per program, the
# most a program reads before it centers V's codes (`kv4_attention._CENTER_V_KEYS`).
_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
_KV4_TOL = {torch.float16: 3e-3, torch.bfloat16: 1e-2}


def _entry_id(entry: tuple[str, TuneKey, KernelConfig]) -> str:
    name, key, cfg = entry
    return (
        f"{name}-{key.family}-m{key.m_bucket}-{key.n}x{key.k}-g{key.group_size}-{key.dtype}"
        f"-b{key.batch}-{cfg.kernel}"
    )


@pytest.fixture
def serve(monkeypatch):
    """A fresh tuner with tuning off whose one shipped entry is (key, cfg)."""
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "0")
    autotune.autotuner.cache_clear()

    def install(key: TuneKey, cfg: KernelConfig) -> autotune.Autotuner:
        tuner = autotune.autotuner(0)
        tuner.shipped, tuner.user, tuner.untuned = {key: cfg}, {}, {}
        return tuner

    yield install
    autotune.autotuner.cache_clear()


def _odd_m(bucket: int) -> int:
    """A row count inside the bucket that leaves partial tiles (the bucket's top - 1)."""
    return bucket if bucket <= 2 else bucket - 1


def _heads(key: TuneKey) -> tuple[int, int]:
    """(B, Hkv) from the key's (bucketed) B * Hkv: 8 KV heads where they fit."""
    hkv = min(8, key.batch)
    return key.batch // hkv, hkv


def _linear(key: TuneKey, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    from qcompile.lowering.w4a8 import w4a8_linear_cuda
    from qcompile.lowering.w4a16 import w4a16_linear_cuda
    from qcompile.ops.w4a8 import w4a8_linear_reference
    from qcompile.quant.int4 import dequantize_int4
    from qcompile.quant.rtn import quantize_weight_int4
    from qcompile.quant.w4a8 import quantize_weight_w4a8

    gen = torch.Generator(device=device).manual_seed(key.n + key.k + key.m_bucket)
    m, n, k, g = _odd_m(key.m_bucket), key.n, key.k, key.group_size
    w = torch.randn(n, k, device=device, generator=gen)
    if key.family == "w4a8":
        act_dtype, out_name = key.dtype.split(":")
        dtype = getattr(torch, out_name)
        p = quantize_weight_w4a8(w, Scheme(name="w4a8", group_size=g))
        del w
        x = torch.randn(m, k, device=device, generator=gen).to(dtype)
        out = w4a8_linear_cuda(x, *p.tensors(), None, g, act_dtype)
        return out, w4a8_linear_reference(x, *p.tensors(), None, g, act_dtype), dtype
    dtype = getattr(torch, key.dtype)
    p = quantize_weight_int4(w, Scheme(group_size=g), dtype)
    del w
    x = torch.randn(m, k, device=device, generator=gen).to(dtype)
    out = w4a16_linear_cuda(x, p.qweight, p.scales, p.offsets, None, g)
    return out, x.double() @ dequantize_int4(p, torch.float64).t(), dtype


def _kv4(key: TuneKey, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    from qcompile.lowering.kv4_attention import kv4_attention_cuda
    from qcompile.ops.kv4 import kv4_attention_reference
    from qcompile.quant.kv4 import quantize_kv4

    torch.manual_seed(key.k + key.batch)
    dtype, d = getattr(torch, key.dtype), key.n
    prefill = key.family.startswith("kv4_prefill")
    b, hkv = _heads(key)
    gqa = 4 if prefill else key.m_bucket  # decode keys: m_bucket = the GQA rows of one query
    sq = _odd_m(key.m_bucket) // gqa if prefill else 1
    s = key.k - 1 if prefill else key.k - 5  # a partial last tile, same S bucket
    q = torch.randn(b, hkv * gqa, sq, d, device=device, dtype=dtype)
    kv = [
        quantize_kv4(torch.randn(b, hkv, s, d, device=device), KVScheme(group_size=key.group_size))
        for _ in "kv"
    ]  # fmt: skip
    cache = (kv[0].codes, kv[0].scales, kv[0].offsets, kv[1].codes, kv[1].scales, kv[1].offsets)
    out = kv4_attention_cuda(q, *cache, None, None, prefill, d**-0.5)
    ref = torch.cat([
        kv4_attention_reference(q[i : i + 1].double(), *(t[i : i + 1] for t in cache), None,
                                None, prefill, d**-0.5, compute_dtype=torch.float64)
        for i in range(b)
    ])  # fmt: skip
    return out, ref, dtype


def _decode16(key: TuneKey, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    from qcompile.lowering.decode_attention import decode_attention_cuda

    torch.manual_seed(key.k + key.batch)
    dtype, d = getattr(torch, key.dtype), key.n
    (b, hkv), gqa = _heads(key), key.m_bucket
    s = key.k - 5
    q = torch.randn(b, hkv * gqa, 1, d, device=device, dtype=dtype)
    k, v = (torch.randn(b, hkv, s, d, device=device, dtype=dtype) for _ in "kv")
    out = decode_attention_cuda(q, k, v, None, d**-0.5)
    q64 = q.double().view(b, hkv, gqa, d)
    ref = torch.empty_like(q64)
    for i in range(b):  # one batch at a time: float64 copies of a 32k cache are large
        scores = q64[i] @ k[i].double().transpose(-1, -2) * d**-0.5
        ref[i] = torch.softmax(scores, dim=-1) @ v[i].double()
    return out, ref.view(q.shape), dtype


_RUN = {"w4a16": _linear, "w4a8": _linear, "kv4_decode": _kv4, "kv4_prefill": _kv4,
        "decode16": _decode16}  # fmt: skip


def test_every_shipped_family_has_a_runner():
    """A family added to the shipped files must be added here too, or it goes unchecked (and
    every runner has a tiny case for the interpreter below)."""
    assert _ENTRIES
    assert {key.family for _, key, _ in _ENTRIES} <= set(_RUN)
    assert {key.family for key, _ in _tiny_cases()} == set(_RUN)


@pytest.mark.gpu
@pytest.mark.parametrize("entry", _ENTRIES, ids=_entry_id)
def test_shipped_config_matches_float64(entry, serve):
    _, key, cfg = entry
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the shipped files are tuned for sm_90 (H100 / H200)")
    _check(serve, key, cfg, "cuda")


def _check(serve, key: TuneKey, cfg: KernelConfig, device: str) -> None:
    tuner = serve(key, cfg)
    out, ref, dtype = _RUN[key.family](key, device)
    assert tuner.lookup(key) == cfg and not tuner.untuned, "the op did not launch the config"
    tol = (_KV4_TOL if key.family.startswith("kv4") else _TOL)[dtype]
    assert_close_rel(out, ref, dtype, tol=tol)


def _tiny_cases() -> list[tuple[TuneKey, KernelConfig]]:
    """One small key per family with its default config: the harness above, in Triton's
    interpreter on CPU (each shape must map back to its key, or the op runs a default)."""
    from qcompile.lowering import decode_attention, kv4_attention, w4a8, w4a16

    return [
        (TuneKey("w4a16", 4, 64, 256, 128, "float16"), w4a16.default_config(3, 64, 256, 128)),
        (TuneKey("w4a8", 16, 64, 256, 128, "int8:float16"),
         w4a8.default_config(15, 64, 256, 128, "int8")),
        (TuneKey("kv4_decode", 4, 64, 64, 64, "float16", 2),
         kv4_attention.default_config(1, 2, 1, 4, 59)),
        (TuneKey("kv4_prefill", 128, 64, 64, 64, "float16", 2),
         kv4_attention.default_config(1, 2, 31, 4, 63)),
        (TuneKey("decode16", 4, 64, 64, 0, "float16", 2),
         decode_attention.default_config(1, 2, 1, 4, 59)),
    ]  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's check of the harness")
@pytest.mark.parametrize("family", sorted(_RUN))
def test_harness_on_tiny_keys_in_the_interpreter(family, cpu_tuner, serve):
    key, cfg = next(case for case in _tiny_cases() if case[0].family == family)
    _check(serve, key, cfg, "cpu")
