"""The autotuner's M buckets, its JSON cache (fresh, corrupt, stale, shipped) and tuning."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from qcompile.lowering import autotune
from qcompile.lowering.autotune import (
    CACHE_FORMAT,
    Autotuner,
    KernelConfig,
    TuneKey,
    m_bucket,
    shipped_config_name,
)

GPU = "test-gpu"
TRITON = "9.9"
KEY = TuneKey(family="w4a16", m_bucket=16, n=4096, k=4096, group_size=128, dtype="float16")
OTHER_KEY = TuneKey(family="w4a16", m_bucket=1, n=4096, k=11008, group_size=64, dtype="bfloat16")
GEMV = KernelConfig("gemv", block_m=1, block_n=64, block_k=128, split_k=4, num_warps=4)
GEMM_SMALL = KernelConfig("gemm", block_m=16, block_n=64, block_k=64, num_stages=3)
GEMM_LARGE = KernelConfig("gemm", block_m=64, block_n=128, block_k=64, num_warps=8)
DEFAULT = KernelConfig("gemm", block_m=32, block_n=64, block_k=64)
CANDIDATES = (GEMV, GEMM_SMALL, GEMM_LARGE)


@pytest.fixture(autouse=True)
def _no_cuda_no_shipped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tuning allowed, no CUDA graph capture, and no shipped configs unless a test adds some.

    `torch.cuda.is_current_stream_capturing()` raises on a CPU-only build of torch, so the
    capture check is stubbed out here.
    """
    monkeypatch.delenv("QCOMPILE_AUTOTUNE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(autotune, "SHIPPED_DIR", shipped)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


class Bench:
    """A bench callback with fixed timings that records what it was asked to time."""

    def __init__(self, timings: dict[KernelConfig, float | Exception]):
        self.timings = timings
        self.calls: list[KernelConfig] = []

    def __call__(self, cfg: KernelConfig) -> float:
        self.calls.append(cfg)
        result = self.timings[cfg]
        if isinstance(result, Exception):
            raise result
        return result


def must_not_bench(cfg: KernelConfig) -> float:
    raise AssertionError(f"bench was called for {cfg}")


def cache_file(cache_dir: Path, gpu: str = GPU, triton: str = TRITON) -> Path:
    return cache_dir / f"autotune-{gpu}-triton{triton}.json"


def write_cache(path: Path, gpu: str, triton: str, entries: dict[TuneKey, KernelConfig]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "format": CACHE_FORMAT,
        "gpu": gpu,
        "triton": triton,
        "entries": [{"key": asdict(k), "config": asdict(c), "us": 1.0} for k, c in entries.items()],
    }
    path.write_text(json.dumps(data))


# --- M buckets and names -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("m", "bucket"),
    [(0, 1), (1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (16, 16), (17, 32), (4096, 4096)],
)
def test_m_bucket(m: int, bucket: int) -> None:
    assert m_bucket(m) == bucket


@pytest.mark.parametrize("m", [4097, 8192, 10**9])
def test_m_bucket_caps_at_4096(m: int) -> None:
    assert m_bucket(m) == 4096


@pytest.mark.parametrize(
    ("gpu", "family"),
    [
        ("nvidia-h100-80gb-hbm3", "h100"),
        ("nvidia-h100-pcie", "h100"),
        ("nvidia-h200", "h200"),
        ("nvidia-a100-sxm4-40gb", "a100"),
        ("nvidia-l40s", "l40s"),
        ("nvidia-l4", "l4"),
        ("some-unknown-gpu", "some-unknown-gpu"),
    ],
)
def test_shipped_config_name(gpu: str, family: str) -> None:
    assert shipped_config_name(gpu) == family


# --- tuning and the user cache -------------------------------------------------------------


def test_get_tunes_picks_fastest_and_saves(cache_dir: Path) -> None:
    bench = Bench({GEMV: 30.0, GEMM_SMALL: 12.5, GEMM_LARGE: 20.0})
    tuner = Autotuner(gpu=GPU, triton_version=TRITON, cache_dir=cache_dir)
    assert tuner.path == cache_file(cache_dir)
    assert not tuner.path.exists()

    assert tuner.get(KEY, CANDIDATES, bench, DEFAULT) == GEMM_SMALL
    assert bench.calls == list(CANDIDATES)
    assert tuner.timings[KEY] == 12.5
    assert tuner.lookup(KEY) == GEMM_SMALL

    data = json.loads(tuner.path.read_text())
    assert data["format"] == CACHE_FORMAT
    assert data["gpu"] == GPU
    assert data["triton"] == TRITON
    assert data["entries"] == [{"key": asdict(KEY), "config": asdict(GEMM_SMALL), "us": 12.5}]
    assert list(cache_dir.glob("*.tmp")) == []  # the atomic write left nothing behind

    # In this process the answer is now memoized: no second round of benchmarking.
    assert tuner.get(KEY, CANDIDATES, must_not_bench, DEFAULT) == GEMM_SMALL


def test_second_tuner_reads_cache_without_benchmarking(cache_dir: Path) -> None:
    first = Autotuner(gpu=GPU, triton_version=TRITON, cache_dir=cache_dir)
    first.get(KEY, CANDIDATES, Bench({GEMV: 3.0, GEMM_SMALL: 5.0, GEMM_LARGE: 9.0}), DEFAULT)
    first.get(OTHER_KEY, CANDIDATES, Bench({GEMV: 9.0, GEMM_SMALL: 5.0, GEMM_LARGE: 1.0}), DEFAULT)

    second = Autotuner(gpu=GPU, triton_version=TRITON, cache_dir=cache_dir)
    assert second.user == {KEY: GEMV, OTHER_KEY: GEMM_LARGE}
    assert second.get(KEY, CANDIDATES, must_not_bench, DEFAULT) == GEMV
    assert second.get(OTHER_KEY, CANDIDATES, must_not_bench, DEFAULT) == GEMM_LARGE


def test_entries_written_before_the_batch_field_read_as_batch_1(cache_dir: Path) -> None:
    """TuneKey.batch (KV4 attention: B * Hkv problems per launch) defaults to 1, so a file
    without it (every shipped and user file written before it) keeps its W4A16 entries."""
    key = {k: v for k, v in asdict(KEY).items() if k != "batch"}
    path = cache_file(cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "format": CACHE_FORMAT, "gpu": GPU, "triton": TRITON,
        "entries": [{"key": key, "config": asdict(GEMV), "us": 1.0}],
    }))  # fmt: skip
    tuner = Autotuner(gpu=GPU, triton_version=TRITON, cache_dir=cache_dir)
    assert tuner.user == {KEY: GEMV} and KEY.batch == 1
    kv4_key = TuneKey("kv4_decode", 16, 128, 8192, 128, "float16", batch=8)
    tuner.get(kv4_key, [GEMM_SMALL], Bench({GEMM_SMALL: 2.0}), DEFAULT)
    assert Autotuner(gpu=GPU, triton_version=TRITON, cache_dir=cache_dir).user == {
        KEY: GEMV, kv4_key: GEMM_SMALL,
    }  # fmt: skip


