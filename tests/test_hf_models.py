"""transformers causal LMs (tiny random configs, no hub) through the backend and `quantize_`.

Per family: compiled logits equal the reference op's and stay within int4 error of fp32;
greedy `generate` with a static cache gives the reference op's tokens; the decode step has
no graph break and compiles a fixed number of graphs, not one per step or per batch size.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import HF_FAMILIES, assert_close_rel, rel_error, tiny_causal_lm
from torch import nn
from torch._dynamo.utils import counters

import qcompile
from qcompile import QuantConfig

FAMILIES = list(HF_FAMILIES)
CONFIG = QuantConfig()  # what backend="qcompile" uses: g128 asym, lm_head skipped
PROMPT = 7
MAX_CACHE = 32  # one static-cache size for every call, so more new tokens reuse its shapes
# Relative logits error of g128 RTN vs fp32 on these random models: measured 0.16-0.20
# (Gemma 3: 0.25-0.28); a wrong layout or scale gives errors near 1 or more.
INT4_LOGITS_ERROR = (0.05, 0.35)


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _ids(batch: int, length: int = PROMPT, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _statuses(records) -> dict[str, str]:
    return {r.name: r.status for r in records}


@pytest.mark.parametrize("family", FAMILIES)
def test_backend_by_name_matches_reference_op_within_int4_error(family):
    """`torch.compile(model, backend="qcompile")` against the eager reference op and fp32.

    (quantize_ then compile is checked on the decode steps by the generate test below.)
    """
    model = tiny_causal_lm(family)
    names = _linear_names(model)
    quantized = copy.deepcopy(model)
    qcompile.quantize_(quantized, CONFIG)
    ids = _ids(2, 9)
    with torch.no_grad():
        fp = model(ids).logits
        ref = quantized(ids).logits  # eager, reference op: the oracle
        start = len(qcompile.default_backend.report.records)
        out = torch.compile(model, backend="qcompile")(ids).logits
    assert_close_rel(out, ref, torch.float32)
    err = rel_error(out, fp)
    assert INT4_LOGITS_ERROR[0] < err < INT4_LOGITS_ERROR[1], f"{family}: int4 error {err:.3g}"
    records = qcompile.default_backend.report.records[start:]
    assert _statuses(records) == {n: "skipped" if n == "lm_head" else "quantized" for n in names}


def _generate(model, ids, new_tokens, **kwargs):
    return model.generate(
        ids,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        cache_implementation="static",
        max_cache_len=MAX_CACHE,
        pad_token_id=0,
        **kwargs,
    )


LOGITS = {"return_dict_in_generate": True, "output_logits": True}


def _compile_config(backend, mode: str = "default"):
    """transformers' own decode-step compilation (prefill stays eager), made to run on CPU."""
    from transformers import CompileConfig

    config = CompileConfig(backend=backend, mode=mode, fullgraph=True)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    return config


# Graphs compiled for the first decode steps at batch 1. Sliding-window cache layers read
# the Python int `cumulative_length_int` (transformers' cache_utils), so Dynamo specializes
# the first decode step on it and recompiles once, with it dynamic, at the second step.
WARMUP_GRAPHS = {"llama": 1, "qwen2": 1, "mistral": 2, "gemma3": 2, "phi3": 1}


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_static_cache_matches_reference_and_does_not_recompile(family):
    """quantize_, then transformers compiles each decode step with the qcompile backend.

    Observed per family: WARMUP_GRAPHS at batch 1, then one more graph at batch 2 (the batch
    dimension becomes dynamic, automatic dynamic shapes), then none: not at batch 3, not
    for more new tokens, not per decode step. No graph break (fullgraph=True, and counted).
    """
    model = tiny_causal_lm(family)
    names = _linear_names(model)
    fp = copy.deepcopy(model)
    qcompile.quantize_(model, CONFIG)
    eager = copy.deepcopy(model)  # same int4 weights, reference op, no compile
    be = qcompile.backend(CONFIG)
    compile_config = _compile_config(be)
    graphs = []
    for batch, new_tokens in ((1, 4), (1, 8), (2, 4), (3, 4), (3, 8)):
        ids = _ids(batch, seed=batch)
        with torch.no_grad():
            out = _generate(model, ids, new_tokens, compile_config=compile_config, **LOGITS)
            ref = _generate(eager, ids, new_tokens, disable_compile=True, **LOGITS)
        assert out.sequences.shape == (batch, PROMPT + new_tokens)
        assert torch.equal(out.sequences, ref.sequences), f"{family} batch {batch}"
        logits = torch.stack(out.logits, dim=1)  # [B, new, V]: prefill's, then each step's
        assert_close_rel(logits, torch.stack(ref.logits, dim=1), torch.float32)
        with torch.no_grad():  # fp32 on the same tokens (teacher forcing)
            fp_logits = fp(out.sequences).logits[:, PROMPT - 1 : -1]
        err = rel_error(logits, fp_logits)
        assert INT4_LOGITS_ERROR[0] < err < INT4_LOGITS_ERROR[1], f"{family}: int4 error {err:.3g}"
        graphs.append(be.report.graphs)
    warm = WARMUP_GRAPHS[family]
    assert graphs == [warm, warm, warm + 1, warm + 1, warm + 1]
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert {(r.name, r.status) for r in be.report.records} == {
        (n, "skipped" if n == "lm_head" else "prequantized") for n in names
    }


