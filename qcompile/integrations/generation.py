"""Timed greedy `generate()` of a transformers causal LM: what `qcompile generate` and the demo
print (text, tokens per second, compile + warm-up time), and the decode speed `qcompile bench
--model` measures (`timed_decode`).

Compiling goes through transformers' own `CompileConfig` (`compile_config`): generate()
compiles the decode step, runs the prompt eagerly and marks each step's start for CUDA
graphs. (A `torch.compile`d `model.forward` under `mode="reduce-overhead"` fails in
generate() on the GPU: the static cache's in-place writes read CUDA-graph outputs that the
next replay overwrote.) A compiled run is warmed up on a cache of the same shape as the timed
run's (a static or KV4 cache sized prompt + new tokens), so the timed run compiles nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

KV4_KINDS = ("off", "token", "channel")


@dataclass(frozen=True)
class Generation:
    """One timed generation: the new text, its token count and timings (seconds)."""

    text: str
    tokens: int
    seconds: float
    warmup_seconds: float | None  # compile + warm-up; None when not compiled
    cache: object | None  # the timed run's cache (a KV4Cache for --kv4)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def kv4_scheme(model: torch.nn.Module, kv4: str):
    """The `KVScheme` of a `kv4` kind, or None for "off". "token": K and V per token in groups
    of min(128, head_dim) channels (the fast format); "channel": keys per channel over 128
    tokens (the accurate one, docs/kv4.md)."""
    if kv4 not in KV4_KINDS:
        raise ValueError(f"kv4={kv4!r}: expected one of {KV4_KINDS}")
    if kv4 == "off":
        return None
    from qcompile.config import KVScheme

    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return KVScheme(group_size=min(128, head_dim), key_tokens=128 if kv4 == "channel" else 0)


def compile_config(backend, mode: str | None = "reduce-overhead", module_guards: bool = True):
    """transformers' CompileConfig for `generate()`: each decode step compiled with `backend`
    (a name or a callable such as `qcompile.backend(config)`), whole-graph, on any device.

    `module_guards=False` drops Dynamo's guards on the model's modules
    (`torch.compiler.skip_guard_on_all_nn_modules_unsafe`): less host time per decode step
    (H100, 8 layers, KV4 cache: 0.78 -> 0.65 ms per compiled call), but a module attribute
    changed after compiling (a swapped weight, another attention implementation) is then
    not seen until `torch._dynamo.reset()`. For a model that no longer changes.
    """
    from transformers import CompileConfig

    if module_guards:
        config = CompileConfig(backend=backend, mode=mode or "default", fullgraph=True)
    else:  # torch.compile takes a mode or options, not both: the mode's options by name
        from torch._inductor import list_mode_options

        options = {
            **(list_mode_options(mode) if mode else {}),
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
        }
        config = CompileConfig(backend=backend, mode=None, fullgraph=True, options=options)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    return config


def _compile_kwargs(compile) -> dict:
    """generate()'s arguments: compile with `compile`, or never (transformers would compile a
    static cache's decode step on its own on CUDA)."""
    return {"compile_config": compile} if compile is not None else {"disable_compile": True}


def generation_cache(model: torch.nn.Module, kv4: str, length: int, compiled: bool):
    """The cache for `length` positions: a `KV4Cache` of `kv4_scheme(model, kv4)`, a static
    cache when compiled, else None (transformers' dynamic cache)."""
    scheme = kv4_scheme(model, kv4)
    if scheme is not None:
        from qcompile.integrations.kv4_cache import KV4Cache

        return KV4Cache(model.config, length, scheme)
    if not compiled:
        return None
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=length)


def cache_kwargs(cache) -> dict:
    """generate()'s cache argument: `cache` where transformers names it so (its older name,
    `past_key_values`, warns there), else `past_key_values`."""
    if cache is None:
        return {}
    from transformers.generation import utils

    name = "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"
    return {name: cache}