def test_get_ties_keep_first_candidate(cache_dir: Path) -> None:
    tuner = Autotuner(gpu=GPU, triton_version=TRITON, cache_dir=cache_dir)
    bench = Bench({GEMV: 7.0, GEMM_SMALL: 7.0, GEMM_LARGE: 7.0})
    assert tuner.get(KEY, CANDIDATES, bench, DEFAULT) == GEMV


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "",
        '{"format": 1, "gpu": "test-gpu", "triton": "9.9"}',  # no entries
        '{"format": 1, "gpu": "test-gpu", "triton": "9.9", "entries": [{"key": {"n": 1}}]}',
        '{"format": 1, "gpu": "test-gpu", "triton": "9.9", "entries": ["oops"]}',
        '{"format": 99, "gpu": "test-gpu", "triton": "9.9", "entries": []}',
    ],
    ids=["syntax", "empty", "no-entries", "bad-key", "bad-entry", "format"],
)
def test_corrupt_cache_ignored_with_warning_and_rewritten(
    cache_dir: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = cache_file(cache_dir)
    path.parent.mkdir(parents=True)
    path.write_text(content)

    with caplog.at_level(logging.WARNING, logger="qcompile.autotune"):
        tuner = Autotuner(gpu=GPU, triton_version=TRITON, cache_dir=cache_dir)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].name == "qcompile.autotune"
    assert "ignoring tuning cache" in warnings[0].getMessage()
    assert str(path) in warnings[0].getMessage()
    assert tuner.user == {}

    bench = Bench({GEMV: 2.0, GEMM_SMALL: 1.0, GEMM_LARGE: 3.0})
    assert tuner.get(KEY, CANDIDATES, bench, DEFAULT) == GEMM_SMALL
    assert len(bench.calls) == 3
    data = json.loads(path.read_text())  # rewritten as a valid file
    assert data["entries"] == [{"key": asdict(KEY), "config": asdict(GEMM_SMALL), "us": 1.0}]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qcompile.autotune"):
        again = Autotuner(gpu=GPU, triton_version=TRITON, cache_dir=cache_dir)
    assert caplog.records == []
    assert again.user == {KEY: GEMM_SMALL}


