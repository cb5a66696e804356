"""Assertions shared by the tests (tolerances written once, by dtype)."""

from __future__ import annotations

import torch

# ||out - ref|| / ||ref|| allowed for outputs computed in each dtype.
REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}


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


def tiny_llama(num_layers: int, **overrides) -> torch.nn.Module:
    """A small transformers LlamaForCausalLM with random weights (seed 0), built locally;
    `overrides` change LlamaConfig fields (head_dim, num_key_value_heads, ...)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    fields = dict(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    config = LlamaConfig(**{**fields, **overrides})
    return LlamaForCausalLM(config).eval()
