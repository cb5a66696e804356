import sys; sys.path.insert(0, "tests")
import torch
from strategies import KV4Problem
from helpers import rel_error
from qcompile.config import KVScheme
from qcompile.quant.kv4 import quantize_kv4
from qcompile.lowering.kv4_attention import launch_attention, candidate_configs
s=4100
gen = torch.Generator().manual_seed(s)
keys = quantize_kv4(torch.randn(1, 8, s, 128, generator=gen), KVScheme())
values = quantize_kv4(torch.randn(1, 8, s, 128, generator=gen), KVScheme())
for dtype in (torch.bfloat16, torch.float16):
    q = torch.randn(1, 32, 1, 128, generator=gen).to(dtype)
    problem = KV4Problem(q, keys, values, None, None, False, 128**-0.5)
    ref = problem.reference64()
    cuda = [t.cuda() if isinstance(t, torch.Tensor) else t for t in problem.args()]
    for c in candidate_configs(1, 8, 1, 4, s, 1):
        e = rel_error(launch_attention(c, *cuda).cpu(), ref)
        if e > 5e-3: print(dtype, c.block_n, c.num_warps, c.num_stages, c.split_k, f"{e:.2e}", flush=True)
    print(dtype, "done", flush=True)
