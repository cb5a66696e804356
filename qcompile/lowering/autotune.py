"""Kernel-config autotuning with a persistent, per-GPU JSON cache.

Lookup order for a `TuneKey`: this process's memory -> the user's cache file
(`$QCOMPILE_CACHE_DIR` or `~/.cache/qcompile`, one file per GPU name and Triton version)
-> the tuned configs shipped in `qcompile/lowering/configs/<family>.json` (then a sibling
family's: the H200 reads h100.json; a bfloat16 KV4 attention key without its own entry takes
the float16 key's) -> tune now (unless
`QCOMPILE_AUTOTUNE=0`, or a CUDA graph is being captured) -> the family's heuristic default.
A corrupt or stale cache file is ignored with a warning and rewritten on the next save.
`QCOMPILE_TUNE_THREADS=N` compiles the candidates on N threads before timing them one by one.
A tuning run shows a progress bar on a terminal (`QCOMPILE_TUNE_PROGRESS=0` hides it, `=1`
shows it anywhere).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from functools import cache
from pathlib import Path

import torch
from tqdm import tqdm

log = logging.getLogger("qcompile.autotune")

CACHE_FORMAT = 1
SHIPPED_DIR = Path(__file__).parent / "configs"


def m_bucket(m: int) -> int:
    """Next power of two of M (capped at 4096): batch sizes in one bucket share a config."""
    return min(1 << max(m - 1, 0).bit_length(), 4096)


@dataclass(frozen=True)
class TuneKey:
    """What a tuned config depends on: kernel family, M bucket, N, K, group size, dtype.

    batch: independent problems of this shape in one launch (bucketed). The linear layers are
    one GEMM (1); attention over a KV cache is B * Hkv GEMMs, M = Sq * (Hq / Hkv) query rows,
    N = head_dim, K = the cache length, and how far to split K depends on how many of them
    already fill the GPU. Files written before this field existed read as batch=1.
    """

    family: str
    m_bucket: int
    n: int
    k: int
    group_size: int
    dtype: str
    batch: int = 1


@dataclass(frozen=True)
class KernelConfig:
    """One launch choice: which kernel, its tile sizes, split-K factor and Triton knobs."""

    kernel: str
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    # Register double-buffering written into the kernel (GEMV, planes, mma): load tile i+1
    # before computing tile i. Triton's own num_stages pipelines only loads that feed a dot.
    # (Cache files may hold it as 0 / 1.)
    prefetch: bool = False
    # How split K is summed where a kernel offers a choice (the lane kernels): "" its own
    # policy; W4A8: "atomic", int32 atomics into one zeroed workspace; W4A16: "unroll4" /
    # "unroll8", the one-launch sum with that many partials' loads in flight.
    reduce: str = ""
    # KV4 one-group decode kernel: V's unpacked tile reaches the MMA through shared memory
    # instead of per-byte gathers (`_kv4_decode_kernel`'s STAGE_V).
    stage_v: bool = False
    # Registers per thread the compiler may use (Triton's `maxnreg`; 0: its own choice). A
    # cap trades a few instructions for more resident programs per SM. Only the KV4 one-group
    # kernel takes it (its `valid_config` rejects it elsewhere).
    max_registers: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> KernelConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def gpu_name(device: torch.device | int | None = None) -> str:
    """A file-name-safe slug of the GPU's name, e.g. `nvidia-h100-80gb-hbm3`."""
    name = torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def shipped_config_name(gpu: str) -> str:
    """Shipped configs are per GPU family: every H100 variant reads h100.json."""
    for family in ("h200", "h100", "a100", "l40s", "l40", "l4", "a10g", "4090"):
        if re.search(rf"(^|-){family}(-|$)", gpu):
            return family
    return gpu


# A family whose own file lacks a key reads its sibling's: the H200 is the H100's chip (sm_90,
# 132 SMs, same shared memory and registers) with faster HBM, so a config tuned on one is valid
# on the other and near its best (a split-K factor may differ; tuning the H200 file fixes that).
SHIPPED_SIBLINGS: dict[str, tuple[str, ...]] = {"h200": ("h100",)}