@pytest.mark.parametrize("content", ["[]", "null", "3"])
def test_non_object_json_cache_ignored(cache_dir: Path, content: str) -> None:
    path = cache_file(cache_dir)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    tuner = Autotuner(gpu=GPU, triton_version=TRITON, cache_dir=cache_dir)
    assert tuner.user == {}


@pytest.mark.parametrize(
    ("gpu", "triton"),
    [(GPU, "1.0"), ("nvidia-a100", TRITON)],
    ids=["other-triton-version", "other-device"],  # no bare "gpu" id: it reads as the marker
)
def test_stale_cache_ignored_with_warning(
    cache_dir: Path, gpu: str, triton: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A file at this tuner's path whose contents say it was written for another setup.
    path = cache_file(cache_dir)
    write_cache(path, gpu, triton, {KEY: GEMM_LARGE})

    with caplog.at_level(logging.WARNING, logger="qcompile.autotune"):
        tuner = Autotuner(gpu=GPU, triton_version=TRITON, cache_dir=cache_dir)
    assert tuner.user == {}
    assert tuner.lookup(KEY) is None
    assert any("ignoring tuning cache" in r.getMessage() for r in caplog.records)

    bench = Bench({GEMV: 1.0, GEMM_SMALL: 2.0, GEMM_LARGE: 3.0})
    assert tuner.get(KEY, CANDIDATES, bench, DEFAULT) == GEMV
    assert len(bench.calls) == 3
    data = json.loads(path.read_text())
    assert (data["gpu"], data["triton"]) == (GPU, TRITON)


def test_files_of_other_setups_are_not_read(cache_dir: Path) -> None:
    write_cache(cache_file(cache_dir, triton="1.0"), GPU, "1.0", {KEY: GEMM_LARGE})
    write_cache(cache_file(cache_dir, gpu="other-gpu"), "other-gpu", TRITON, {KEY: GEMM_LARGE})
    tuner = Autotuner(gpu=GPU, triton_version=TRITON, cache_dir=cache_dir)
    assert tuner.lookup(KEY) is None
    bench = Bench({GEMV: 1.0, GEMM_SMALL: 2.0, GEMM_LARGE: 3.0})
    assert tuner.get(KEY, CANDIDATES, bench, DEFAULT) == GEMV
    assert len(bench.calls) == 3


# --- failures and disabled tuning ----------------------------------------------------------


def test_failing_candidates_are_skipped(cache_dir: Path) -> None:
    tuner = Autotuner(gpu=GPU, triton_version=TRITON, cache_dir=cache_dir)
    bench = Bench(
        {GEMV: RuntimeError("out of resources"), GEMM_SMALL: 8.0, GEMM_LARGE: ValueError("bad")}
    )
    assert tuner.get(KEY, CANDIDATES, bench, DEFAULT) == GEMM_SMALL
    assert bench.calls == list(CANDIDATES)
    assert tuner.timings[KEY] == 8.0


def test_all_candidates_failing_raises(cache_dir: Path) -> None:
    tuner = Autotuner(gpu=GPU, triton_version=TRITON, cache_dir=cache_dir)
    bench = Bench({cfg: RuntimeError("out of shared memory") for cfg in CANDIDATES})
    with pytest.raises(
        RuntimeError, match="every one of 3 candidate configs failed.*out of shared memory"
    ):
        tuner.get(KEY, CANDIDATES, bench, DEFAULT)
    assert len(bench.calls) == 3
    assert tuner.lookup(KEY) is None
    assert not tuner.path.exists()


def _disable_by_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "0")


