"""Shared test set-up: where kernels run, tolerances, the gpu marker."""

from __future__ import annotations

import os

import pytest
import torch

# Kernels run natively on a GPU; without one, in Triton's interpreter on CPU tensors.
# TRITON_INTERPRET is read when `@triton.jit` decorates, so set it before qcompile imports.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    from interpreter_fixes import patch_bf16_dot

    patch_bf16_dot()

KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"

# Under pytest-xdist (`make test`: one worker per core) each worker takes its share of the
# cores for torch's own threads, so workers do not oversubscribe the host (timings in tests
# that time, e.g. decode after prefill, stay above the noise).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make test-gpu` on the H100)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_tuning_cache(tmp_path, monkeypatch):
    """Never read or write the user's real tuning cache from tests."""
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path / "qcompile-cache"))


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters reset around a test: graphs and recompile counts of one
    test never leak into the next (`pytestmark = pytest.mark.usefixtures("fresh_dynamo")`)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def cpu_tuner(monkeypatch):
    """The ops' CUDA entry points on CPU tensors in the interpreter: an H100's tuner (its
    shipped file), tuning off, so each shape runs its default config."""
    from qcompile.lowering import autotune

    monkeypatch.setattr(autotune, "gpu_name", lambda device=None: "nvidia-h100-80gb-hbm3")
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "0")
    autotune.autotuner.cache_clear()
    yield
    autotune.autotuner.cache_clear()
