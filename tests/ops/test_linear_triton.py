"""The small-rows linear kernel against F.linear, and `project` choosing it only where it applies.

Without CUDA the kernel runs on CPU tensors through Triton's interpreter; the realistic sizes run only on a GPU.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from torch import nn
from triton_setup import DEVICE, gpu_only  # sets TRITON_INTERPRET without CUDA; skips without Triton

from hymba.ops import linear
from hymba.ops.linear.triton import small_rows_linear, split_k


def inputs(rows, n, k, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype).to(DEVICE)
    b = (torch.randn(n, generator=g)).to(dtype).to(DEVICE) if bias else None
    return x, w, b


# (rows, out, in, splits, block_n, block_k): ragged output and input blocks, a slice cut short, split-K with and
# without a bias, 150 rows (two programs of rows).
@pytest.mark.parametrize("rows,n,k,splits,block_n,block_k,bias", [
    (1, 40, 70, 1, 16, 32, True), (3, 100, 33, 2, 32, 16, True), (16, 17, 200, 3, 16, 32, False),
    (40, 24, 100, 4, 16, 16, True), (150, 20, 24, 1, 16, 16, False),
])
def test_small_rows_linear_matches_f_linear_fp32(rows, n, k, splits, block_n, block_k, bias):
    x, w, b = inputs(rows, n, k, bias=bias)
    got = small_rows_linear(x, w, b, splits=splits, block_n=block_n, block_k=block_k)
    assert got.shape == (rows, n) and got.dtype == x.dtype
    assert rel_err(got, F.linear(x, w, b)) < 1e-5


def test_small_rows_linear_bf16_and_its_default_split():
    x, w, b = inputs(4, 48, 1024, torch.bfloat16)
    assert split_k(48, 1024, 16, 32) == 8  # 3 output blocks: as many slices as 4 steps of 32 allow
    got = small_rows_linear(x, w, b, block_n=16, block_k=32)
    assert got.dtype == torch.bfloat16 and rel_err(got, F.linear(x, w, b)) < 1e-2


def test_small_rows_linear_refuses_what_it_cannot_read():
    x, w, _ = inputs(2, 8, 16)
    with pytest.raises(ValueError, match="contiguous"):
        small_rows_linear(x, w.t().contiguous().t())


def test_project_takes_the_kernel_only_where_it_applies(monkeypatch):
    """A plain bf16 nn.Linear at few rows without gradients goes through the kernel; wrapped layers, more rows, float32
    or gradients wanted go through the module itself (on a CPU without the interpreter: always the module)."""
    from hymba.ops.linear import triton as kernel

    calls = []
    monkeypatch.setattr(kernel, "small_rows_linear", lambda *a: calls.append(1) or small_rows_linear(*a))
    monkeypatch.setattr(linear, "gpu_kernels_usable", lambda x: True)  # the interpreter takes CPU tensors
    monkeypatch.setattr(linear, "SMALL_ROWS_MAX", 4)
    layer = nn.Linear(24, 40).to(DEVICE, torch.bfloat16)
    x = torch.randn(2, 2, 24, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        assert rel_err(linear.project(layer, x), layer(x)) < 1e-2 and calls == [1]
        linear.project(layer, torch.randn(5, 24, device=DEVICE, dtype=torch.bfloat16))  # past SMALL_ROWS_MAX
        linear.project(nn.Sequential(layer), x)  # not a plain nn.Linear
        linear.project(layer.float(), x.float())  # float32: the tiles are sized for 2-byte weights
    linear.project(layer, x.float())  # gradients wanted for the weight
    assert calls == [1]


@gpu_only
@pytest.mark.parametrize("rows", [1, 8, 32, 128])
@pytest.mark.parametrize("n,k", [(8000, 1600), (1600, 3200), (1600, 5504), (32001, 1600)])  # the 1.5B's projections
def test_small_rows_linear_realistic_size_gpu(rows, n, k):
    x, w, _ = inputs(rows, n, k, torch.bfloat16)
    want = F.linear(x, w)
    assert rel_err(small_rows_linear(x, w), want) < 1e-2
    compiled = torch.compile(lambda a: small_rows_linear(a, w), fullgraph=True)
    assert torch.equal(compiled(x), small_rows_linear(x, w))