def _disable_by_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


@pytest.mark.parametrize(
    "disable", [_disable_by_env, _disable_by_capture], ids=["QCOMPILE_AUTOTUNE=0", "capturing"]
)
def test_tuning_disabled_returns_default(
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    disable: Callable[[pytest.MonkeyPatch], None],
) -> None:
    disable(monkeypatch)
    tuner = Autotuner(gpu=GPU, triton_version=TRITON, cache_dir=cache_dir)
    assert tuner.get(KEY, CANDIDATES, must_not_bench, DEFAULT) == DEFAULT
    assert KEY not in tuner.user  # the default is never cached as if it were tuned
    assert not tuner.path.exists()
    # With tuning switched off the default is remembered in memory (no re-derivation per call);
    # during a capture it is not, so the next call outside the capture tunes.
    expected = DEFAULT if disable is _disable_by_env else None
    assert tuner.lookup(KEY) == expected


def test_invalid_cached_config_is_retuned_not_launched(cache_dir: Path, caplog) -> None:
    write_cache(cache_file(cache_dir), GPU, TRITON, {KEY: GEMM_LARGE})
    tuner = Autotuner(gpu=GPU, triton_version=TRITON, cache_dir=cache_dir)
    bench = Bench({GEMV: 2.0, GEMM_SMALL: 1.0, GEMM_LARGE: 5.0})
    with caplog.at_level(logging.WARNING, logger="qcompile.autotune"):
        got = tuner.get(KEY, CANDIDATES, bench, DEFAULT, valid=lambda cfg: cfg != GEMM_LARGE)
    assert got == GEMM_SMALL
    assert bench.calls, "re-tuned"
    assert "invalid" in caplog.text


def test_tuning_disabled_still_uses_cache(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cache(cache_file(cache_dir), GPU, TRITON, {KEY: GEMM_LARGE})
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "0")
    tuner = Autotuner(gpu=GPU, triton_version=TRITON, cache_dir=cache_dir)
    assert tuner.get(KEY, CANDIDATES, must_not_bench, DEFAULT) == GEMM_LARGE


# --- shipped configs -----------------------------------------------------------------------


def test_shipped_configs_used_across_triton_versions(cache_dir: Path) -> None:
    # h100.json serves every H100 variant; its Triton version does not have to match.
    write_cache(
        autotune.SHIPPED_DIR / "h100.json", "nvidia-h100-80gb-hbm3", "0.1", {KEY: GEMM_LARGE}
    )
    tuner = Autotuner(gpu="nvidia-h100-80gb-hbm3", triton_version=TRITON, cache_dir=cache_dir)
    assert tuner.shipped == {KEY: GEMM_LARGE}
    assert tuner.get(KEY, CANDIDATES, must_not_bench, DEFAULT) == GEMM_LARGE
    assert not tuner.path.exists()  # a shipped hit is not copied into the user cache


