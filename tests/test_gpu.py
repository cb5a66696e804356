"""On the H100 (`pytest -m gpu`): the compiled kernels, autotuning, CUDA graphs."""

from __future__ import annotations

import copy
import gc
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_close_rel
from torch import nn

import qcompile
from qcompile import QuantConfig, Scheme
from qcompile.config import Scheme as _Scheme
from qcompile.quant.int4 import dequantize_int4
from qcompile.quant.rtn import quantize_weight_int4

pytestmark = pytest.mark.gpu
OP = torch.ops.qcompile.w4a16_linear


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "0")  # default configs, except where a test tunes
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 128, None])
@pytest.mark.parametrize("m", [1, 5, 16, 64, 200])
def test_op_on_cuda_matches_float64(dtype, group, m):
    gen = torch.Generator().manual_seed(m)
    n, k = 768, 1024
    p = quantize_weight_int4(torch.randn(n, k, generator=gen), _Scheme(group_size=group), dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    ref = x.double() @ dequantize_int4(p, torch.float64).t() + bias.double()
    dev = [t.cuda() for t in (x, p.qweight, p.scales, p.offsets, bias)]
    out = OP(*dev[:4], dev[4], p.group_size)
    assert_close_rel(out, ref, dtype)


def test_autotune_tunes_once_and_persists(tmp_path, monkeypatch):
    from qcompile.lowering import autotune
    from qcompile.lowering.autotune import Autotuner, TuneKey, m_bucket

    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "1")
    autotune.autotuner.cache_clear()
    n, k, m = 1024, 2048, 3
    p = quantize_weight_int4(torch.randn(n, k), Scheme(group_size=128), torch.float16)
    x = torch.randn(m, k, dtype=torch.float16, device="cuda")
    out = OP(x, p.qweight.cuda(), p.scales.cuda(), p.offsets.cuda(), None, 128)
    ref = x.double().cpu() @ dequantize_int4(p, torch.float64).t()
    assert_close_rel(out, ref, torch.float16)
    tuner = autotune.autotuner(0)
    assert tuner.path.exists()
    fresh = Autotuner(tuner.gpu, tuner.triton_version, tmp_path)
    key = TuneKey("w4a16", m_bucket(m), n, k, 128, "float16")
    assert fresh.lookup(key) == tuner.user[key]
    autotune.autotuner.cache_clear()


@pytest.mark.parametrize("family", ["w4a16", "kv4"])
def test_autotune_on_threads_times_what_one_thread_times(tmp_path, monkeypatch, family):
    """`QCOMPILE_TUNE_THREADS=8`: the candidates compiled on 8 threads, then timed one by
    one: the same candidates come through as on one thread (none lost to a race) and the
    tuned op still matches float64."""
    from qcompile.lowering import autotune
    from qcompile.quant.kv4 import KVScheme, dequantize_kv4, quantize_kv4

    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "1")
    gen = torch.Generator().manual_seed(7)
    if family == "w4a16":
        # small candidate sets (31 and 61 configs), each tuned twice
        p = quantize_weight_int4(torch.randn(512, 512, generator=gen), Scheme(group_size=128),
                                 torch.float16)  # fmt: skip
        x = torch.randn(300, 512, generator=gen).half()
        ref = x.double() @ dequantize_int4(p, torch.float64).t()
        args = [t.cuda() for t in (x, p.qweight, p.scales, p.offsets)] + [None, 128]

        def run():
            return OP(*args)
    else:
        keys, values = (
            quantize_kv4(torch.randn(1, 8, 130, 128, generator=gen), KVScheme()) for _ in "kv"
        )
        q = torch.randn(1, 32, 1, 128, generator=gen).half()
        kv = [t.cuda() for t in (keys.codes, keys.scales, keys.offsets, values.codes,
                                 values.scales, values.offsets)]  # fmt: skip
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.double(),
            *(
                dequantize_kv4(p, torch.float64).repeat_interleave(4, 1) for p in (keys, values)
            ),  # fmt: skip
        )

        def run():
            return torch.ops.qcompile.kv4_attention(q.cuda(), *kv, None, None, False, 128**-0.5)

    trials = {}
    for threads in ("1", "8"):
        monkeypatch.setenv("QCOMPILE_TUNE_THREADS", threads)
        monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path / threads))
        autotune.autotuner.cache_clear()
        assert_close_rel(run().cpu(), ref, torch.float16)
        (got,) = autotune.autotuner(0).trials.values()
        trials[threads] = sorted(str(cfg) for _, cfg in got)
    autotune.autotuner.cache_clear()
    assert trials["8"] == trials["1"] and len(trials["1"]) > 8