@torch.no_grad()
def timed_generate(
    model: torch.nn.Module,
    tok,
    prompt: str,
    max_new_tokens: int,
    *,
    chat: bool = False,
    kv4: str = "off",
    max_cache_len: int | None = None,
    compile=None,
) -> Generation:
    """Greedy `model.generate` of up to `max_new_tokens` after `prompt` (through the chat
    template with `chat`, where the tokenizer has one), timed; `compile` (a `compile_config`):
    decode steps compiled, after a warm-up on the same cache, emptied after it (timed apart). The
    cache holds `max_cache_len` positions (default: prompt + `max_new_tokens`); one length for
    several prompts lets them share the decode graph."""
    compiled = compile is not None
    if chat and getattr(tok, "chat_template", None):
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    device = next(model.parameters()).device
    inputs = tok(prompt, return_tensors="pt").to(device)
    gen = dict(do_sample=False, pad_token_id=tok.eos_token_id, **_compile_kwargs(compile))
    length = inputs["input_ids"].shape[1] + max_new_tokens
    if max_cache_len is not None:
        if max_cache_len < length:
            raise ValueError(
                f"max_cache_len={max_cache_len} < prompt + max_new_tokens = {length} positions"
            )
        length = max_cache_len
    warmup = None
    cache = generation_cache(model, kv4, length, compiled)
    if compiled:
        t0 = time.perf_counter()
        model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, **gen, **cache_kwargs(cache))
        _sync(device)
        warmup = time.perf_counter() - t0
        _reuse(cache)
    t0 = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, **gen, **cache_kwargs(cache))
    _sync(device)
    seconds = time.perf_counter() - t0
    new = out[0, inputs["input_ids"].shape[1] :]
    return Generation(
        tok.decode(new, skip_special_tokens=True), new.numel(), seconds, warmup, cache
    )


@dataclass(frozen=True)
class DecodeTiming:
    """Greedy decoding of `batch` sequences: seconds of the prompt (with the first new token)
    and of the `new_tokens - 1` decode steps after it; peak CUDA memory of the timed runs."""

    batch: int
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    warmup_seconds: float
    peak_bytes: int | None

    @property
    def tokens_per_second(self) -> float:
        """Decode tokens per second per sequence."""
        return (self.new_tokens - 1) / self.decode_seconds


@torch.no_grad()
def timed_decode(
    model: torch.nn.Module,
    batch: int,
    prompt_tokens: int,
    new_tokens: int,
    *,
    compile=None,
    kv4: str = "off",
    seed: int = 0,
) -> DecodeTiming:
    """Decode speed on `batch` prompts of `prompt_tokens` random tokens: `generate()` of one new
    token, then of `new_tokens` (EOS suppressed), on one cache emptied in between (no
    recompile, no new CUDA graphs); the difference is the time of `new_tokens - 1` decode
    steps. `compile` (a `compile_config`): decode steps compiled. A short generation on that
    cache first warms up (compiles, tunes, records CUDA graphs); timed apart."""
    if new_tokens < 2:
        raise ValueError(f"timed_decode: new_tokens={new_tokens}; need >= 2 (one decode step)")
    device = next(model.parameters()).device
    text = model.config.get_text_config(decoder=True)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, text.vocab_size, (batch, prompt_tokens), generator=gen).to(device)
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False)
    inputs["pad_token_id"] = pad
    inputs.update(_compile_kwargs(compile))
    compiled = compile is not None
    length = prompt_tokens + new_tokens

    cache = generation_cache(model, kv4, length, compiled)

    def run(n: int) -> float:
        _reuse(cache)
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **cache_kwargs(cache))
        _sync(device)
        if out.shape[1] != prompt_tokens + n:
            raise RuntimeError(f"timed_decode: generate() returned {out.shape[1] - prompt_tokens}"
                               f" new tokens, asked for {n}")  # fmt: skip
        return time.perf_counter() - t0

    warmup = run(min(4, new_tokens))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill = run(1)
    total = run(new_tokens)
    if total <= prefill:  # a busy host can take longer over the prompt alone than over all
        raise RuntimeError(
            f"timed_decode: {new_tokens} new tokens took {total:.4f} s and the prompt with "
            f"one took {prefill:.4f} s: {new_tokens - 1} decode steps are too few to time on "
            "this host; ask for more new tokens"
        )
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return DecodeTiming(batch, prompt_tokens, new_tokens, prefill, total - prefill, warmup, peak)


def _reuse(cache) -> None:
    """Empty `cache` in place for the next generate(). Its tensors keep their addresses, so a
    compiled decode step replays its CUDA graphs; a new cache makes the first decode step
    record them again (15-42 ms on the H100 at 8 layers, `results/session30/e2e/`), which
    the timed runs used to include."""
    if cache is not None:
        cache.reset()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
