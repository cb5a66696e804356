"""Checkpoints: save/load round trip in a fresh process, strict errors, AWQ and GPTQ import.

The AWQ and GPTQ files are written here from random codes with an independent packer (plain
numpy loops over columns and nibbles, not `qcompile.quant.int4`), and the imported model is
held to a model whose linears carry the independently dequantized weights.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROUND_TRIP_TOKENS, assert_close_rel, load_in_fresh_process, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import qcompile
from qcompile import CheckpointError, QuantConfig, Scheme, W4A16Linear
from qcompile.checkpoint import parameters_on_meta
from qcompile.integrations.awq import AwqFormat
from qcompile.integrations.gptq import GptqFormat
from qcompile.quant.int4 import dequantize_int4

LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)  # fmt: skip
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: nibble i of a word holds column 8c + this[i]


# ---- an independent writer of the two formats (numpy, loops over columns and nibbles) ----


def pack_awq(codes: np.ndarray) -> np.ndarray:
    """[R, N] codes -> [R, N // 8] int32, AutoAWQ GEMM packing along N (interleaved)."""
    rows, n = codes.shape
    words = np.zeros((rows, n // 8), dtype=np.uint32)
    for c in range(n // 8):
        for i, col in enumerate(AWQ_PACK_ORDER):
            words[:, c] |= codes[:, 8 * c + col].astype(np.uint32) << np.uint32(4 * i)
    return words.view(np.int32)


def pack_gptq_along_k(codes: np.ndarray) -> np.ndarray:
    """[K, N] codes -> [K // 8, N] int32: word j holds rows 8j..8j+7, low nibble first."""
    k, n = codes.shape
    words = np.zeros((k // 8, n), dtype=np.uint32)
    for j in range(k // 8):
        for i in range(8):
            words[j] |= codes[8 * j + i].astype(np.uint32) << np.uint32(4 * i)
    return words.view(np.int32)


def pack_gptq_along_n(codes: np.ndarray) -> np.ndarray:
    """[R, N] codes -> [R, N // 8] int32: word c holds columns 8c..8c+7, low nibble first."""
    rows, n = codes.shape
    words = np.zeros((rows, n // 8), dtype=np.uint32)
    for c in range(n // 8):
        for i in range(8):
            words[:, c] |= codes[:, 8 * c + i].astype(np.uint32) << np.uint32(4 * i)
    return words.view(np.int32)


@dataclass
class QuantizedLayer:
    """One random layer: its true codes/zeros/scales, the exact weight and the file tensors."""

    weight: np.ndarray  # [N, K] float64, (q - z) * s with each feature's group
    zero_times_scale: np.ndarray  # [N, K] float64, |z * s|: the scale of the offset's rounding
    tensors: dict[str, torch.Tensor]


def random_layer(
    fmt: str, n: int, k: int, group: int, act_order: bool, sym: bool, rng: np.random.Generator
) -> QuantizedLayer:
    """A layer in `fmt` ("awq", "gptq" = v1, "gptq_v2"); group -1 is per-channel."""
    g = k if group == -1 else group
    q = rng.integers(0, 16, size=(k, n))
    low = 1 if fmt == "gptq" else 0  # v1 stores z - 1, so it cannot hold z = 0
    z = np.full((k // g, n), 8) if sym else rng.integers(low, 16, size=(k // g, n))
    s = rng.uniform(1e-3, 5e-2, size=(k // g, n)).astype(np.float16)
    # act-order (AutoGPTQ): feature k was quantized at position inv[k] of a random order
    order = np.argsort(rng.permutation(k)) if act_order else np.arange(k)
    g_idx = order // g
    weight = np.empty((n, k))
    zs = np.empty((n, k))
    for kk in range(k):
        gi = g_idx[kk]
        weight[:, kk] = (q[kk] - z[gi]) * s[gi].astype(np.float64)
        zs[:, kk] = z[gi] * s[gi].astype(np.float64)
    if fmt == "awq":
        tensors = {"qweight": pack_awq(q), "qzeros": pack_awq(z)}
    else:
        stored = z - 1 if fmt == "gptq" else z
        tensors = {"qweight": pack_gptq_along_k(q), "qzeros": pack_gptq_along_n(stored)}
        tensors["g_idx"] = g_idx.astype(np.int32)
    tensors["scales"] = s
    return QuantizedLayer(weight, zs, {name: torch.from_numpy(t) for name, t in tensors.items()})


def quantization_config(fmt: str, group: int, act_order: bool = False, sym: bool = False) -> dict:
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                "version": "gemm"}  # fmt: skip
    return {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order,
            "sym": sym, "checkpoint_format": fmt, "static_groups": False}  # fmt: skip


def write_quantized_llama(
    folder: Path, fmt: str, group: int, act_order: bool, sym: bool, tie: bool = False
) -> nn.Module:
    """Write a tiny Llama in `fmt` to `folder`; return the float32 reference model whose
    linears hold the independently dequantized weights."""
    ref = tiny_llama(2)
    if tie:
        ref.config.tie_word_embeddings = True
        ref.tie_weights()
    rng = np.random.default_rng(0)
    state = {n: t for n, t in ref.state_dict().items() if not (tie and n == "lm_head.weight")}
    for i in range(ref.config.num_hidden_layers):
        for name in LINEARS:
            prefix = f"model.layers.{i}.{name}"
            linear = ref.get_submodule(prefix)
            n, k = linear.out_features, linear.in_features
            layer = random_layer(fmt, n, k, group, act_order, sym, rng)
            linear.weight.data = torch.from_numpy(layer.weight).float()
            del state[f"{prefix}.weight"]
            state.update({f"{prefix}.{t}": v for t, v in layer.tensors.items()})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = ref.config.to_dict()
    config.update(
        architectures=["LlamaForCausalLM"],
        dtype="float32",
        quantization_config=quantization_config(fmt, group, act_order, sym),
    )
    (folder / "config.json").write_text(json.dumps(config))
    return ref


TOKENS = ROUND_TRIP_TOKENS


# ---- importers: tensor level (hypothesis) and model level ----


@settings(max_examples=30, deadline=None)
@given(
    fmt=st.sampled_from(["awq", "gptq", "gptq_v2"]),
    n=st.sampled_from([8, 16, 24, 40]),
    group=st.sampled_from([8, 16, 32, -1]),
    groups=st.integers(1, 3),
    act_order=st.booleans(),
    sym=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_convert_matches_independent_dequantization(fmt, n, group, groups, act_order, sym, seed):
    """fp32 storage reproduces (q - z) * s exactly; fp16 offsets are within half an fp16 ulp of
    z * s; the layer (with the act-order gather) computes x @ W^T."""
    k = (group if group > 0 else 16) * groups
    act_order = act_order and fmt != "awq"
    sym = sym and fmt != "awq"
    layer = random_layer(fmt, n, k, group, act_order, sym, np.random.default_rng(seed))
    if fmt == "awq":
        importer = AwqFormat(group)
    else:
        importer = GptqFormat(group, zero_offset=1 if fmt == "gptq" else 0, symmetric=sym)
    exact = torch.from_numpy(layer.weight)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for dtype in (torch.float32, torch.float16):
        imported = importer.convert("layer", layer.tensors, k, n, dtype)
        assert (imported.perm is not None) == (act_order and group != -1 and groups > 1)
        w = dequantize_int4(imported.packed, torch.float64)
        if imported.perm is not None:  # packed column j is original feature perm[j]
            w = torch.empty_like(w).index_copy_(1, imported.perm, w)
        if dtype == torch.float32:
            assert torch.equal(w, exact)
        else:
            bound = np.maximum(2.0**-11 * layer.zero_times_scale, 2.0**-25)
            assert ((w - exact).abs() <= torch.from_numpy(bound)).all()
        out = W4A16Linear(imported.packed, None, imported.perm)(x.float())
        assert_close_rel(out, x @ exact.t(), torch.float32 if dtype == torch.float32 else dtype)


CASES = {  # fmt, group, act_order, sym, tie
    "awq-g32": ("awq", 32, False, False, False),
    "gptq-v1-sym-g64-tied": ("gptq", 64, False, True, True),
    "gptq-v1-act-order-g32": ("gptq", 32, True, False, False),
    "gptq-v2-act-order-g64": ("gptq_v2", 64, True, False, False),
    "gptq-v2-per-channel": ("gptq_v2", -1, False, False, False),
}


@pytest.mark.parametrize("case", CASES)
def test_import_matches_independent_reference(case, tmp_path):
    fmt, group, act_order, sym, tie = CASES[case]
    ref = write_quantized_llama(tmp_path, fmt, group, act_order, sym, tie)
    model = qcompile.import_checkpoint(tmp_path)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, W4A16Linear)}
    assert len(layers) == 2 * len(LINEARS)
    assert type(model.lm_head) is nn.Linear
    assert all((m.perm is not None) == act_order for m in layers.values())
    # no longer the AWQ/GPTQ description: the model now saves as a qcompile checkpoint
    assert model.config.quantization_config.quant_method == "qcompile"
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        out, expected = model(TOKENS).logits, ref(TOKENS).logits
    assert_close_rel(out, expected, torch.float32)


def test_import_in_fp16_stays_within_offset_rounding(tmp_path):
    """The config's fp16 dtype: fp16 scales and offsets, logits close to the exact model's."""
    ref = write_quantized_llama(tmp_path, "awq", 64, False, False)
    model = qcompile.import_checkpoint(tmp_path, dtype=torch.float16)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.scales.dtype == q_proj.offsets.dtype == torch.float16
    assert model.model.embed_tokens.weight.dtype == torch.float16
    with torch.no_grad():
        assert_close_rel(model(TOKENS).logits.float(), ref(TOKENS).logits, torch.float16)


# ---- round trip in a fresh process ----


def test_round_trip_in_fresh_process_is_identical(tmp_path):
    """quantize_ (tied lm_head) and an imported act-order GPTQ model: save, load in a new
    process, bit-identical logits; ties survive; the tied tensor is stored once."""
    tied = tiny_llama(2)
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    qcompile.quantize_(tied, QuantConfig(scheme=Scheme(group_size=64, symmetric=True)))
    write_quantized_llama(tmp_path / "gptq", "gptq", 32, True, False)
    act_order = qcompile.import_checkpoint(tmp_path / "gptq")
    models = {"tied": tied, "act_order": act_order}
    expected = {}
    for name, model in models.items():
        qcompile.save_quantized(model, tmp_path / name)
        with torch.no_grad():
            expected[name] = model(TOKENS).logits
    stored = load_file(tmp_path / "tied" / "model.safetensors")
    assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored
    record = json.loads((tmp_path / "tied" / "quantization_config.json").read_text())
    assert record["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert record["scheme"] == {
        "name": "w4a16", "bits": 4, "group_size": 64, "symmetric": True, "act_dtype": None,
    }  # fmt: skip
    assert len(record["modules"]) == 2 * len(LINEARS)

    got = load_in_fresh_process(tmp_path, [tmp_path / name for name in models])
    for i, name in enumerate(models):
        assert torch.equal(got[f"logits{i}"], expected[name]), name
    assert got["tied0"].item() and not got["tied1"].item()


def test_w4a8_round_trip_in_fresh_process_is_identical(tmp_path):
    """A W4A8 model (QoQ weights, per-token int8 activations; lm_head left in 16 bits) saves
    its W4A8Linear layers with their scheme and loads them back as W4A8Linear in a new
    process, with bit-identical logits."""
    model = tiny_llama(2)
    qcompile.quantize_(model, QuantConfig(scheme=Scheme(name="w4a8", group_size=32)))
    qcompile.save_quantized(model, tmp_path / "w4a8")
    with torch.no_grad():
        expected = model(TOKENS).logits
    record = json.loads((tmp_path / "w4a8" / "quantization_config.json").read_text())
    assert {e["kind"] for e in record["modules"].values()} == {"w4a8"}
    assert record["scheme"]["name"] == "w4a8" and record["scheme"]["act_dtype"] == "int8"
    loaded = qcompile.load_quantized(tmp_path / "w4a8")
    q_proj = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, qcompile.W4A8Linear) and q_proj.group_size == 32
    assert q_proj.group_scales.dtype == torch.uint8
    assert torch.equal(load_in_fresh_process(tmp_path, [tmp_path / "w4a8"])["logits0"], expected)


def test_w4a8_load_names_the_mismatching_tensor(tmp_path):
    model = tiny_llama(1)
    qcompile.quantize_(model, QuantConfig(scheme=Scheme(name="w4a8", group_size=64)))
    saved = qcompile.save_quantized(model, tmp_path / "saved")
    gs = f"{UP}.group_scales"
    folder = _edited_copy(
        saved, tmp_path / "edited", lambda t: t.update({gs: t[gs].to(torch.int32)})
    )
    with pytest.raises(CheckpointError, match=rf"{UP}\.group_scales: expected \[2, 256\] uint8"):
        qcompile.load_quantized(folder)
    record = json.loads((folder / "quantization_config.json").read_text())
    record["modules"][UP]["scheme"].update(name="w4a16", act_dtype=None)
    (folder / "quantization_config.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="a w4a8 layer needs a w4a8 scheme"):
        qcompile.load_quantized(folder)


def test_colocated_siblings_save_the_unshared_file_and_load_colocated(tmp_path):
    """safetensors refuses tensors sharing memory: co-located buffers (views of one storage) are
    written as their own copies, byte for byte the file of an un-co-located model; loading
    co-locates them again, with the same outputs."""
    model = tiny_llama(1)
    separate = copy.deepcopy(model)
    qcompile.quantize_(model, QuantConfig())
    qcompile.quantize_(separate, QuantConfig(fuse_siblings=False))

    def shared(m: nn.Module) -> bool:
        attn = m.model.layers[0].self_attn
        ptrs = {p.scales.untyped_storage().data_ptr() for p in (attn.q_proj, attn.v_proj)}
        return len(ptrs) == 1

    assert shared(model) and not shared(separate)
    for name, m in (("colocated", model), ("separate", separate)):
        qcompile.save_quantized(m, tmp_path / name)
    for file in ("model.safetensors", "quantization_config.json"):
        assert (tmp_path / "colocated" / file).read_bytes() == (
            tmp_path / "separate" / file
        ).read_bytes(), file
    loaded = qcompile.load_quantized(tmp_path / "colocated")
    assert shared(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS).logits, model(TOKENS).logits)


def test_round_trip_of_a_plain_module_with_a_builder(tmp_path):
    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16, bias=False))

    torch.manual_seed(0)
    model = build()
    qcompile.quantize_(model, QuantConfig(scheme=Scheme(group_size=32), skip=()))
    qcompile.save_quantized(model, tmp_path)
    loaded = qcompile.load_quantized(tmp_path, model=build)
    x = torch.randn(5, 64)
    assert isinstance(loaded[0], W4A16Linear) and loaded[2].bias is None
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(CheckpointError, match="no config.json; pass `model=`"):
        qcompile.load_quantized(tmp_path)


def test_parameters_on_meta_allocates_no_weights_but_keeps_buffers():
    with parameters_on_meta():
        linear = nn.Linear(4096, 4096)
        norm = nn.BatchNorm1d(8)
    assert linear.weight.is_meta and linear.bias.is_meta and norm.weight.is_meta
    assert not norm.running_var.is_meta and torch.equal(norm.running_var, torch.ones(8))
    assert not nn.Linear(2, 2).weight.is_meta  # the patch is undone


# ---- strict errors ----


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    model = tiny_llama(1)
    qcompile.quantize_(model, QuantConfig(scheme=Scheme(group_size=64)))
    return qcompile.save_quantized(model, tmp_path_factory.mktemp("saved"))


def _edited_copy(saved: Path, folder: Path, edit) -> Path:
    folder.mkdir()
    for name in ("config.json", "quantization_config.json"):
        (folder / name).write_text((saved / name).read_text())
    tensors = load_file(saved / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")
    return folder


UP = "model.layers.0.mlp.up_proj"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop(f"{UP}.qweight"), rf"missing tensor {UP}\.qweight: expected \[16, 256\] int32"),
        (lambda t: t.update({f"{UP}.scales": t[f"{UP}.scales"][:, :128].clone()}),
         rf"{UP}\.scales: expected \[2, 256\] float32, got \[2, 128\] float32"),
        (lambda t: t.update({f"{UP}.offsets": t[f"{UP}.offsets"].half()}),
         rf"{UP}\.offsets: expected \[2, 256\] float32, got \[2, 256\] float16"),
        (lambda t: t.update({"model.norm.extra": torch.zeros(3)}),
         r"unexpected tensor model\.norm\.extra \(\[3\] float32\)"),
    ],
    ids=["missing", "shape", "dtype", "unexpected"],
)  # fmt: skip
def test_load_names_the_mismatching_tensor(saved, tmp_path, edit, message):
    folder = _edited_copy(saved, tmp_path / "edited", edit)
    with pytest.raises(CheckpointError, match=message):
        qcompile.load_quantized(folder)


def test_load_rejects_a_newer_format_version(saved, tmp_path):
    folder = _edited_copy(saved, tmp_path / "edited", lambda t: None)
    record = json.loads((folder / "quantization_config.json").read_text())
    record["format_version"] = 99
    (folder / "quantization_config.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="format_version=99"):
        qcompile.load_quantized(folder)


def test_save_refuses_a_model_without_quantized_layers(tmp_path):
    with pytest.raises(CheckpointError, match="no W4A16Linear or W4A8Linear layer; call qcompile"):
        qcompile.save_quantized(nn.Linear(8, 8), tmp_path)


def _rewrite_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("fmt", "changes", "message"),
    [
        ("awq", {"quant_method": "bitsandbytes"}, r"quant_method='bitsandbytes' is not supported"),
        ("awq", {"version": "gemv"}, r"version='gemv': only the GEMM layout"),
        ("awq", {"zero_point": False}, r"zero_point=false"),
        ("gptq", {"bits": 8}, r"bits=8: only 4-bit"),
        ("gptq", {"checkpoint_format": "marlin"}, r"checkpoint_format='marlin' is not supported"),
        ("gptq", {"dynamic": {"-:.*": {}}}, r"per-module `dynamic`"),
        # a v1 symmetric checkpoint stores 7 (= 8 - 1); labelled v2, its zero points read 7
        ("gptq", {"sym": True, "checkpoint_format": "gptq_v2"},
         r"model\.layers\.0\.self_attn\.q_proj\.qzeros: sym=true needs zero points of 8"),
    ],
    ids=["unknown-method", "awq-gemv", "awq-no-zero-point", "bits", "marlin", "dynamic", "sym"],
)  # fmt: skip
def test_import_rejects_unsupported_checkpoints(tmp_path, fmt, changes, message):
    write_quantized_llama(tmp_path, fmt, 64, False, sym=changes.get("sym", False))
    _rewrite_config(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=message):
        qcompile.import_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [
        ("qweight", lambda t: t[:, :4], r"qweight: expected \[128, 16\] int32, got \[128, 4\] int32"),
        ("scales", lambda t: t.int(), r"scales: expected \[2, 128\] float, got \[2, 128\] int32"),
        ("g_idx", lambda t: torch.zeros_like(t), r"g_idx: every group index 0\.\.1 must occur"),
    ],
    ids=["qweight-shape", "scales-dtype", "g_idx"],
)  # fmt: skip
def test_import_names_the_bad_tensor(tmp_path, name, edit, message):
    fmt = "awq" if name != "g_idx" else "gptq"
    write_quantized_llama(tmp_path, fmt, 64, False, False)
    tensors = load_file(tmp_path / "model.safetensors")
    key = f"model.layers.1.self_attn.q_proj.{name}"
    tensors[key] = edit(tensors[key]).contiguous()
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.q_proj\." + message):
        qcompile.import_checkpoint(tmp_path)


def test_import_names_a_missing_plain_tensor(tmp_path):
    write_quantized_llama(tmp_path, "gptq", 64, False, False)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"missing tensor model\.norm\.weight: expected \[128\]"
    ):
        qcompile.import_checkpoint(tmp_path)
