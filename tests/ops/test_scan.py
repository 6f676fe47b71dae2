"""Selective scan: the parallel (chunked) scan and the decode step against the sequential reference.

Shapes are awkward on purpose (d_inner 37, d_state 5, lengths 1, 7, 63 and 300 > one 128-step chunk).
float32 tolerance: both paths keep the state in float32 but sum in different orders, so they agree to a few
float32 ulps of the result's norm (1e-5 relative).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import rel_err

from hymba.ops.scan import (
    selective_scan,
    selective_scan_chunked,
    selective_scan_cpu,
    selective_scan_ref,
    selective_state_update,
    selective_state_update_ref,
    ssm_projections,
)

BATCH, D_INNER, D_STATE = 2, 37, 5


def scan_inputs(length: int, dtype: torch.dtype = torch.float32, optional: bool = True) -> dict:
    """Random inputs in mamba_ssm's layout; A, D, delta_bias and the state stay float32 as in the model."""
    g = torch.Generator().manual_seed(length)
    r = lambda *shape, scale=1.0: (scale * torch.randn(*shape, generator=g))  # noqa: E731
    inputs = dict(
        u=r(BATCH, D_INNER, length).to(dtype),
        delta=r(BATCH, D_INNER, length, scale=0.5).to(dtype),
        A=-torch.exp(r(D_INNER, D_STATE, scale=0.5)),
        B=r(BATCH, D_STATE, length).to(dtype),
        C=r(BATCH, D_STATE, length).to(dtype),
        D=r(D_INNER),
    )
    if optional:
        inputs.update(z=r(BATCH, D_INNER, length).to(dtype), delta_bias=r(D_INNER, scale=0.5),
                      initial_state=r(BATCH, D_INNER, D_STATE))
    return inputs


def run(fn, inputs: dict, grad: bool = False):
    """(y, last_state) and, with grad, the gradients of a fixed random projection of both w.r.t. every input."""
    leaves = {k: v.clone().requires_grad_(grad) for k, v in inputs.items()}
    y, last = fn(**leaves)
    if not grad:
        return y, last, {}
    g = torch.Generator().manual_seed(1)
    loss = (y.float() * torch.randn(y.shape, generator=g)).sum() + (last * torch.randn(last.shape, generator=g)).sum()
    loss.backward()
    return y, last, {k: v.grad for k, v in leaves.items()}


def test_reference_is_the_recurrence():
    """The reference against HYMBA.md's formulas written out per scalar in float64 (the other tests trust it)."""
    inputs = scan_inputs(6)
    y, last = selective_scan_ref(**inputs)
    x = {k: v.double().tolist() for k, v in inputs.items()}
    for b in range(BATCH):
        for d in range(D_INNER):
            h = list(x["initial_state"][b][d])
            for t in range(6):
                dt = math.log1p(math.exp(x["delta"][b][d][t] + x["delta_bias"][d]))  # softplus
                u = x["u"][b][d][t]
                h = [math.exp(dt * x["A"][d][n]) * h[n] + dt * x["B"][b][n][t] * u for n in range(D_STATE)]
                out = sum(x["C"][b][n][t] * h[n] for n in range(D_STATE)) + x["D"][d] * u
                z = x["z"][b][d][t]
                out *= z / (1 + math.exp(-z))  # silu gate
                assert abs(y[b, d, t].item() - out) <= 1e-5 * (1 + abs(out))
            assert max(abs(last[b, d, n].item() - h[n]) for n in range(D_STATE)) <= 1e-5 * (1 + max(map(abs, h)))


@pytest.mark.parametrize("scan", [selective_scan_chunked, selective_scan_cpu], ids=["chunked", "cpu"])
@pytest.mark.parametrize("optional", [True, False], ids=["z,bias,state", "bare"])
@pytest.mark.parametrize("length", [1, 7, 63, 300])
def test_fast_scans_equal_reference_forward_and_backward(length, optional, scan):
    inputs = scan_inputs(length, optional=optional)
    y_ref, last_ref, grads_ref = run(selective_scan_ref, inputs, grad=True)
    y, last, grads = run(scan, inputs, grad=True)
    assert y.dtype == torch.float32 and last.dtype == torch.float32
    assert y.shape == (BATCH, D_INNER, length) and last.shape == (BATCH, D_INNER, D_STATE)
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(last, last_ref) < 1e-5
    assert set(grads) == set(inputs)
    for name, grad in grads.items():
        assert grad is not None and grad.shape == inputs[name].shape, name
        assert rel_err(grad, grads_ref[name]) < 1e-5, name


@pytest.mark.parametrize("length", [7, 300])
def test_bf16_inputs(length):
    """bf16 u, delta, B, C, z: both paths compute in float32 and round y to bf16, so they agree to about one bf16
    rounding (2**-8 = 4e-3) of y; the float32 state agrees as in float32."""
    inputs = scan_inputs(length, torch.bfloat16)
    y_ref, last_ref, _ = run(selective_scan_ref, inputs)
    y, last, grads = run(selective_scan_chunked, inputs, grad=True)
    assert y.dtype == torch.bfloat16 and last.dtype == torch.float32
    assert rel_err(y, y_ref) < 4e-3
    assert rel_err(last, last_ref) < 1e-5
    assert all(torch.isfinite(g).all() and g.dtype == inputs[k].dtype for k, g in grads.items())


