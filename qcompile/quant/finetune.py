"""End-to-end tuning of quantized layers' float scales, the codes fixed (EfficientQAT's
E2E-QP): after RTN / GPTQ / AWQ chose the codes layer by layer, the scales of every layer
move together to bring the quantized model's next-token distributions closer to the
unquantized model's (KL divergence on calibration text). W4A16: each group's scale and
offset; W4A8: each output channel's s1. Nothing changes at inference: the tuned values are
written back into the layers' buffers in their dtype."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from qcompile.quant.int4 import NIBBLES_PER_WORD, unpack_int4_along_k
from qcompile.quant.w4a8 import int8_weight, quantize_activations_per_token
from qcompile.quantize import W4A8Linear, W4A16Linear, _pad_input


class _TunableW4A16(nn.Module):
    """A W4A16Linear's float twin: w = code * scale + offset, scale and offset trainable
    (float32), computed as the reference op does (float32, then the input's dtype)."""

    def __init__(self, layer: W4A16Linear):
        super().__init__()
        self.layer = layer
        self.register_buffer("codes", unpack_int4_along_k(layer.qweight).to(torch.uint8))
        self.scale = nn.Parameter(layer.scales.detach().float().t().contiguous())  # [N, K/G]
        self.offset = nn.Parameter(layer.offsets.detach().float().t().contiguous())

    def weight(self) -> torch.Tensor:
        n, k = self.codes.shape
        g = self.layer.group_size
        codes = self.codes.view(n, k // g, g).float()
        return (codes * self.scale[:, :, None] + self.offset[:, :, None]).view(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if layer.perm is not None:
            x = x.index_select(-1, layer.perm)
        x = _pad_input(x, layer.qweight.shape[0] * NIBBLES_PER_WORD)
        return F.linear(x, self.weight().to(x.dtype), layer.bias)

    @torch.no_grad()
    def write_back(self) -> None:
        self.layer.scales.copy_(self.scale.t().to(self.layer.scales.dtype))
        self.layer.offsets.copy_(self.offset.t().to(self.layer.offsets.dtype))


class _TunableW4A8(nn.Module):
    """A W4A8Linear's float twin: w = s1[n] * w8'[n, k] with the per-channel s1 trainable
    (the integer group scales and zeros stay); x quantized per token as the op does, its
    rounding passed straight through to the gradient."""

    def __init__(self, layer: W4A8Linear):
        super().__init__()
        self.layer = layer
        w8 = int8_weight(layer.qweight, layer.group_scales, layer.group_zeros, layer.group_size)
        self.register_buffer("w8", w8.to(torch.int8))
        self.scale = nn.Parameter(layer.channel_scales.detach().float().clone())  # [N]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, dtype = self.layer, x.dtype
        x = _pad_input(x, layer.qweight.shape[0] * NIBBLES_PER_WORD).float()
        with torch.no_grad():
            xq, xs = quantize_activations_per_token(x, layer.act_dtype)
            rounded = xq.float() * xs[..., None]
        x = x + (rounded - x).detach()  # the op's activations, the identity's gradient
        bias = None if layer.bias is None else layer.bias.float()
        return F.linear(x, self.int8_weight() * self.scale[:, None], bias).to(dtype)

    def int8_weight(self) -> torch.Tensor:
        """w8' as float32 (fixed here; a probe that tunes codes overrides it)."""
        return self.w8.float()

    @torch.no_grad()
    def write_back(self) -> None:
        self.layer.channel_scales.copy_(self.scale)


def _swap(model: nn.Module, cls: type, make) -> list[tuple[str, nn.Module]]:
    """Replace every `cls` submodule by make(module); returns (name, new) pairs."""
    swapped = [(name, make(mod)) for name, mod in model.named_modules() if isinstance(mod, cls)]
    for name, new in swapped:
        model.set_submodule(name, new)
    return swapped


def finetune_scales_(
    model: nn.Module,
    teacher: nn.Module,
    batches: Sequence[torch.Tensor],
    steps: int = 64,
    lr: float = 3e-5,
    progress: bool = True,
) -> list[float]:
    """Tune the quantized layers of `model` in place for `steps` Adam steps, one batch of
    token ids [B, T] per step in turn, minimizing KL(teacher || model) over the next-token
    distributions; `teacher` is the unquantized model. `W4A16Linear`: every group's scale
    and offset; `W4A8Linear`: the per-channel s1 (its group scales and zeros are integers).
    Codes, biases and every other weight stay fixed. Returns the loss of each step. The
    layers keep their buffers' dtypes (scales rounded back to fp16 where they were fp16)."""
    if not batches:
        raise ValueError("finetune_scales_: no calibration batches")
    if steps < 1:
        raise ValueError(f"finetune_scales_: steps={steps} must be >= 1")
    swapped = _swap(model, W4A16Linear, _TunableW4A16) + _swap(model, W4A8Linear, _TunableW4A8)
    if not swapped:
        raise ValueError(
            "finetune_scales_: the model has no W4A16Linear or W4A8Linear layers (quantize it "
            "first with qcompile.quantize_ or a calibration method)"
        )
    params = [p for _, new in swapped for p in new.parameters(recurse=False)]
    trainable = {id(p) for p in params}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in trainable]
    was_training = model.training
    try:
        for p in others:
            p.requires_grad_(False)
        model.eval()  # (no dropout: the same function as inference)
        teacher.eval()
        optimizer = torch.optim.Adam(params, lr=lr)
        losses: list[float] = []
        bar = tqdm(total=steps, desc="finetune scales", unit="step", disable=not progress)
        for step in range(steps):
            ids = batches[step % len(batches)]
            with torch.no_grad():
                target = F.log_softmax(teacher(ids).logits.float(), dim=-1)
            logp = F.log_softmax(model(ids).logits.float(), dim=-1)
            loss = F.kl_div(logp.flatten(0, -2), target.flatten(0, -2), log_target=True,
                            reduction="batchmean")  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
            bar.update()
        bar.close()
    finally:
        for name, new in swapped:
            new.write_back()
            model.set_submodule(name, new.layer)
        for p in others:
            p.requires_grad_(True)
        model.train(was_training)
    return losses
