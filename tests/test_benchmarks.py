"""The GPU scripts' inputs, checked on CPU: a layout slip there would time the wrong shape."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from qcompile.ops.w4a16 import check_w4a16_args

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from weights import random_packed  # noqa: E402


@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (8192, 28672), (1024, 4096)])
def test_random_packed_weights_fit_the_op(n, k):
    p = random_packed(n, k, 128, torch.float16, device="cpu")
    x = torch.empty(1, k, dtype=torch.float16)
    check_w4a16_args(x, p.qweight, p.scales, p.offsets, None, p.group_size)
    assert p.shape == (n, k)


def test_benchmark_scripts_import():
    import bench_w4a16  # noqa: F401
    import tune_shipped  # noqa: F401
