"""The fused decode-rows projection kernel (`hymba.ops.linear.fused`) against `fused_linear_ref`.

Without CUDA the kernel runs on CPU tensors through Triton's interpreter; the realistic sizes run only on a GPU.
"""

import pytest
import torch
from conftest import rel_err
from triton_setup import DEVICE, gpu_only  # sets TRITON_INTERPRET without CUDA; skips without Triton

from hymba.ops import linear
from hymba.ops.linear import fused_linear, fused_linear_ref
from hymba.ops.linear.fused import fused_rows_linear


def tensors(rows, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)  # noqa: E731
    return dict(x=make(rows, k), x2=make(rows, k, scale=3.0), weight=make(n, k, scale=0.05),
                up_weight=make(n, k, scale=0.05), norm_weight=1 + make(k, scale=0.1),
                norm2_weight=1 + make(k, scale=0.1), bias=make(n), residual=make(rows, n))


# Which of the extras each case takes: the in_proj (input norm), out_proj (the branch norms' average and the residual),
# the MLP's gate/up (input norm and SwiGLU) and down_proj (the residual), and a biased projection.
CASES = {"norm": ("norm_weight",), "average": ("norm_weight", "x2", "norm2_weight", "residual"),
         "swiglu": ("norm_weight", "up_weight"), "residual": ("residual",), "bias": ("bias",)}


# Shapes with ragged output blocks and input steps; split-K with a ragged last slice (70 inputs in slices of 32), more
# splits asked for than fit (capped), and the most rows the kernel takes.
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rows,n,k,block_n,block_k,splits", [(1, 40, 70, 16, 32, 1), (3, 17, 33, 16, 16, 1),
                                                             (4, 9, 64, 32, 64, 1), (2, 40, 70, 16, 16, 3),
                                                             (1, 24, 48, 16, 16, 9), (16, 20, 40, 16, 16, 2)])
def test_fused_rows_linear_matches_reference_fp32(case, rows, n, k, block_n, block_k, splits):
    t = tensors(rows, n, k, torch.float32)
    extras = {name: t[name] for name in CASES[case]}
    got = fused_rows_linear(t["x"], t["weight"], **extras, block_n=block_n, block_k=block_k, splits=splits)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert rel_err(got, fused_linear_ref(t["x"], t["weight"], **extras)) < 1e-5


@pytest.mark.parametrize("case", ["norm", "average", "residual"])
def test_split_k_by_default_where_outputs_are_few(case):
    """40 outputs in blocks of 16 are 3 programs, far below the target: the inputs are split, with the default
    slices."""
    from hymba.ops.linear.fused import split_k

    assert split_k(40, 256, 16, 32) > 1
    t = tensors(2, 40, 256, torch.float32, seed=1)
    extras = {name: t[name] for name in CASES[case]}
    got = fused_rows_linear(t["x"], t["weight"], **extras, block_n=16, block_k=32)
    assert rel_err(got, fused_linear_ref(t["x"], t["weight"], **extras)) < 1e-5


@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_rows_linear_bf16_within_bf16_rounding(case, splits):
    # The norm's scale is applied after the products, not rounded where the reference rounds it; the rest is rounded
    # as the modules round it. Triton's interpreter rounds float32 to bf16 toward zero (a GPU to the nearest), which
    # biases SwiGLU's three roundings.
    t = tensors(2, 48, 96, torch.bfloat16, seed=3)
    extras = {name: t[name] for name in CASES[case]}
    got = fused_rows_linear(t["x"], t["weight"], **extras, block_n=16, block_k=32, splits=splits)
    assert rel_err(got, fused_linear_ref(t["x"], t["weight"], **extras)) < (1e-2 if DEVICE == "cuda" else 3e-2)


def test_fused_linear_takes_the_kernel_for_few_rows_only(monkeypatch):
    from hymba.ops.linear import fused

    calls = []
    monkeypatch.setattr(linear, "FUSED_MAX_ROWS", 4)
    monkeypatch.setattr(linear, "gpu_kernels_usable", lambda x: True)  # the interpreter takes CPU tensors
    monkeypatch.setattr(fused, "fused_rows_linear", lambda *args: calls.append(1) or fused_rows_linear(*args))
    t = tensors(1, 8, 16, torch.bfloat16)
    x = t["x"][:, None]  # (1, 1, k): one row
    got = fused_linear(x, t["weight"], t["norm_weight"], residual=t["residual"][:, None])
    assert calls and got.shape == (1, 1, 8)
    assert rel_err(got, fused_linear_ref(x, t["weight"], t["norm_weight"], residual=t["residual"][:, None])) < 3e-2
    calls.clear()
    many = tensors(5, 8, 16, torch.bfloat16)
    assert torch.equal(fused_linear(many["x"], many["weight"]), fused_linear_ref(many["x"], many["weight"]))
    assert not calls


def test_fused_rows_linear_refuses_what_it_cannot_read():
    t = tensors(1, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        fused_rows_linear(t["x"], t["weight"].t().contiguous().t())
    many = tensors(17, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="at most 16 rows"):
        fused_rows_linear(many["x"], many["weight"])


@gpu_only
@pytest.mark.parametrize("case,n,k", [("norm", 8960, 1600), ("average", 1600, 3200), ("swiglu", 5504, 1600),
                                      ("residual", 1600, 5504)])
@pytest.mark.parametrize("rows", [1, 2, 4, 16])
def test_fused_rows_linear_at_hymba_shapes_gpu(case, n, k, rows):
    t = tensors(rows, n, k, torch.bfloat16, seed=rows)
    extras = {name: t[name] for name in CASES[case]}
    want = fused_linear_ref(t["x"], t["weight"], **extras)
    assert rel_err(fused_rows_linear(t["x"], t["weight"], **extras), want) < 1e-2
