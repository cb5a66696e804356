"""Tuning a quantized model's codes and scales after RTN / GPTQ / AWQ chose them layer by
layer, in two steps after EfficientQAT:

- `reconstruct_blocks_` (Block-AP): block by block, the codes (rounded straight-through
  onto each layer's fixed grid) and scales move to bring the block's output on the
  quantized blocks' hidden states closer to the float block's (MSE).
- `finetune_scales_` (E2E-QP): the codes fixed, the float scales of every layer move
  together to bring the model's next-token distributions closer to the float model's (KL).
  W4A16: each group's scale and offset; W4A8: each output channel's s1.

Nothing changes at inference: the tuned values are written back into the layers' buffers
in their dtype."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from qcompile.quant.calibration import block_output, capture_block_inputs, find_blocks
from qcompile.quant.int4 import NIBBLES_PER_WORD, pack_int4_along_k, unpack_int4_along_k
from qcompile.quant.w4a8 import INT4_CODES, int8_weight, quantize_activations_per_token
from qcompile.quantize import W4A8Linear, W4A16Linear, _pad_input


def _code_offsets(codes: torch.Tensor) -> nn.Parameter:
    """The codes as a float parameter (integers at the start), for straight-through rounding."""
    return nn.Parameter(codes.float())


def _rounded(v: torch.Tensor) -> torch.Tensor:
    """v rounded onto 0..15 in the forward, the identity's gradient in the backward."""
    return v + (torch.round(v).clamp(0, INT4_CODES) - v).detach()