def test_h200_reads_its_own_file_then_the_h100_one(cache_dir: Path) -> None:
    # Same chip, faster memory: the H100's tuned configs serve the H200 where h200.json has none.
    write_cache(
        autotune.SHIPPED_DIR / "h100.json", "nvidia-h100-80gb-hbm3", "0.1",
        {KEY: GEMV, OTHER_KEY: GEMM_SMALL},
    )  # fmt: skip
    tuner = Autotuner(gpu="nvidia-h200", triton_version=TRITON, cache_dir=cache_dir)
    assert tuner.get(KEY, CANDIDATES, must_not_bench, DEFAULT) == GEMV
    write_cache(autotune.SHIPPED_DIR / "h200.json", "nvidia-h200", "0.1", {KEY: GEMM_LARGE})
    tuner = Autotuner(gpu="nvidia-h200", triton_version=TRITON, cache_dir=cache_dir)
    assert tuner.get(KEY, CANDIDATES, must_not_bench, DEFAULT) == GEMM_LARGE  # own file wins
    assert tuner.get(OTHER_KEY, CANDIDATES, must_not_bench, DEFAULT) == GEMM_SMALL
    # ...and an H100 never reads the H200's file
    tuner = Autotuner(gpu="nvidia-h100-80gb-hbm3", triton_version=TRITON, cache_dir=cache_dir)
    assert tuner.shipped == {KEY: GEMV, OTHER_KEY: GEMM_SMALL}


def test_user_cache_wins_over_shipped(cache_dir: Path) -> None:
    gpu = "nvidia-h100-pcie"
    write_cache(autotune.SHIPPED_DIR / "h100.json", "nvidia-h100-80gb-hbm3", "0.1", {KEY: GEMV})
    write_cache(cache_file(cache_dir, gpu=gpu), gpu, TRITON, {KEY: GEMM_SMALL})
    tuner = Autotuner(gpu=gpu, triton_version=TRITON, cache_dir=cache_dir)
    assert tuner.get(KEY, CANDIDATES, must_not_bench, DEFAULT) == GEMM_SMALL


def test_shipped_miss_tunes(cache_dir: Path) -> None:
    write_cache(autotune.SHIPPED_DIR / "h100.json", "nvidia-h100-80gb-hbm3", "0.1", {KEY: GEMV})
    tuner = Autotuner(gpu="nvidia-h100-80gb-hbm3", triton_version=TRITON, cache_dir=cache_dir)
    bench = Bench({GEMV: 4.0, GEMM_SMALL: 3.0, GEMM_LARGE: 2.0})
    assert tuner.get(OTHER_KEY, CANDIDATES, bench, DEFAULT) == GEMM_LARGE
    assert len(bench.calls) == 3


def test_bfloat16_kv4_key_takes_the_float16_shipped_config(cache_dir: Path) -> None:
    """A bfloat16 KV4 attention key without a shipped entry uses its float16 twin's instead of
    tuning; its own entry wins; other families (W4A16) still tune."""
    kv4 = TuneKey("kv4_decode", m_bucket=4, n=128, k=8192, group_size=128, dtype="float16",
                  batch=8)  # fmt: skip
    kv4_bf16, w4a16_bf16 = replace(kv4, dtype="bfloat16"), replace(KEY, dtype="bfloat16")

    def h100_tuner(shipped: dict[TuneKey, KernelConfig]) -> Autotuner:
        h100 = "nvidia-h100-80gb-hbm3"
        write_cache(autotune.SHIPPED_DIR / "h100.json", h100, "0.1", shipped)
        return Autotuner(gpu=h100, triton_version=TRITON, cache_dir=cache_dir)

    tuner = h100_tuner({kv4: GEMV, KEY: GEMM_SMALL})
    assert tuner.get(kv4_bf16, CANDIDATES, must_not_bench, DEFAULT) == GEMV
    bench = Bench({GEMV: 4.0, GEMM_SMALL: 3.0, GEMM_LARGE: 2.0})
    assert tuner.get(w4a16_bf16, CANDIDATES, bench, DEFAULT) == GEMM_LARGE
    assert len(bench.calls) == 3
    tuner = h100_tuner({kv4: GEMV, kv4_bf16: GEMM_LARGE})
    assert tuner.get(kv4_bf16, CANDIDATES, must_not_bench, DEFAULT) == GEMM_LARGE


