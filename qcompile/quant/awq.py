"""AWQ: per-input-channel scales s that protect the weights of salient activation channels.

For linears sharing an input x, W x = (W diag(s)) (x / s): scaling weight columns up by s
gives salient channels finer quantization steps, and the 1/s is folded into the op that
produces x (an RMSNorm's weight, or the previous linear's rows), so nothing is added at run
time. s = salience ** alpha, alpha searched on the quantization objective
||X (W_q - W)^T||^2 = tr(dW H dW^T) / 2 with the same input Hessian H = 2 X^T X / rows GPTQ
uses; salience is sqrt(diag H), the per-channel RMS of x. alpha = 0 (s = 1) is plain RTN, so
the search never does worse than RTN on its objective.
"""

from __future__ import annotations

import torch
from torch import nn

from qcompile.config import Scheme
from qcompile.quant.int4 import dequantize_int4
from qcompile.quant.rtn import quantize_weight_int4
from qcompile.quant.w4a8 import dequantize_w4a8, quantize_weight_w4a8

# (producer of the shared input, linears reading it) in a Llama-family decoder block
# (Llama, Mistral, Qwen2). o_proj is left out: with grouped-query attention its input
# channels are not one-to-one with v_proj's outputs.
LLAMA_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


# The float32 weight that each scheme's RTN (`quantize_`'s default) makes of w [N, K], per
# `Scheme.name`: what the scale search measures its objective on.
# (With `Scheme.pad_k` the packed weight has whole groups: the padding is cut off again.)
RTN_ROUNDTRIPS = {
    "w4a16": lambda w, scheme: dequantize_int4(
        quantize_weight_int4(w, scheme, torch.float32), torch.float32
    )[:, : w.shape[1]],
    "w4a8": lambda w, scheme: dequantize_w4a8(quantize_weight_w4a8(w, scheme), torch.float32)[
        :, : w.shape[1]
    ],
}


def awq_search_scale(
    weights: list[torch.Tensor], hessian: torch.Tensor, scheme: Scheme, grid: int = 20
) -> torch.Tensor:
    """The input-channel scale s [K] minimizing sum_W tr(dW H dW^T) after RTN of W diag(s)
    onto `scheme`'s grid."""
    roundtrip = RTN_ROUNDTRIPS[scheme.name]
    h = hessian.float()
    salience = h.diagonal().clamp_min(0).sqrt().clamp_min(1e-8)
    best_loss, best = None, torch.ones_like(salience)
    for alpha in torch.linspace(0, 1, grid + 1):
        s = salience**alpha
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 (range-neutral)
        loss = 0.0
        for w in weights:
            w = w.float()
            d = roundtrip(w * s, scheme) / s - w
            loss += ((d @ h) * d).sum().item()
        if best_loss is None or loss < best_loss:
            best_loss, best = loss, s
    return best


def _foldable(module: nn.Module) -> bool:
    """Producers whose output channel c is multiplied by weight[c] (and bias[c]) only."""
    name = type(module).__name__
    if isinstance(module, nn.Linear | nn.LayerNorm):
        return True
    return name.endswith("RMSNorm") and not name.startswith("Gemma")  # Gemma scales by 1 + w


@torch.no_grad()
def awq_scale_block(
    block: nn.Module, hessians: dict[str, torch.Tensor], scheme: Scheme, groups=LLAMA_GROUPS
) -> list[str]:
    """Search and fold AWQ scales into `block` in place (its function is unchanged in exact
    arithmetic). Returns {linear name: s}: each scaled linear's weight columns were
    multiplied by s, so its inputs are now x / s. Groups whose K the scheme cannot take
    (K % group_size, say) are skipped: quantization keeps them in full precision."""
    from qcompile.passes.linear import unsupported_reason

    scaled: dict[str, torch.Tensor] = {}
    for producer, linears, names in scaling_groups(block, hessians, groups):
        w = linears[0].weight
        if unsupported_reason(tuple(w.shape), w.dtype, "cpu", scheme) is not None:
            continue  # quantization leaves these linears in full precision: nothing to scale
        s = awq_search_scale([m.weight for m in linears], hessians[names[0]], scheme)
        fold_input_scales(producer, linears, s)
        scaled.update({n: s for n in names})
    return scaled


def scaling_groups(
    block: nn.Module, stats: dict[str, torch.Tensor], groups=LLAMA_GROUPS
) -> list[tuple[nn.Module, list[nn.Linear], tuple[str, ...]]]:
    """(producer, linears, names) of each group of `block` that can be scaled: the producer
    is foldable and every linear is an nn.Linear with statistics in `stats`."""
    modules = dict(block.named_modules())
    out = []
    for producer_name, names in groups:
        producer = modules.get(producer_name)
        linears = [modules.get(n) for n in names]
        if (
            producer is not None
            and _foldable(producer)
            and all(
                isinstance(m, nn.Linear) and n in stats for n, m in zip(names, linears, strict=True)
            )
        ):
            out.append((producer, linears, names))
    return out


@torch.no_grad()
def fold_input_scales(producer: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """W x = (W diag(s)) (x / s): scale the linears' input columns by s and divide the
    producer's output channels (RMSNorm weight, or a linear's rows and bias) by s."""
    s = s.to(producer.weight.device)
    if isinstance(producer, nn.Linear):  # its output rows feed the group's inputs
        producer.weight.div_(s[:, None].to(producer.weight.dtype))
    else:
        producer.weight.div_(s.to(producer.weight.dtype))
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(s.to(producer.bias.dtype))
    for m in linears:
        m.weight.mul_(s[None, :].to(m.weight.dtype))


def awq_quantize_model(model: nn.Module, batches, config, progress: bool = True):
    """AWQ + RTN every supported linear of `model` in place, block by block (each block's
    statistics taken on the outputs of the already-quantized blocks). Returns the report."""
    from qcompile.quant.calibration import quantize_sequentially
    from qcompile.quantize import quantize_
    from qcompile.report import CompileReport

    report = CompileReport()

    def quantize_block(prefix: str, block: nn.Module, hessians: dict) -> None:
        awq_scale_block(block, hessians, config.scheme)
        report.records.extend(quantize_(block, config, prefix=prefix).records)

    quantize_sequentially(model, batches, quantize_block, progress=progress)
    # the rest (lm_head skipped); the blocks' fallback linears are still nn.Linear and
    # would be listed a second time
    seen = {r.name for r in report.records}
    report.records.extend(r for r in quantize_(model, config).records if r.name not in seen)
    return report