class Block(nn.Module):
    def __init__(self, d=1024, h=2816):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d, bias=True)
        self.o = nn.Linear(3 * d, d, bias=False)
        self.up = nn.Linear(d, h, bias=False)
        self.down = nn.Linear(h, d, bias=False)
        self.lm_head = nn.Linear(d, 512, bias=False)

    def forward(self, x):
        x = x + self.o(torch.relu(self.qkv(x)))
        x = x + self.down(torch.nn.functional.silu(self.up(x)))
        return self.lm_head(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_model_matches_reference_path(dtype):
    torch.manual_seed(0)
    model = Block().to(dtype)
    ref_model = copy.deepcopy(model)
    qcompile.quantize_(ref_model, QuantConfig())  # same RTN codes, CPU reference op
    be = qcompile.backend(QuantConfig())
    compiled = torch.compile(model.cuda(), backend=be)
    for shape in ((1, 1024), (2, 7, 1024), (33, 1024)):
        x = torch.randn(*shape, dtype=dtype)
        with torch.no_grad():
            out = compiled(x.cuda())
            ref = ref_model(x)
        assert_close_rel(out, ref, dtype)
    paths = {r.path for r in be.report.records if r.status == "quantized"}
    assert paths == {"triton"}


def test_reduce_overhead_keeps_packed_weights_static():
    """Under CUDA graphs only the activation is copied per replay, not the packed weights."""
    torch.manual_seed(0)
    model = Block().half().cuda()
    compiled = torch.compile(model, backend="qcompile", mode="reduce-overhead")
    x = torch.randn(4, 1024, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        for _ in range(3):
            out = compiled(x)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out2 = compiled(x)
            torch.cuda.synchronize()
    assert torch.equal(out, out2)
    copies = [e for e in prof.events() if "copy" in e.name.lower() or "memcpy" in e.name.lower()]
    # 4 quantized layers x 3 packed tensors would give >= 12 copies if they were not static.
    assert len(copies) <= 2, [e.name for e in copies]


def test_pdl_default_changes_no_value_under_cuda_graphs(monkeypatch):
    """Programmatic dependent launch (the default: lane kernel and Inductor's kernels) gives
    the same bits as plain launches over replays of one CUDA graph, new input each time."""
    backend_module = sys.modules["qcompile.backend"]
    from qcompile.lowering import w4a16 as lowering

    torch.manual_seed(0)
    model = SiblingBlock().half().cuda()
    xs = [torch.randn(5, 1024, dtype=torch.float16, device="cuda") for _ in range(4)]  # lane rows
    outs = {}
    for pdl in (False, True):
        monkeypatch.setattr(lowering, "_LANE_PDL", pdl)
        monkeypatch.setattr(backend_module, "_INDUCTOR_PDL", pdl)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="qcompile", mode="reduce-overhead")
        with torch.no_grad():
            for x in xs[:2]:
                compiled(x)  # warm-up, record
            outs[pdl] = [compiled(x).clone() for x in xs]
    ref = copy.deepcopy(model)
    qcompile.quantize_(ref, QuantConfig())
    with torch.no_grad():
        want = [ref(x) for x in xs]
    for i, (a, b) in enumerate(zip(outs[False], outs[True], strict=True)):
        assert torch.equal(a, b), i
        assert_close_rel(b, want[i], torch.float16)


class SiblingBlock(nn.Module):
    """gate/up on one input: the backend fuses them into one launch (narrow + view)."""

    def __init__(self, d=1024, h=2816):
        super().__init__()
        self.gate = nn.Linear(d, h, bias=False)
        self.up = nn.Linear(d, h, bias=False)
        self.down = nn.Linear(h, d, bias=False)

    def forward(self, x):
        h = torch.nn.functional.silu(self.gate(x)) * self.up(x)
        return self.down(h.view(x.shape[0], -1))


def test_reduce_overhead_after_an_aot_cache_hit_keeps_packed_weights_static():
    """A second compile loads the graph from AOT autograd's cache (a warm restart): its CUDA
    graph must still treat the packed weights as static (no per-replay copies) and give the
    first compile's output."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    torch.manual_seed(0)
    model = SiblingBlock().half().cuda()
    x = torch.randn(4, 1024, dtype=torch.float16, device="cuda")
    outs = []
    with fresh_cache(), torch.no_grad():
        for _ in range(2):
            torch._dynamo.reset()
            counters.clear()
            compiled = torch.compile(model, backend="qcompile", mode="reduce-overhead")
            for _ in range(3):
                out = compiled(x)
            outs.append(out.clone())
        assert counters["aot_autograd"]["autograd_cache_hit"] == 1
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out2 = compiled(x)
            torch.cuda.synchronize()
    assert torch.equal(outs[0], outs[1]) and torch.equal(out2, outs[1])
    copies = [e for e in prof.events() if "copy" in e.name.lower() or "memcpy" in e.name.lower()]
    assert len(copies) <= 2, [e.name for e in copies]  # 3 layers x 3 packed tensors otherwise


def _requested_bytes() -> int:
    return torch.cuda.memory_stats()["requested_bytes.all.current"]


def _compiled_matches_reference(model: nn.Module, reference: nn.Module):
    """`model` (on CUDA, fp16, quantized g32) compiled with the backend: logits of
    `reference` (the same codes, CPU reference op) on the Triton path. Returns the backend."""
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    be = qcompile.backend(QuantConfig(Scheme(group_size=32)))
    with torch.no_grad():
        out = torch.compile(model, backend=be)(ids.cuda()).logits
        ref = reference(ids).logits
    assert_close_rel(out.float().cpu(), ref.float(), torch.float16)
    assert {r.path for r in be.report.records if r.status == "prequantized"} == {"triton"}
    return be


def test_quantized_on_cpu_then_moved_to_cuda_keeps_siblings_fused():
    """quantize_ on CPU in float32, then `.to("cuda", torch.float16)`: the move keeps q/k/v/o
    and gate/up co-located (one storage per kind on the GPU), the backend fuses them into one
    launch each on the Triton path, and the logits match the CPU reference op in fp16."""
    from helpers import tiny_causal_lm

    model = tiny_causal_lm("qwen2", 2)
    qcompile.quantize_(model, QuantConfig(Scheme(group_size=32)))
    reference = copy.deepcopy(model).half()  # the same codes, CPU reference op
    model.to("cuda", torch.float16)
    attn = model.model.layers[0].self_attn
    qkvo = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
    for buffer in ("qweight", "scales", "offsets"):
        tensors = [getattr(m, buffer) for m in qkvo]
        assert {t.device.type for t in tensors} == {"cuda"}
        assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1, buffer
    be = _compiled_matches_reference(model, reference)
    assert "10 sibling layers fused into 4 launches" in be.report.summary()


def test_save_pretrained_then_from_pretrained_onto_cuda_runs_fused_triton(tmp_path):
    """A CPU-quantized model through transformers' save_pretrained, then from_pretrained with
    dtype=float16, then .to("cuda"): scales in fp16, siblings co-located on the GPU, one launch per
    sibling group on the Triton path, logits of the CPU reference op on the same codes."""
    from helpers import tiny_causal_lm
    from transformers import AutoModelForCausalLM

    model = tiny_causal_lm("llama", 2)
    qcompile.quantize_(model, QuantConfig(Scheme(group_size=32)))
    model.save_pretrained(tmp_path)
    reference = copy.deepcopy(model).half()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float16).cuda().eval()
    attn = loaded.model.layers[0].self_attn
    assert attn.q_proj.scales.dtype == torch.float16 and attn.q_proj.qweight.is_cuda
    ptrs = {m.qweight.untyped_storage().data_ptr() for m in (attn.q_proj, attn.k_proj)}
    assert len(ptrs) == 1
    _compiled_matches_reference(loaded, reference)


def test_quantize_ahead_of_time_memory_on_cuda():
    # One-time lazy allocations (library workspaces, the first use of an op) would count as
    # "not freed": quantize a throwaway model first, then measure a second one.
    qcompile.quantize_(Block().half().cuda(), QuantConfig())
    gc.collect()
    torch.cuda.synchronize()
    model = Block().half().cuda()
    # Requested bytes, not memory_allocated(): the caching allocator may hand a packed tensor
    # a larger cached block without splitting off a remainder under 1 MiB, and
    # memory_allocated() counts whole blocks.
    before = _requested_bytes()
    fp16_linear = sum(m.weight.numel() * 2 for m in (model.qkv, model.o, model.up, model.down))
    qcompile.quantize_(model, QuantConfig())
    torch.cuda.synchronize()
    packed = sum(
        b.numel() * b.element_size()
        for m in (model.qkv, model.o, model.up, model.down)
        for b in m.buffers()
    )
    assert packed <= 0.3 * fp16_linear, f"packed {packed} > 0.3 x fp16 {fp16_linear}"
    freed = before - _requested_bytes()
    assert freed >= 0.95 * (fp16_linear - packed), f"freed {freed} of {fp16_linear - packed} bytes"


def test_cli_compiled_generate_and_bench_on_cuda(tmp_path, capsys):
    """`qcompile generate --compile on` (CUDA graphs through transformers' CompileConfig) gives
    the eager run's text; `bench --model` times both rows with CUDA graphs. (Compiling
    model.forward directly failed here: a CUDA-graph output overwritten by the next replay.)"""
    from helpers import tiny_causal_lm
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from qcompile import cli

    tiny_causal_lm("llama", 2).save_pretrained(tmp_path)
    vocab = {"[UNK]": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(254)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]")
    fast.save_pretrained(tmp_path)
    common = ["--device", "cuda", "--dtype", "float16", "--group-size", "32"]
    texts = {}
    for flag in ("off", "on"):
        args = ["generate", str(tmp_path), "--prompt", "w1 w2 w3", "--max-new-tokens", "12"]
        assert cli.main([*args, "--compile", flag, *common]) == 0
        texts[flag] = capsys.readouterr().out.strip()
    assert texts["on"] == texts["off"] and texts["on"]
    args = ["bench", "--model", str(tmp_path), "--device", "cuda", "--batch", "1,2"]
    assert cli.main([*args, "--prompt-tokens", "8", "--new-tokens", "8", "--group-size", "32"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert sum(r[:3] == ["bfloat16", "+", "Inductor"] for r in rows) == 2
    assert sum(r[:3] == ["qcompile", "w4a16", "g32"] for r in rows) == 2


def test_split_k_first_launched_inside_a_cuda_graph_warmup():
    """A fresh process whose first W4A16 launch is the warm-up run of a CUDA-graph tree (as
    when generate() compiles only decode steps): the tile counters were allocated while
    tracing, so recording succeeds and replays give the eager result."""
    script = textwrap.dedent("""
        import torch, qcompile
        from qcompile import QuantConfig
        from qcompile.lowering import w4a16 as lowering
        model = torch.nn.Sequential(torch.nn.Linear(4096, 14336, bias=False)).half().cuda()
        qcompile.quantize_(model, QuantConfig())
        x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
        compiled = torch.compile(model, backend="qcompile", mode="reduce-overhead")
        with torch.no_grad():
            outs = []
            for _ in range(4):
                torch.compiler.cudagraph_mark_step_begin()
                outs.append(compiled(x).clone())
            assert lowering._counters, "counters not reserved while tracing"
            ref = model(x)
        for out in outs:
            torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_output_past_2_to_the_31_elements_runs_in_row_chunks():
    """A 128k-vocabulary lm_head over 16400 tokens: out has 2.15e9 elements, past int32, so
    the op launches row chunks (one comparison decides; `w4a16.row_chunks`). The first and
    last rows against float64."""
    from qcompile.lowering import w4a16

    m, n, k = 16400, 131072, 1024
    assert m * n >= 2**31 and len(w4a16.row_chunks(m, k, n)) == 2
    gen = torch.Generator(device="cuda").manual_seed(3)
    p = quantize_weight_int4(
        torch.randn(n, k, device="cuda", generator=gen), _Scheme(group_size=128), torch.float16
    )
    x = torch.randn(m, k, device="cuda", generator=gen).half()
    out = OP(x, p.qweight, p.scales, p.offsets, None, 128)
    w = dequantize_int4(p, torch.float64)
    for rows in (slice(0, 8), slice(m - 8, m)):
        assert_close_rel(out[rows], x[rows].double() @ w.t(), torch.float16)
