"""Assertions shared by the tests (tolerances written once, by dtype)."""

from __future__ import annotations

import os

import torch

# ||out - ref|| / ||ref|| allowed for outputs computed in each dtype.
REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}
if os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available():
    # Triton's interpreter casts fp32 -> bf16 by truncation (the GPU rounds to nearest): up to
    # one bf16 ulp (2**-7) per cast, biased toward zero, once for the dequantized weight and
    # once for the output. CI drew a g32 problem with 125-sized offsets at 1.03e-2.
    REL_TOL[torch.bfloat16] = 2e-2


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


def assert_close_rel(
    out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, tol: float | None = None
):
    """Relative Frobenius error within the dtype's tolerance; NaN (unwritten output) fails."""
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), "output has NaN (an element was not written?)"
    err = rel_error(out, ref)
    limit = tol if tol is not None else REL_TOL[dtype]
    assert err <= limit, f"relative error {err:.3e} > {limit:.1e} ({dtype})"


def record_row_chunks(monkeypatch, module, rows: int, k: int) -> list[int]:
    """Lower the linear ops' 32-bit index limit to `rows` rows of K = k and return the list
    that records the rows of each `module.launch` call (one per row chunk)."""
    from qcompile.lowering import w4a16

    monkeypatch.setattr(w4a16, "_INDEX_LIMIT", rows * k)
    calls: list[int] = []
    real = module.launch

    def launch(cfg, x, *args, **kwargs):
        calls.append(len(x))
        return real(cfg, x, *args, **kwargs)

    monkeypatch.setattr(module, "launch", launch)
    return calls


def tune_with_default(monkeypatch, module) -> None:
    """The tuner "times" only the default config, one untimed run through the op's own bench
    function, and picks it: so a test sees what the op's tuning launches (`record_row_chunks`)."""
    from qcompile.lowering import autotune

    def get(self, key, candidates, bench, default, valid=lambda cfg: True):
        cfg = default() if callable(default) else default
        bench(cfg)
        return cfg

    monkeypatch.setattr(autotune.Autotuner, "get", get)
    monkeypatch.setattr(module, "time_us", lambda fn, reps=25: (fn(), 0.0)[1])


# Per family: (config class, model class, what differs from the common tiny shape).
HF_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # biased q/k/v projections
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),  # sliding-window cache layers
    # Tied lm_head, sqrt(hidden)-scaled embeddings, q/k norms, one sliding and one full layer.
    "gemma3": (
        "Gemma3TextConfig", "Gemma3ForCausalLM",
        {"head_dim": 32, "layer_types": ["sliding_attention", "full_attention"]},
    ),
    # Fused qkv_proj and gate_up_proj; its default special tokens (32000) lie outside the vocab.
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "eos_token_id": 2}),
}  # fmt: skip


def tiny_causal_lm(family: str = "llama", num_layers: int = 2, **overrides) -> torch.nn.Module:
    """A small transformers causal LM of `family` with random weights (seed 0), built locally.

    hidden 128 (K a multiple of the default group size 128), 4 heads of 32, 2 KV heads,
    vocab 256; `overrides` change config fields (head_dim, num_key_value_heads, ...).
    """
    import transformers

    config_cls, model_cls, extra = HF_FAMILIES[family]
    torch.manual_seed(0)
    fields = dict(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **extra,
    )  # fmt: skip
    config = getattr(transformers, config_cls)(**{**fields, **overrides})
    return getattr(transformers, model_cls)(config).eval()


def tiny_llama(num_layers: int, **overrides) -> torch.nn.Module:
    """A small transformers LlamaForCausalLM with random weights (seed 0), built locally."""
    return tiny_causal_lm("llama", num_layers, **overrides)


# Token ids the checkpoint round trips feed (every id < the tiny models' vocab of 256).
ROUND_TRIP_TOKENS = torch.arange(24).reshape(2, 12) * 7 % 256
_LOAD_IN_FRESH_PROCESS = """
import sys
import torch
torch.load = None  # loading must never unpickle
import qcompile
from safetensors.torch import save_file
tokens = torch.arange(24).reshape(2, 12) * 7 % 256
out = {}
for i, path in enumerate(sys.argv[2:]):
    model = qcompile.load_quantized(path)
    with torch.no_grad():
        out[f"logits{i}"] = model(tokens).logits.contiguous()
    tied = getattr(model.lm_head, "weight", None) is model.model.embed_tokens.weight
    out[f"tied{i}"] = torch.tensor(tied)
save_file(out, sys.argv[1])
"""


def load_in_fresh_process(tmp_path, folders) -> dict[str, torch.Tensor]:
    """Load each qcompile checkpoint folder with `load_quantized` in a new Python process and
    return its logits on `ROUND_TRIP_TOKENS` (`logits<i>`) and whether lm_head is tied
    (`tied<i>`)."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    repo = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
    }
    result = Path(tmp_path) / "result.safetensors"
    subprocess.run(
        [sys.executable, "-c", _LOAD_IN_FRESH_PROCESS, str(result), *map(str, folders)],
        check=True, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return load_file(result)
