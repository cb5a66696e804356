"""Probe (thirty-second session): tune W4A8's codes as well as s1, end to end, after rotated
GPTQ g128 (K padded) on SmolLM2. Each code is a float with a straight-through rounding onto the
layer's fixed integer grid (its s2 and z stay); Adam on the codes (LR_C) and s1 (LR_S), KL to
the fp32 model on the calibration windows `accuracy.py` uses. MODE=s1 runs the library's
`finetune_scales_` instead (s1 only). Prints the perplexity; `results/session32/codes_probe/`.

    MODE=codes STEPS=96 LR_C=5e-3 python benchmarks/probe_tune_codes.py
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import accuracy as A  # noqa: E402

from qcompile import QuantConfig, Scheme  # noqa: E402
from qcompile.eval import load_corpus, perplexity  # noqa: E402
from qcompile.quant import finetune as FT  # noqa: E402
from qcompile.quant.gptq import gptq_quantize_model  # noqa: E402
from qcompile.quant.int4 import pack_int4_along_k, unpack_int4_along_k  # noqa: E402
from qcompile.quant.rotate import rotate_model_  # noqa: E402
from qcompile.quantize import W4A8Linear  # noqa: E402

MODE = os.environ.get("MODE", "codes")  # codes | s1
STEPS = int(os.environ.get("STEPS", "96"))
LR_C = float(os.environ.get("LR_C", "5e-3"))
LR_S = float(os.environ.get("LR_S", "1e-5"))
FLIPS: list[float] = []


class TunableCodes(FT._TunableW4A8):
    """The library's W4A8 twin with trainable codes (float, rounded straight-through onto
    the layer's grid) as well as s1."""

    def __init__(self, layer: W4A8Linear):
        super().__init__(layer)
        q = unpack_int4_along_k(layer.qweight).to(torch.float32)
        n, k = q.shape
        g = layer.group_size
        self.s2 = layer.group_scales.float().t()[..., None]  # [N, K/G, 1]
        self.z = layer.group_zeros.float().t()[..., None]
        self.v = nn.Parameter(q.view(n, k // g, g) - self.z)  # q - z, on the grid

    def rounded(self) -> torch.Tensor:
        return torch.maximum(torch.minimum(torch.round(self.v), 15 - self.z), -self.z)

    def int8_weight(self) -> torch.Tensor:
        codes = self.v + (self.rounded() - self.v).detach()
        return (codes * self.s2).flatten(1)

    @torch.no_grad()
    def write_back(self) -> None:
        q = (self.rounded() + self.z).flatten(1).to(torch.int32)
        old = unpack_int4_along_k(self.layer.qweight).to(torch.int32)
        FLIPS.append((q != old).float().mean().item())
        self.layer.qweight.copy_(pack_int4_along_k(q))
        super().write_back()


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.time()
    tok, model = A.load_smollm2()
    ids = torch.tensor(tok(load_corpus(A.CORPUS))["input_ids"])
    m = copy.deepcopy(model)
    rotate_model_(m)
    scheme = Scheme(name="w4a8", group_size=128, pad_k=True)
    gptq_quantize_model(
        m, A.calibration_batches(tok), QuantConfig(scheme), act_order=True, clip_search=True
    )
    print(f"gptq done {time.time() - t0:.0f}s", flush=True)
    if os.environ.get("BASE"):
        print("base ppl", perplexity(m, ids, window=512, windows=16), flush=True)
    cal = A.calibration_batches(tok, count=A.FT_WINDOWS)
    if MODE == "s1":
        FT.finetune_scales_(m, model, cal, steps=STEPS, lr=LR_S, progress=False)
    else:
        swapped = FT._swap(m, W4A8Linear, TunableCodes)
        for p in m.parameters():
            p.requires_grad_(False)
        codes = [s.v for _, s in swapped]
        scales = [s.scale for _, s in swapped]
        for p in codes + scales:
            p.requires_grad_(True)
        opt = torch.optim.Adam([{"params": codes, "lr": LR_C}, {"params": scales, "lr": LR_S}])
        m.eval()
        model.eval()
        for step in range(STEPS):
            x = cal[step % len(cal)]
            with torch.no_grad():
                target = F.log_softmax(model(x).logits.float(), -1)
            logp = F.log_softmax(m(x).logits.float(), -1)
            loss = F.kl_div(logp.flatten(0, -2), target.flatten(0, -2), log_target=True,
                            reduction="batchmean")  # fmt: skip
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 8 == 0:
                print(step, round(loss.item(), 4), f"{time.time() - t0:.0f}s", flush=True)
        for name, s in swapped:
            s.write_back()
            m.set_submodule(name, s.layer)
        print("mean code flips", sum(FLIPS) / len(FLIPS))
    ppl = perplexity(m, ids, window=512, windows=16)
    print(MODE, STEPS, LR_C, LR_S, "ppl", ppl, f"{time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