def test_corrupt_shipped_file_ignored(cache_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    (autotune.SHIPPED_DIR / "h100.json").write_text("{truncated")
    with caplog.at_level(logging.WARNING, logger="qcompile.autotune"):
        tuner = Autotuner(gpu="nvidia-h100-80gb-hbm3", triton_version=TRITON, cache_dir=cache_dir)
    assert tuner.shipped == {}
    assert any("h100.json" in r.getMessage() for r in caplog.records)


# --- compiling the candidates on threads ---------------------------------------------------


def test_tune_threads_compile_every_candidate_then_time_them_in_order(
    cache_dir: Path, monkeypatch
) -> None:
    """`QCOMPILE_TUNE_THREADS`: each candidate's bench first runs on a pool thread in the warm
    phase (where `time_us` only runs its function); a candidate that fails there (a compile
    error) is reported and never timed; the rest are timed one by one, in order, on the
    calling thread, and the fastest wins."""
    monkeypatch.setenv("QCOMPILE_TUNE_THREADS", "3")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    warmed: list[tuple[KernelConfig, str]] = []
    timed: list[tuple[KernelConfig, str]] = []
    ran: list[KernelConfig] = []
    speeds = {GEMV: 30.0, GEMM_SMALL: 12.5, GEMM_LARGE: 20.0, DEFAULT: 1.0}

    def bench(cfg: KernelConfig) -> float:
        if autotune.warming():
            warmed.append((cfg, threading.current_thread().name))
            if cfg == DEFAULT:
                raise RuntimeError("out of resource: shared memory")
            return autotune.time_us(lambda: ran.append(cfg))  # runs once, times nothing
        timed.append((cfg, threading.current_thread().name))
        return speeds[cfg]

    tuner = Autotuner(gpu=GPU, triton_version=TRITON, cache_dir=cache_dir)
    best, best_us = tuner.tune(KEY, (*CANDIDATES, DEFAULT), bench)
    assert (best, best_us) == (GEMM_SMALL, 12.5)  # DEFAULT (1.0) failed to compile
    assert sorted(map(str, (c for c, _ in warmed))) == sorted(map(str, (*CANDIDATES, DEFAULT)))
    assert all(name.startswith("qcompile-tune") for _, name in warmed)
    assert sorted(map(str, ran)) == sorted(map(str, CANDIDATES))
    me = threading.current_thread().name
    assert timed == [(c, me) for c in CANDIDATES]
    assert [t for _, t in tuner.trials[KEY]] == [GEMM_SMALL, GEMM_LARGE, GEMV]


def test_tune_threads_fail_loudly_when_every_candidate_fails(cache_dir: Path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_TUNE_THREADS", "2")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bench = Bench({c: RuntimeError("no") for c in CANDIDATES})
    tuner = Autotuner(gpu=GPU, triton_version=TRITON, cache_dir=cache_dir)
    with pytest.raises(RuntimeError, match="every one of 3 candidate configs failed"):
        tuner.tune(KEY, CANDIDATES, bench)
    assert sorted(map(str, bench.calls)) == sorted(map(str, CANDIDATES))  # warm phase only


def test_tune_threads_setting(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("QCOMPILE_TUNE_THREADS", raising=False)
    assert autotune.tune_threads() == 1  # off until timed on a GPU
    monkeypatch.setenv("QCOMPILE_TUNE_THREADS", "16")
    assert autotune.tune_threads() == 16
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert autotune.tune_threads() == 1  # the interpreter runs one kernel at a time
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("QCOMPILE_TUNE_THREADS", "many")
    with pytest.raises(ValueError, match="QCOMPILE_TUNE_THREADS='many' is not an integer"):
        autotune.tune_threads()


@pytest.mark.parametrize("threads", ["1", "3"])
def test_tuning_shows_a_progress_bar_that_counts_every_config(
    cache_dir: Path, monkeypatch, capsys, threads
) -> None:
    """`QCOMPILE_TUNE_PROGRESS=1`: a bar named after the key on stderr, ending at every
    candidate timed (and, on threads, compiled; a failed compile counts as done twice)."""
    monkeypatch.setenv("QCOMPILE_TUNE_PROGRESS", "1")
    monkeypatch.setenv("QCOMPILE_TUNE_THREADS", threads)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bench = Bench({GEMV: 30.0, GEMM_SMALL: 12.5, GEMM_LARGE: RuntimeError("no")})
    bars = []
    real = autotune._progress
    monkeypatch.setattr(autotune, "_progress", lambda *a: bars.append(real(*a)) or bars[-1])
    Autotuner(gpu=GPU, triton_version=TRITON, cache_dir=cache_dir).tune(KEY, CANDIDATES, bench)
    assert "qcompile: tuning w4a16 M~16 N=4096 K=4096 float16" in capsys.readouterr().err
    total = 3 if threads == "1" else 6
    assert (bars[0].n, bars[0].total) == (total, total)
    monkeypatch.setenv("QCOMPILE_TUNE_PROGRESS", "0")
    Autotuner(gpu=GPU, triton_version=TRITON, cache_dir=cache_dir).tune(KEY, CANDIDATES, bench)
    assert "qcompile: tuning" not in capsys.readouterr().err


def test_tune_flush_setting(monkeypatch) -> None:
    """`QCOMPILE_TUNE_FLUSH`: "read" by default, "write" on request; anything else is refused
    before the timed function runs, with the two accepted values in the message."""
    monkeypatch.delenv("QCOMPILE_TUNE_FLUSH", raising=False)
    assert autotune._tune_flush() == "read"
    monkeypatch.setenv("QCOMPILE_TUNE_FLUSH", "write")
    assert autotune._tune_flush() == "write"
    monkeypatch.setenv("QCOMPILE_TUNE_FLUSH", "zero")
    ran = []
    with pytest.raises(ValueError, match="'read'.*'write'"):
        autotune.time_us(lambda: ran.append(1))
    assert ran == []


@pytest.mark.gpu
def test_read_flush_does_not_charge_the_timed_kernel_a_write_back(monkeypatch) -> None:
    """A kernel that reads 64 MB (more than the H100's L2) is timed faster after the read flush
    than after the write flush, which leaves L2 dirty for it to write back, and no faster than
    its bytes at 6 TB/s allow (the read flush does not leave its data cached; the H200
    reads 4.8 TB/s)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run `make test-gpu` on the H100)")
    src = torch.ones(16 * 1024 * 1024, dtype=torch.float32, device="cuda")
    out = torch.empty((), dtype=torch.float32, device="cuda")

    def read_64mb() -> None:
        torch.sum(src, dim=0, out=out)

    times = {}
    for flush in ("read", "write"):
        monkeypatch.setenv("QCOMPILE_TUNE_FLUSH", flush)
        times[flush] = min(autotune.time_us(read_64mb) for _ in range(3))
    assert times["read"] < times["write"], times
    assert times["read"] >= src.numel() * 4 / 6e12 * 1e6, times