class _TunableW4A16(nn.Module):
    """A W4A16Linear's float twin: w = code * scale + offset, computed as the reference op
    does (float32, then the input's dtype). End to end: scale and offset trainable. Block
    mode (`codes=True`): the codes too, each a float rounded straight-through, and the
    scale and offset as scale0 * (1 + a), offset0 + scale0 * b, so one learning rate fits
    every layer's magnitude."""

    def __init__(self, layer: W4A16Linear, codes: bool = False):
        super().__init__()
        self.layer = layer
        self.register_buffer("codes", unpack_int4_along_k(layer.qweight).to(torch.uint8))
        scale = layer.scales.detach().float().t().contiguous()  # [N, K/G]
        offset = layer.offsets.detach().float().t().contiguous()
        self.v = _code_offsets(self.codes) if codes else None
        if codes:
            self.register_buffer("scale0", scale)
            self.register_buffer("offset0", offset)
            self.a = nn.Parameter(torch.zeros_like(scale))
            self.b = nn.Parameter(torch.zeros_like(scale))
        else:
            self.scale = nn.Parameter(scale)
            self.offset = nn.Parameter(offset)

    def scale_offset(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.v is None:
            return self.scale, self.offset
        return self.scale0 * (1 + self.a), self.offset0 + self.scale0 * self.b

    def weight(self) -> torch.Tensor:
        n, k = self.codes.shape
        g = self.layer.group_size
        codes = self.codes if self.v is None else _rounded(self.v)
        scale, offset = self.scale_offset()
        codes = codes.view(n, k // g, g).float()
        return (codes * scale[:, :, None] + offset[:, :, None]).view(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if layer.perm is not None:
            x = x.index_select(-1, layer.perm)
        x = _pad_input(x, layer.qweight.shape[0] * NIBBLES_PER_WORD)
        return F.linear(x, self.weight().to(x.dtype), layer.bias)

    @torch.no_grad()
    def write_back(self) -> int:
        """The tuned values into the layer's buffers; returns how many codes changed."""
        changed = 0
        if self.v is not None:
            new = torch.round(self.v).clamp(0, INT4_CODES).to(torch.int32)
            changed = int((new != self.codes).sum())
            self.layer.qweight.copy_(pack_int4_along_k(new))
        scale, offset = self.scale_offset()
        self.layer.scales.copy_(scale.t().to(self.layer.scales.dtype))
        self.layer.offsets.copy_(offset.t().to(self.layer.offsets.dtype))
        return changed


class _TunableW4A8(nn.Module):
    """A W4A8Linear's float twin: w = s1[n] * w8'[n, k], x quantized per token as the op
    does, its rounding passed straight through to the gradient. End to end: s1 trainable
    (the integer group scales and zeros stay). Block mode (`codes=True`): the 4-bit codes
    too, each a float rounded straight-through onto the fixed (s2, z) grid, and s1 as
    s1_0 * (1 + a)."""

    def __init__(self, layer: W4A8Linear, codes: bool = False):
        super().__init__()
        self.layer = layer
        self.v = None
        if codes:
            g = layer.group_size
            self.register_buffer("s2", layer.group_scales.float().t().repeat_interleave(g, 1))
            self.register_buffer("z", layer.group_zeros.float().t().repeat_interleave(g, 1))
            self.v = _code_offsets(unpack_int4_along_k(layer.qweight))
            self.register_buffer("scale0", layer.channel_scales.detach().float().clone())
            self.a = nn.Parameter(torch.zeros_like(self.scale0))
        else:
            w8 = int8_weight(layer.qweight, layer.group_scales, layer.group_zeros, layer.group_size)
            self.register_buffer("w8", w8.to(torch.int8))
            self.scale = nn.Parameter(layer.channel_scales.detach().float().clone())  # [N]

    def s1(self) -> torch.Tensor:
        return self.scale if self.v is None else self.scale0 * (1 + self.a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, dtype = self.layer, x.dtype
        x = _pad_input(x, layer.qweight.shape[0] * NIBBLES_PER_WORD).float()
        with torch.no_grad():
            xq, xs = quantize_activations_per_token(x, layer.act_dtype)
            rounded = xq.float() * xs[..., None]
        x = x + (rounded - x).detach()  # the op's activations, the identity's gradient
        bias = None if layer.bias is None else layer.bias.float()
        return F.linear(x, self.int8_weight() * self.s1()[:, None], bias).to(dtype)

    def int8_weight(self) -> torch.Tensor:
        """w8' as float32."""
        if self.v is None:
            return self.w8.float()
        return (_rounded(self.v) - self.z) * self.s2

    @torch.no_grad()
    def write_back(self) -> int:
        """The tuned values into the layer's buffers; returns how many codes changed."""
        changed = 0
        if self.v is not None:
            new = torch.round(self.v).clamp(0, INT4_CODES).to(torch.int32)
            changed = int((new != unpack_int4_along_k(self.layer.qweight)).sum())
            self.layer.qweight.copy_(pack_int4_along_k(new))
        self.layer.channel_scales.copy_(self.s1())
        return changed


def _swap(model: nn.Module, cls: type, make) -> list[tuple[str, nn.Module]]:
    """Replace every `cls` submodule by make(module); returns (name, new) pairs."""
    swapped = [(name, make(mod)) for name, mod in model.named_modules() if isinstance(mod, cls)]
    for name, new in swapped:
        model.set_submodule(name, new)
    return swapped


class _Twins:
    """`with _Twins(root, codes) as twins`: root's quantized layers swapped for their float
    twins, every other parameter of root frozen; on exit the tuned values are written back
    (`twins.changed`: the codes that moved), the layers swapped in again and the frozen
    parameters released."""

    def __init__(self, root: nn.Module, codes: bool = False):
        self.root = root
        self.swapped = _swap(root, W4A16Linear, lambda m: _TunableW4A16(m, codes))
        self.swapped += _swap(root, W4A8Linear, lambda m: _TunableW4A8(m, codes))
        mine = {id(p) for p in self.params()}
        self.frozen = [p for p in root.parameters() if p.requires_grad and id(p) not in mine]
        self.changed = 0

    def params(self) -> list[nn.Parameter]:
        return [p for _, twin in self.swapped for p in twin.parameters(recurse=False)]

    def __enter__(self) -> _Twins:
        for p in self.frozen:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc) -> None:
        for name, twin in self.swapped:
            self.changed += twin.write_back()
            self.root.set_submodule(name, twin.layer)
        for p in self.frozen:
            p.requires_grad_(True)


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
    was_training = model.training
    try:
        with _Twins(model) as twins:
            if not twins.swapped:
                raise ValueError(
                    "finetune_scales_: the model has no W4A16Linear or W4A8Linear layers "
                    "(quantize it first with qcompile.quantize_ or a calibration method)"
                )
            model.eval()  # (no dropout: the same function as inference)
            teacher.eval()
            optimizer = torch.optim.Adam(twins.params(), lr=lr)
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
        model.train(was_training)
    return losses


@torch.no_grad()
def _block_mse(block: nn.Module, inputs: list, targets: list[torch.Tensor]) -> float:
    return sum(
        F.mse_loss(block_output(block(*a, **kw)).float(), y).item()
        for (a, kw), y in zip(inputs, targets, strict=True)
    ) / len(targets)


def reconstruct_blocks_(
    model: nn.Module,
    teacher: nn.Module,
    batches: Sequence[torch.Tensor],
    epochs: int = 2,
    lr_codes: float = 1e-2,
    lr_scales: float = 5e-4,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Tune the quantized layers' codes and scales block by block (EfficientQAT's Block-AP).

    For each block in turn, its `W4A8Linear` / `W4A16Linear` layers' codes (each a float
    rounded straight-through onto the layer's grid: W4A8's integer (s2, z) and W4A16's
    0..15 stay) and scales (W4A8 s1; W4A16 group scales and offsets, as relative changes)
    take `epochs` passes of Adam, one batch [B, T] a step in shuffled order, minimizing the
    MSE between the block's output on the quantized blocks' hidden states and the
    `teacher` block's on its own. `teacher` is the float model in the same basis as
    `model`: for a rotated model, its float copy taken after `rotate_model_` and before
    quantizing. A block whose MSE did not fall is restored. Returns per block the MSE
    before and after and the share of codes changed. Memory: every batch's hidden state,
    twice."""
    if not batches:
        raise ValueError("reconstruct_blocks_: no calibration batches")
    if epochs < 1:
        raise ValueError(f"reconstruct_blocks_: epochs={epochs} must be >= 1")
    f_blocks = find_blocks(teacher)
    prefix = next(name for name, m in teacher.named_modules() if m is f_blocks)
    q_blocks = model.get_submodule(prefix)
    if not isinstance(q_blocks, nn.ModuleList) or len(q_blocks) != len(f_blocks):
        raise ValueError(
            f"reconstruct_blocks_: the teacher's blocks ({prefix}, {len(f_blocks)}) have no "
            "counterpart in the model: give the float model the quantized one was made from"
        )
    if not any(isinstance(m, (W4A16Linear, W4A8Linear)) for m in q_blocks.modules()):
        raise ValueError(
            "reconstruct_blocks_: the model's blocks have no W4A16Linear or W4A8Linear layers "
            "(quantize it first with qcompile.quantize_ or a calibration method)"
        )
    was_training = model.training
    model.eval()
    teacher.eval()
    q_in = capture_block_inputs(model, q_blocks[0], batches)
    f_in = [args[0] for args, _ in capture_block_inputs(teacher, f_blocks[0], batches)]
    # Nothing before the first block is quantized (the embedding), so its inputs agree
    # unless the teacher is in another basis (e.g. the model was rotated, the teacher not).
    gap = max(
        (q[0][0] - f).norm().item() / f.norm().item() for q, f in zip(q_in, f_in, strict=True)
    )
    if gap > 1e-3:
        model.train(was_training)
        raise ValueError(
            f"reconstruct_blocks_: the first block's inputs differ by {gap:.3g} (relative) "
            "between the model and the teacher: give the float model in the model's basis "
            "(for a rotated model, its float copy rotated with the same seed)"
        )
    order = list(range(len(q_in)))
    rng = random.Random(0)
    stats: list[dict[str, float]] = []
    bar = tqdm(total=len(q_blocks), desc="reconstruct blocks", unit="block", disable=not progress)
    try:
        for q_block, f_block in zip(q_blocks, f_blocks, strict=True):
            with torch.no_grad():
                targets = [
                    block_output(f_block(h, *a[1:], **kw))
                    for h, (a, kw) in zip(f_in, q_in, strict=True)
                ]
            before = _block_mse(q_block, q_in, targets)
            kept = {n: b.clone() for n, b in q_block.named_buffers()}
            with _Twins(q_block, codes=True) as twins:
                codes = [twin.v for _, twin in twins.swapped]
                scales = [p for _, t in twins.swapped for n, p in t.named_parameters() if n != "v"]
                optimizer = torch.optim.Adam(
                    [{"params": codes, "lr": lr_codes}, {"params": scales, "lr": lr_scales}]
                )
                for _ in range(epochs):
                    rng.shuffle(order)
                    for j in order:
                        a, kw = q_in[j]
                        out = block_output(q_block(*a, **kw)).float()
                        loss = F.mse_loss(out, targets[j])
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
            changed = twins.changed
            after = _block_mse(q_block, q_in, targets)
            if after >= before:  # (Adam's last steps can overshoot): keep the block as it was
                with torch.no_grad():
                    for n, b in q_block.named_buffers():
                        b.copy_(kept[n])
                after, changed = before, 0
            del kept
            total = sum(twin.v.numel() for _, twin in twins.swapped)
            stats.append({"mse_before": before, "mse_after": after, "changed": changed / total})
            bar.set_postfix(mse=f"{before:.3g}->{after:.3g}", changed=f"{changed / total:.2%}")
            bar.update()
            with torch.no_grad():
                q_in = [((block_output(q_block(*a, **kw)), *a[1:]), kw) for a, kw in q_in]
            f_in = targets
    finally:
        bar.close()
        model.train(was_training)
    return stats