def test_backend_by_name_quantizes_prefill_and_decode():
    """Compiling `forward` itself (no quantize_): prefill and decode both run int4.

    transformers' `compile_config` compiles the decode step only; its prefill runs eagerly,
    with the fp32 weights unless the model was quantized ahead of time.
    """
    model = tiny_causal_lm("llama")
    eager = copy.deepcopy(model)
    qcompile.quantize_(eager, CONFIG)
    be = qcompile.backend(CONFIG)
    model.forward = torch.compile(model.forward, backend=be)
    ids = _ids(1)
    with torch.no_grad():
        for new_tokens in (4, 8):
            out = _generate(model, ids, new_tokens, disable_compile=True)
            ref = _generate(eager, ids, new_tokens, disable_compile=True)
            assert torch.equal(out, ref), f"{out.tolist()} != {ref.tolist()}"
    assert be.report.graphs == 2  # the prompt's graph and the one-token decode graph
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_reduce_overhead_on_cuda(family):
    """CUDA graphs (mode="reduce-overhead") in fp16 on the Triton kernels: the eager tokens."""
    model = tiny_causal_lm(family).to("cuda", torch.float16)
    qcompile.quantize_(model, CONFIG)
    eager = copy.deepcopy(model)
    be = qcompile.backend(CONFIG)
    compile_config = _compile_config(be, mode="reduce-overhead")
    for batch in (1, 2, 3):
        ids = _ids(batch, seed=batch).cuda()
        with torch.no_grad():
            out = _generate(model, ids, 8, compile_config=compile_config)
            ref = _generate(eager, ids, 8, disable_compile=True)
        assert torch.equal(out, ref), f"{family} batch {batch}: {out.tolist()} != {ref.tolist()}"
    assert be.report.graphs == WARMUP_GRAPHS[family] + 1
    assert {r.path for r in be.report.records if r.status == "prequantized"} == {"triton"}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_lm_head_stays_fp_by_default_and_is_int4_on_request(family):
    """QuantConfig(skip=()) quantizes lm_head; a tied embedding keeps its fp weight."""
    model = tiny_causal_lm(family)
    tied = family == "gemma3"
    embedding = model.get_input_embeddings().weight
    assert (model.lm_head.weight is embedding) == tied
    default = copy.deepcopy(model)
    report = qcompile.quantize_(default, CONFIG)
    assert type(default.lm_head) is nn.Linear
    assert _statuses(report.records)["lm_head"] == "skipped"
    everything = QuantConfig(skip=())
    report = qcompile.quantize_(model, everything)
    assert isinstance(model.lm_head, qcompile.W4A16Linear)
    record = {r.name: r for r in report.records}["lm_head"]
    assert record.status == "quantized" and record.shape == (256, 128)
    assert ("tied to model.embed_tokens" in record.detail) == tied
    assert "embeddings are never quantized" in record.detail or not tied
    assert isinstance(model.get_input_embeddings(), nn.Embedding)
    assert torch.equal(model.get_input_embeddings().weight, embedding)  # untouched, fp32
    ids = _ids(2)
    with torch.no_grad():
        err_all = rel_error(model(ids).logits, default(ids).logits)
    assert 0.005 < err_all < 0.25, f"quantizing lm_head moved the logits by {err_all:.3g}"


def test_backend_quantizes_tied_lm_head_on_request_and_says_the_embedding_stays_fp():
    model = tiny_causal_lm("gemma3")
    reference = copy.deepcopy(model)
    everything = QuantConfig(skip=())
    qcompile.quantize_(reference, everything)
    be = qcompile.backend(everything)
    ids = _ids(2)
    with torch.no_grad():
        out = torch.compile(model, backend=be)(ids).logits
        ref = reference(ids).logits
    assert_close_rel(out, ref, torch.float32)
    record = {r.name: r for r in be.report.records}["lm_head"]
    assert record.status == "quantized"
    assert "tied to model.embed_tokens, kept in full precision" in record.detail
    assert all(r.status == "quantized" for r in be.report.records)
