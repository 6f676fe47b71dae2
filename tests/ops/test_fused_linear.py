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


# Shapes with ragged output blocks and inputs that are not a power of two (70 in a padded row of 128), one weight row a
# program and several, and the most rows the kernel takes.
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rows,n,k,tile_elements", [(1, 40, 70, 128), (3, 17, 33, 512), (4, 9, 64, 256),
                                                    (2, 40, 70, 1024), (1, 24, 48, 64)])
def test_fused_rows_linear_matches_reference_fp32(case, rows, n, k, tile_elements):
    t = tensors(rows, n, k, torch.float32)
    extras = {name: t[name] for name in CASES[case]}
    got = fused_rows_linear(t["x"], t["weight"], **extras, tile_elements=tile_elements)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert rel_err(got, fused_linear_ref(t["x"], t["weight"], **extras)) < 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_fused_rows_linear_bf16_within_bf16_rounding(case):
    # Normed and rounded exactly as the reference; only the order of the float32 sums differs. Triton's interpreter
    # rounds float32 to bf16 toward zero (a GPU to the nearest), which biases SwiGLU's three roundings.
    t = tensors(2, 48, 96, torch.bfloat16, seed=3)
    extras = {name: t[name] for name in CASES[case]}
    got = fused_rows_linear(t["x"], t["weight"], **extras, tile_elements=512)
    assert rel_err(got, fused_linear_ref(t["x"], t["weight"], **extras)) < (1e-2 if DEVICE == "cuda" else 3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=gpu_only)])
def test_fused_rows_linear_norms_as_the_reference_rounds_them(dtype):
    """With the identity as the weight the output is the normed input itself, for the input norm and for the branch
    norms' average: in float32 the reference's value, and in bf16 (on a GPU: the interpreter truncates where a GPU
    rounds) the reference's roundings, so that at most an element in fifty, where the float32 sums' order tips a
    rounding, differs, and by one bf16 step."""
    t = tensors(3, 64, 64, dtype, seed=4)
    eye = torch.eye(64, dtype=dtype, device=DEVICE)
    for extras in ({"norm_weight": t["norm_weight"]},
                   {"norm_weight": t["norm_weight"], "x2": t["x2"], "norm2_weight": t["norm2_weight"]}):
        got = fused_rows_linear(t["x"], eye, **extras, tile_elements=512).float()
        want = fused_linear_ref(t["x"], eye, **extras).float()
        if dtype == torch.float32:
            assert rel_err(got, want) < 1e-6, list(extras)
        else:
            differs = got != want
            assert differs.float().mean() <= 0.02, list(extras)
            assert ((got - want).abs()[differs] <= want.abs()[differs] * 2 ** -7).all(), list(extras)


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
    many = tensors(5, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="at most 4 rows"):
        fused_rows_linear(many["x"], many["weight"])


@gpu_only
@pytest.mark.parametrize("case,n,k", [("norm", 8960, 1600), ("average", 1600, 3200), ("swiglu", 5504, 1600),
                                      ("residual", 1600, 5504)])
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_fused_rows_linear_at_hymba_shapes_gpu(case, n, k, rows):
    t = tensors(rows, n, k, torch.bfloat16, seed=rows)
    extras = {name: t[name] for name in CASES[case]}
    want = fused_linear_ref(t["x"], t["weight"], **extras)
    assert rel_err(fused_rows_linear(t["x"], t["weight"], **extras), want) < 1e-2
