"""transformers' save_pretrained / from_pretrained of qcompile models (quant_method "qcompile")."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import tiny_llama
from transformers import AutoModelForCausalLM

import qcompile
from qcompile import CheckpointError, QuantConfig, Scheme, W4A8Linear, W4A16Linear

TOKENS = torch.arange(24).reshape(2, 12) * 7 % 256
SCHEMES = {"w4a16": Scheme(group_size=32), "w4a8": Scheme(name="w4a8", group_size=32)}


def _quantized(scheme: str, **overrides) -> torch.nn.Module:
    model = tiny_llama(2, **overrides)
    qcompile.quantize_(model, QuantConfig(SCHEMES[scheme]))
    return model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def _colocated(model: torch.nn.Module) -> bool:
    attn = model.model.layers[0].self_attn
    return attn.q_proj.qweight.untyped_storage().data_ptr() == (
        attn.k_proj.qweight.untyped_storage().data_ptr()
    )


@pytest.mark.parametrize("scheme", SCHEMES)
def test_save_pretrained_then_from_pretrained_in_a_fresh_process(scheme, tmp_path):
    """The user path: quantize_, model.save_pretrained, then in a new process `import qcompile`
    before transformers (the import hook registers the quantizer) and from_pretrained."""
    model = _quantized(scheme)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "qcompile" and len(config["modules"]) == 14
    torch.save(_logits(model), tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        import qcompile
        assert "transformers" not in sys.modules  # registered by the import hook, later
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}).eval()
        kinds = {{type(m).__name__ for m in model.modules()}}
        assert {"W4A16Linear" if scheme == "w4a16" else "W4A8Linear"!r} in kinds, kinds
        tokens = torch.arange(24).reshape(2, 12) * 7 % 256
        with torch.no_grad():
            out = model(tokens).logits
        assert torch.equal(out, torch.load({str(tmp_path / "expected.pt")!r})), "logits differ"
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_from_pretrained_casts_scales_to_the_loaded_dtype_and_colocates(tmp_path):
    """dtype=bf16: W4A16 scales/offsets in bf16 (the kernels' contract), siblings co-located;
    W4A8's per-channel scales stay float32."""
    _quantized("w4a16").save_pretrained(tmp_path / "w4a16")
    _quantized("w4a8").save_pretrained(tmp_path / "w4a8")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "w4a16", dtype=torch.bfloat16)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, W4A16Linear) and q.scales.dtype == q.offsets.dtype == torch.bfloat16
    assert _colocated(model)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "w4a8", dtype=torch.bfloat16)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, W4A8Linear) and q.channel_scales.dtype == torch.float32


def test_one_format_for_both_savers_and_loaders(tmp_path):
    """save_quantized's folder loads with from_pretrained, save_pretrained's (sharded here)
    with load_quantized and import_checkpoint; a tied lm_head stays tied; logits identical."""
    model = _quantized("w4a16", tie_word_embeddings=True)
    expected = _logits(model)
    qcompile.save_quantized(model, tmp_path / "ours")
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()  # sharded
    loaded = [
        AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval(),
        qcompile.load_quantized(tmp_path / "hf"),
        qcompile.import_checkpoint(tmp_path / "hf"),
    ]
    for m in loaded:
        assert torch.equal(_logits(m), expected)
        assert m.lm_head.weight is m.model.embed_tokens.weight
        assert _colocated(m)


def test_a_loaded_model_saves_again(tmp_path):
    """from_pretrained -> save_pretrained -> from_pretrained: the quantizer travels with it.
    (transformers refuses .half() / .float() on a loaded quantized model; .to(dtype) works.)"""
    _quantized("w4a16").save_pretrained(tmp_path / "a")
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    first.to(torch.float16)  # a cast after loading: the record is written from the layers
    first.save_pretrained(tmp_path / "b")
    record = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    scales = record["modules"]["model.layers.0.self_attn.q_proj"]["tensors"]["scales"]
    assert scales["dtype"] == "float16"
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.float16).eval()
    assert torch.equal(_logits(again.to(torch.float32)), _logits(first.to(torch.float32)))


def test_from_pretrained_refuses_to_quantize_a_float_model(tmp_path):
    tiny_llama(2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="call qcompile.quantize_"):
        AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config={"quant_method": "qcompile"}
        )


def test_a_bad_record_in_config_json_names_the_layer(tmp_path):
    _quantized("w4a16").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    entry = config["quantization_config"]["modules"]["model.layers.1.mlp.down_proj"]
    entry["in_features"] = 512
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.down_proj: the checkpoint holds"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    config["quantization_config"]["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format_version=99"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_models_without_quantized_layers_get_no_quantizer():
    model = tiny_llama(2)
    qcompile.quantize_(model, QuantConfig(skip=("*",)))
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma3", "phi3"])
def test_every_family_round_trips_through_transformers(family, tmp_path):
    """Biased q/k/v (Qwen2), sliding layers (Mistral), tied lm_head and q/k norms (Gemma 3),
    fused qkv_proj / gate_up_proj (Phi-3): identical logits after from_pretrained."""
    from helpers import tiny_causal_lm

    model = tiny_causal_lm(family, 2)
    qcompile.quantize_(model, QuantConfig(SCHEMES["w4a16"]))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(loaded), _logits(model))