def test_huge_decay_does_not_overflow():
    """dt*A of -1000 underflows exp to 0: the state forgets, nothing overflows (a log-space scan would)."""
    inputs = scan_inputs(300)
    inputs["delta"] = inputs["delta"].abs() * 100
    inputs["A"] = inputs["A"] * 10
    y_ref, last_ref, _ = run(selective_scan_ref, inputs)
    y, last, grads = run(selective_scan_chunked, inputs, grad=True)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(last, last_ref) < 1e-5
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("update", [selective_state_update_ref, selective_state_update], ids=["ref", "dispatch"])
def test_state_update_stepped_equals_the_scan(update):
    length = 12
    inputs = scan_inputs(length)
    y_scan, last_scan = selective_scan_ref(**inputs)
    state = inputs["initial_state"].clone()
    ys = [update(state, inputs["u"][..., t], inputs["delta"][..., t], inputs["A"], inputs["B"][..., t],
                 inputs["C"][..., t], inputs["D"], inputs["z"][..., t], inputs["delta_bias"])
          for t in range(length)]
    torch.testing.assert_close(torch.stack(ys, dim=-1), y_scan, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state, last_scan, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("length", [5, 63])  # the dispatcher loops below 9 positions and scans in parallel above
def test_dispatcher_on_cpu(length):
    inputs = scan_inputs(length)
    y_ref, last_ref = selective_scan_ref(**inputs)
    y, last = selective_scan(**inputs)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(last, last_ref) < 1e-5


def test_initial_state_chains_two_halves():
    """Scanning the second half from the first half's last state equals scanning the whole."""
    inputs = scan_inputs(63)
    whole, last = selective_scan_chunked(**inputs)
    first = {k: v[..., :30] if v.dim() == 3 and k != "initial_state" else v for k, v in inputs.items()}
    second = {k: v[..., 30:] if v.dim() == 3 and k != "initial_state" else v for k, v in inputs.items()}
    y1, h1 = selective_scan_chunked(**first)
    y2, h2 = selective_scan_chunked(**{**second, "initial_state": h1})
    assert rel_err(torch.cat([y1, y2], dim=-1), whole) < 1e-5 and rel_err(h2, last) < 1e-5


def test_triton_scan_chooses_the_parallel_kernels_only_where_the_walk_leaves_the_gpu_idle(monkeypatch):
    from hymba.ops import scan

    assert scan.triton_scan_blocks(1, 3200) == (8, 16)  # Hymba-1.5B at batch 1: the walk has 100 programs
    assert scan.triton_scan_blocks(8, 3200) == (None, None)  # 800 programs: the walk
    monkeypatch.setattr(scan, "TRITON_BLOCK_L", 1)
    assert scan.triton_scan_blocks(1, 3200) == (None, None)
    monkeypatch.setattr(scan, "TRITON_BLOCK_L", 32)
    assert scan.triton_scan_blocks(8, 3200) == (8, 32)


@pytest.mark.parametrize("norms", [True, False])
def test_ssm_projections_padded_for_cublas_equal_unpadded(norms):
    """Padding x_proj's outputs and dt_proj's inputs to a multiple of 8 (what CUDA runs) changes no value or gradient.
    Hymba-1.5B's odd sizes in miniature: dt_rank 9, d_state 3 (x_proj's 15 outputs -> 16, dt_proj's 9 inputs -> 16)."""
    g = torch.Generator().manual_seed(0)
    dt_rank, d_state, d_inner = 9, 3, 37
    leaves = dict(u=torch.randn(2, 7, d_inner, generator=g),
                  x_proj=torch.randn(dt_rank + 2 * d_state, d_inner, generator=g),
                  dt_proj=torch.randn(d_inner, dt_rank, generator=g),
                  norms=[1 + 0.1 * torch.randn(n, generator=g) for n in (dt_rank, d_state, d_state)])
    results = []
    for align in (1, 8):
        copies = {k: [t.clone().requires_grad_() for t in v] if k == "norms" else v.clone().requires_grad_()
                  for k, v in leaves.items()}
        outs = ssm_projections(copies["u"], copies["x_proj"], copies["dt_proj"], copies["norms"] if norms else None,
                               align=align)
        assert [tuple(t.shape) for t in outs] == [(2, 7, d_inner), (2, 7, d_state), (2, 7, d_state)]
        sum(((t * torch.randn(t.shape, generator=torch.Generator().manual_seed(i))).sum()
             for i, t in enumerate(outs))).backward()
        grads = [copies["u"].grad, copies["x_proj"].grad, copies["dt_proj"].grad]
        grads += [t.grad for t in copies["norms"]] if norms else []
        results.append((outs, grads))
    (outs, grads), (outs_padded, grads_padded) = results
    for got, want in zip([*outs_padded, *grads_padded], [*outs, *grads], strict=True):
        assert got.shape == want.shape
        assert rel_err(got, want) < 1e-6
