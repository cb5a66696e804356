import sys, torch
sys.path.insert(0, "tests")
import conftest  # noqa
from strategies import W4A8Problem
from qcompile import Scheme
from qcompile.quant.w4a8 import quantize_weight_w4a8, PackedW4A8
from qcompile.lowering.w4a8 import KernelConfig, valid_config
import test_w4a8 as t
for m, n, k, g in ((1, 16, 256, 128), (17, 64, 256, 128), (1, 64, 512, 128), (5, 72, 256, 64)):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen); x = torch.randn(m, k, generator=gen)
    p = quantize_weight_w4a8(w, Scheme(name="w4a8", group_size=g))
    p = PackedW4A8(*(q.cuda() for q in p.tensors()), p.group_size)
    prob = W4A8Problem(x.half().cuda(), w, p, None, torch.float16, "int8")
    for bk in (64, 128, 256):
        for bn in (16, 32, 64):
            for sk in (1, 2):
                cfg = KernelConfig("gemm_swar", 16, bn, bk, sk, 4, 2, False)
                if not valid_config(cfg, n, k, g, "int8"):
                    continue
                try:
                    t._check_config(prob, cfg); r = "ok"
                except AssertionError:
                    r = "WRONG"
                print(f"m{m} n{n} k{k} g{g} bk{bk} bn{bn} sk{sk}: {r}", flush=True)