def shipped_config_files(gpu: str) -> list[Path]:
    """The shipped files this GPU reads, most specific first."""
    family = shipped_config_name(gpu)
    return [SHIPPED_DIR / f"{name}.json" for name in (family, *SHIPPED_SIBLINGS.get(family, ()))]


def _triton_version() -> str:
    import triton

    return triton.__version__


def _cache_dir() -> Path:
    root = os.environ.get("QCOMPILE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "qcompile"


def _read_entries(path: Path, gpu: str, triton_version: str | None) -> dict[TuneKey, KernelConfig]:
    """Entries of a cache file; {} (with a warning) if it is corrupt or for another setup."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        if data.get("format") != CACHE_FORMAT or data.get("gpu") != gpu:
            raise ValueError(f"written for gpu={data.get('gpu')!r} format={data.get('format')!r}")
        if triton_version is not None and data.get("triton") != triton_version:
            raise ValueError(f"written by triton {data.get('triton')}, running {triton_version}")
        return {TuneKey(**e["key"]): KernelConfig.from_dict(e["config"]) for e in data["entries"]}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("qcompile: ignoring tuning cache %s (%s); it will be rewritten", path, err)
        return {}


class Autotuner:
    """Process-wide tuning cache for one GPU (see module docstring for the lookup order)."""

    def __init__(self, gpu: str, triton_version: str, cache_dir: Path):
        self.gpu = gpu
        self.triton_version = triton_version
        self.path = cache_dir / f"autotune-{gpu}-triton{triton_version}.json"
        # Shipped configs stay valid across Triton versions (only speed may differ); the GPU's
        # own family file wins over a sibling's.
        self.shipped: dict[TuneKey, KernelConfig] = {}
        for shipped in reversed(shipped_config_files(gpu)):
            self.shipped.update(_read_entries(shipped, _shipped_gpu(shipped), None))
        self.user = _read_entries(self.path, gpu, triton_version)
        self.timings: dict[TuneKey, float] = {}
        self.untuned: dict[TuneKey, KernelConfig] = {}  # defaults used with tuning off
        # every timing of this process's tuning runs, fastest first (benchmarks report them)
        self.trials: dict[TuneKey, list[tuple[float, KernelConfig]]] = {}

    def lookup(self, key: TuneKey) -> KernelConfig | None:
        return (
            self.user.get(key)
            or self.shipped.get(key)
            or self.shipped.get(_shared_dtype_key(key))
            or self.untuned.get(key)
        )

    def get(
        self,
        key: TuneKey,
        candidates: Sequence[KernelConfig] | Callable[[], Sequence[KernelConfig]],
        bench: Callable[[KernelConfig], float],
        default: KernelConfig | Callable[[], KernelConfig],
        valid: Callable[[KernelConfig], bool] = lambda cfg: True,
    ) -> KernelConfig:
        """The config for `key`, tuning it now if no cache has it and tuning is allowed.

        `candidates` and `default` may be zero-argument callables, built only on a miss (a
        launcher's hot path is the cache hit). A cached config that `valid` rejects (a
        hand-edited or stale file) is dropped with a warning and tuned again, never launched."""
        found = self.lookup(key)
        if found is not None and valid(found):
            return found
        if found is not None:
            log.warning("qcompile: cached config %s is invalid for %s; re-tuning", found, key)
            for table in (self.user, self.shipped, self.untuned):
                table.pop(key, None)
        if callable(default):
            default = default()
        if os.environ.get("QCOMPILE_AUTOTUNE", "1") == "0":
            self.untuned[key] = default  # remembered: the next call skips this path
            return default
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return default  # not remembered: tune on the next call outside capture
        best, best_us = self.tune(key, candidates() if callable(candidates) else candidates, bench)
        self.user[key] = best
        self.timings[key] = best_us
        self.save()
        return best

    def tune(
        self,
        key: TuneKey,
        candidates: Sequence[KernelConfig],
        bench: Callable[[KernelConfig], float],
    ) -> tuple[KernelConfig, float]:
        """Time every candidate (microseconds, median) and return the fastest."""
        log.info(
            "qcompile: tuning %s over %d configs (first use of this shape)", key, len(candidates)
        )
        results = []
        errors: list[str] = []

        def failed(cfg: KernelConfig, err: Exception) -> None:
            log.debug("qcompile: config %s failed: %s", cfg, err)
            text = f"{type(err).__name__}: {err}"
            # a compile error's cause comes after the source excerpt: keep both ends
            text = text if len(text) <= 1600 else f"{text[:400]} [...] {text[-1200:]}"
            errors.append(f"{cfg}: {text}")

        threads = tune_threads()
        threaded = threads > 1 and len(candidates) > 1
        bar = _progress(key, len(candidates) * (2 if threaded else 1))
        if threaded:
            # compile (and run once) every candidate first, `threads` at a time: Triton's
            # compile releases the GIL (offline sm_90: 4 kernels in 5.6 s on one thread, 3.0 s
            # on two); the timing below then finds each kernel compiled
            device = torch.cuda.current_device() if torch.cuda.is_available() else None
            with ThreadPoolExecutor(threads, thread_name_prefix="qcompile-tune") as pool:
                warmed = [pool.submit(_warm, bench, cfg, device) for cfg in candidates]
                for done in warmed:
                    done.add_done_callback(lambda _: bar.update())
            compiled = []
            for cfg, done in zip(candidates, warmed, strict=True):
                if done.exception() is None:
                    compiled.append(cfg)
                else:
                    failed(cfg, done.exception())
            bar.update(len(warmed) - len(compiled))  # the failed ones: not timed
            candidates = compiled
        for cfg in candidates:
            try:
                results.append((bench(cfg), cfg))
            except Exception as err:  # a config the compiler rejects (e.g. out of shared memory)
                failed(cfg, err)
            bar.update()
        bar.close()
        if not results:
            raise RuntimeError(
                f"qcompile: every one of {len(errors)} candidate configs failed for {key}; "
                f"the first: {errors[0] if errors else 'no candidates'}"
            )
        results.sort(key=lambda r: r[0])
        self.trials[key] = results
        best_us, best = results[0]
        return best, best_us

    def save(self) -> None:
        """Write the user cache atomically (another process may be reading it)."""
        data = {
            "format": CACHE_FORMAT,
            "gpu": self.gpu,
            "triton": self.triton_version,
            "torch": torch.__version__,
            "entries": [
                {"key": asdict(k), "config": asdict(c), "us": self.timings.get(k)}
                for k, c in sorted(self.user.items(), key=lambda kv: str(asdict(kv[0])))
            ],
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, self.path)
        except OSError as err:
            log.warning("qcompile: could not write tuning cache %s: %s", self.path, err)


def _shared_dtype_key(key: TuneKey) -> TuneKey:
    """The float16 key whose shipped config a bfloat16 KV4 attention key takes when it has
    none of its own (else `key`). Those kernels read the same int4 cache with fp16 scales
    in the same loop; only the query and output dtype differ. Without it a bfloat16 model's
    first long-context decode tuned for ~170 s (H100, 32 layers, 8000 tokens:
    `benchmarks/results/session31/bench/`). A bfloat16 entry, shipped or the user's, wins."""
    if key.family.startswith("kv4_") and key.dtype == "bfloat16":
        return replace(key, dtype="float16")
    return key


def _shipped_gpu(path: Path) -> str:
    try:
        return json.loads(path.read_text()).get("gpu", "")
    except (OSError, ValueError):
        return ""


def _progress(key: TuneKey, total: int) -> tqdm:
    """The tuning run's progress bar: on a terminal, or as `QCOMPILE_TUNE_PROGRESS` says."""
    setting = os.environ.get("QCOMPILE_TUNE_PROGRESS", "auto")
    disable = {"0": True, "1": False}.get(setting)  # auto: None, tqdm's "not a terminal"
    shape = f"{key.family} M~{key.m_bucket} N={key.n} K={key.k} {key.dtype}"
    return tqdm(total=total, desc=f"qcompile: tuning {shape}", unit="config", leave=False,
                disable=disable)  # fmt: skip


def tune_threads() -> int:
    """Threads that compile tuning candidates (`QCOMPILE_TUNE_THREADS`, default 1: one after
    another as each is timed). Off by default until timed and tested on a GPU."""
    value = os.environ.get("QCOMPILE_TUNE_THREADS", "1")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 1  # the interpreter runs kernels in Python: one at a time
    try:
        return max(1, int(value))
    except ValueError:
        raise ValueError(
            f"QCOMPILE_TUNE_THREADS={value!r} is not an integer; set a thread count such as 8"
        ) from None


_warming = threading.local()


def warming() -> bool:
    """Inside `Autotuner.tune`'s parallel compile phase: `time_us` runs its function once and
    times nothing."""
    return getattr(_warming, "on", False)


def _warm(bench: Callable[[KernelConfig], float], cfg: KernelConfig, device: int | None) -> None:
    if device is not None:  # a new thread's current device is 0
        torch.cuda.set_device(device)
    _warming.on = True
    try:
        bench(cfg)
    finally:
        _warming.on = False


def time_us(fn: Callable[[], object], reps: int = 25) -> float:
    """Median microseconds of `fn` as a compiled model runs it: replayed from a CUDA graph (so
    split-K's second launch costs what it costs under `reduce-overhead`, not a Python launch
    gap), with L2 flushed before each replay (a decode step finds no weight in L2).

    The flush reads a 256 MiB buffer (`QCOMPILE_TUNE_FLUSH=read`, the default) rather than
    writing it: a write flush leaves L2 full of dirty lines that the timed kernel then writes
    back to HBM (up to 50 MB on the H100, ~17 us of bandwidth), which no decode step pays.
    With the write flush the tuner timed 8192x28672 fp16 M = 16 at 61.5 us for a pick that
    the benchmark's rotated-weight replays time at 56.0, and ranked the candidates
    differently (session 39). `QCOMPILE_TUNE_FLUSH=write` restores the old flush.

    `QCOMPILE_TUNE_TIMING=do_bench` (or a capture failure, logged) times with
    `triton.testing.do_bench` instead."""
    from triton.testing import do_bench

    write = _tune_flush() == "write"
    fn()  # compile, and surface a config the compiler rejects, outside capture
    if warming():
        return 0.0
    graph = None
    if os.environ.get("QCOMPILE_TUNE_TIMING", "graph") == "graph":
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()  # warm-up on a side stream, as torch.cuda.graph's docs ask
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
        except Exception as err:  # noqa: BLE001 - any capture failure falls back, logged
            log.warning("qcompile: CUDA-graph timing failed (%r); timing with do_bench", err)
            torch.cuda.synchronize()
            graph = None
    if graph is None:
        return 1000.0 * do_bench(fn, warmup=2, rep=10, return_mode="median")
    flush, sink = _flush_buffers(torch.cuda.current_device())
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(reps)
    ]
    graph.replay()
    for start, end in events:
        if write:
            flush.zero_()
        else:
            torch.amax(flush, dim=0, out=sink)
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    graph.reset()
    return 1000.0 * times[len(times) // 2]


def _tune_flush() -> str:
    """`QCOMPILE_TUNE_FLUSH`: how `time_us` empties L2 between replays, "read" or "write"."""
    value = os.environ.get("QCOMPILE_TUNE_FLUSH", "read")
    if value not in ("read", "write"):
        raise ValueError(
            f"QCOMPILE_TUNE_FLUSH={value!r}: use 'read' (the default: L2 left clean) or "
            "'write' (the flush before session 39: L2 left dirty)"
        )
    return value


@cache
def _flush_buffers(device_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """256 MiB on one GPU (5x the H100's L2) as [rows, 4096] fp32, and the read flush's
    [4096] output (its column maxima)."""
    device = f"cuda:{device_index}"
    return (
        torch.zeros(16384, 4096, dtype=torch.float32, device=device),
        torch.empty(4096, dtype=torch.float32, device=device),
    )


@cache
def autotuner(device_index: int = 0) -> Autotuner:
    """The process-wide tuner of one CUDA device."""
    return Autotuner(gpu_name(device_index), _triton_version(), _cache_dir())
