"""The fused decode-step SSM inputs (conv update, x_proj, dt/B/C norms, dt_proj in Triton kernels) against
`ssm_step_inputs_ref`, the same steps as plain PyTorch, and the whole fused step (those, the state update and the
gate in two kernels) against `ssm_step_ref`.

Without CUDA the kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set before the
kernels are defined). float32 must agree to rounding; bf16 within a few bf16 ulps (the kernels accumulate the conv
and x_proj in float32 and round where the reference does, but the reference's products are bf16 ops, and the
interpreter truncates float32 -> bf16 casts instead of rounding to nearest).
"""

import pytest
import torch
from conftest import rel_err
from triton_setup import DEVICE, gpu_only  # sets TRITON_INTERPRET without CUDA; skips without Triton

from hymba.ops.scan import ssm_step_inputs_ref
from hymba.ops.scan.triton_step import ssm_step_inputs_triton

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def make_inputs(batch, d_inner, dt_rank, d_state, width, dtype, *, norms=True, bias=True, keep=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    # x as one slice of a wider in_proj output, as the model passes it: rows are not contiguous.
    x = rand(batch, 3 * d_inner)[:, d_inner:2 * d_inner]
    inputs = dict(
        conv_state=rand(batch, d_inner, width - 1), x=x, conv_weight=rand(d_inner, width, scale=width ** -0.5),
        conv_bias=rand(d_inner) if bias else None, x_proj_weight=rand(dt_rank + 2 * d_state, d_inner,
                                                                         scale=d_inner ** -0.5),
        dt_proj_weight=rand(d_inner, dt_rank, scale=dt_rank ** -0.5),
        norm_weights=(rand(dt_rank), rand(d_state), rand(d_state)) if norms else None, eps=1e-5,
        keep=None)
    if keep:
        inputs["keep"] = torch.ones(batch, dtype=dtype, device=DEVICE)
        inputs["keep"][batch // 2] = 0
    return inputs


def run_both(inputs, **launch):
    """(kernel results, reference results), each (u, delta, B, C, conv_state after the step)."""
    results = []
    for fused in (True, False):
        args = dict(inputs, conv_state=inputs["conv_state"].clone())
        if fused:
            norms = args.pop("norm_weights") or (None, None, None)
            out = ssm_step_inputs_triton(args["conv_state"], args["x"], args["conv_weight"], args["conv_bias"],
                                         args["x_proj_weight"], args["dt_proj_weight"], *norms, args["eps"],
                                         args["keep"], **launch)
        else:
            out = ssm_step_inputs_ref(**args)
        results.append((*out, args["conv_state"]))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,d_inner,dt_rank,d_state,width", [
    (1, 48, 4, 16, 4),     # one row: 15 masked rows in the block
    (3, 80, 5, 6, 4),      # channels not a multiple of the block, odd ranks
    (19, 40, 12, 8, 3),    # rows across two blocks of 16
    (2, 32, 3, 4, 1),      # width 1: no conv state to shift
])
def test_fused_step_inputs_match_reference(dtype, batch, d_inner, dt_rank, d_state, width):
    inputs = make_inputs(batch, d_inner, dt_rank, d_state, width, dtype)
    fused, ref = run_both(inputs, block_d_in=16, block_d_out=32)
    for name, a, b in zip(("u", "delta", "B", "C", "conv_state"), fused, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert rel_err(a, b) < TOL[dtype], (name, rel_err(a, b))


@pytest.mark.parametrize("norms,bias,keep", [(False, True, False), (True, False, False), (True, True, True)])
def test_fused_step_inputs_options(norms, bias, keep):
    """Without the inner norms, without a conv bias, and with a padded row (zero input and output u)."""
    inputs = make_inputs(5, 40, 6, 8, 4, torch.float32, norms=norms, bias=bias, keep=keep)
    fused, ref = run_both(inputs, block_d_in=16, block_d_out=16)
    for name, a, b in zip(("u", "delta", "B", "C", "conv_state"), fused, ref):
        assert rel_err(a, b) < TOL[torch.float32], (name, rel_err(a, b))
    if keep:
        assert fused[0][2].abs().max() == 0  # row 2 (batch // 2) is padding: u = 0


def test_default_launch_parameters():
    """The default block sizes give the reference's results at one row and across row blocks."""
    for batch in (1, 40):
        inputs = make_inputs(batch, 300, 10, 16, 4, torch.float32)
        fused, ref = run_both(inputs)
        for name, a, b in zip(("u", "delta", "B", "C", "conv_state"), fused, ref):
            assert rel_err(a, b) < TOL[torch.float32], (batch, name, rel_err(a, b))


@gpu_only
@pytest.mark.parametrize("batch", [1, 32, 128])
def test_fused_step_inputs_at_hymba_size_compiled(batch):
    """Hymba-1.5B's sizes in bf16: the kernels against the reference, and the dispatcher inside
    `torch.compile(fullgraph=True)` (as the decode step runs it) gives the kernels' exact results."""
    inputs = make_inputs(batch, 3200, 100, 16, 4, torch.bfloat16)
    fused, ref = run_both(inputs)
    for name, a, b in zip(("u", "delta", "B", "C", "conv_state"), fused, ref):
        assert rel_err(a, b) < TOL[torch.bfloat16], (name, rel_err(a, b))

    from hymba.ops.scan import ssm_step_inputs

    state = inputs["conv_state"].clone()
    step = torch.compile(ssm_step_inputs, fullgraph=True)
    with torch.inference_mode():
        compiled = (*step(state, *(v for k, v in inputs.items() if k != "conv_state")), state)
    for name, a, b in zip(("u", "delta", "B", "C", "conv_state"), compiled, fused):
        assert torch.equal(a, b), name


def make_step(batch, d_inner, dt_rank, d_state, width, dtype, **options):
    """`make_inputs` plus what the state update takes: the SSM state, the gate z, dt_proj's bias, A_log and D."""
    inputs = make_inputs(batch, d_inner, dt_rank, d_state, width, dtype, **options)
    g = torch.Generator().manual_seed(1)
    A = torch.arange(1, d_state + 1, dtype=torch.float32).expand(d_inner, -1)
    return dict(inputs, ssm_state=torch.randn(batch, d_inner, d_state, generator=g).to(DEVICE),
                z=(torch.randn(batch, 2 * d_inner, generator=g).to(dtype).to(DEVICE))[:, d_inner:],
                dt_bias=(torch.randn(d_inner, generator=g) - 2).to(dtype).to(DEVICE),
                A_log=(torch.log(A) + 0.1 * torch.randn(d_inner, d_state, generator=g)).to(DEVICE),
                D=torch.randn(d_inner, generator=g).to(dtype).to(DEVICE))


def run_step_both(inputs, rows=False, **launch):
    """(kernel, reference), each (y, conv_state, ssm_state after the step); `rows`: the many-rows kernels."""
    from hymba.ops.scan import ssm_step_ref
    from hymba.ops.scan.triton_step import ssm_step_rows_triton, ssm_step_triton

    results = []
    for fused in (True, False):
        args = dict(inputs, conv_state=inputs["conv_state"].clone(), ssm_state=inputs["ssm_state"].clone())
        positional = [args[k] for k in ("conv_state", "ssm_state", "x", "z", "conv_weight", "conv_bias",
                                        "x_proj_weight", "dt_proj_weight", "dt_bias", "A_log", "D")]
        if fused:
            step = ssm_step_rows_triton if rows else ssm_step_triton
            y = step(*positional, *(args["norm_weights"] or (None, None, None)), args["eps"], args["keep"], **launch)
        else:
            y = ssm_step_ref(*positional, args["norm_weights"], args["eps"], args["keep"])
        results.append((y, args["conv_state"], args["ssm_state"]))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,d_inner,dt_rank,d_state,width", [
    (1, 48, 4, 16, 4),
    (3, 80, 5, 6, 4),      # channels not a multiple of either block, odd ranks
    (2, 32, 3, 4, 1),      # width 1: no conv state to shift
])
def test_fused_step_matches_reference(dtype, batch, d_inner, dt_rank, d_state, width):
    """The whole step in two kernels (`ssm_step_triton`) against the plain steps: y and both states."""
    fused, ref = run_step_both(make_step(batch, d_inner, dt_rank, d_state, width, dtype), block_d_in=16, block_c=32)
    for name, a, b in zip(("y", "conv_state", "ssm_state"), fused, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert rel_err(a, b) < TOL[dtype], (name, rel_err(a, b))


@pytest.mark.parametrize("norms,bias,keep", [(False, True, False), (True, False, False), (True, True, True)])
def test_fused_step_options(norms, bias, keep):
    """Without the inner norms, without a conv bias, and with a padded row; the default block sizes."""
    inputs = make_step(5, 300, 10, 16, 4, torch.float32, norms=norms, bias=bias, keep=keep)
    fused, ref = run_step_both(inputs)
    for name, a, b in zip(("y", "conv_state", "ssm_state"), fused, ref):
        assert rel_err(a, b) < TOL[torch.float32], (name, rel_err(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,d_inner,dt_rank,d_state,width,block_c", [
    (3, 80, 5, 6, 4, 16),     # channels not a multiple of the block, odd ranks, 13 masked rows
    (19, 40, 12, 8, 3, 32),   # rows across two tiles of 16
    (2, 32, 3, 4, 1, 16),     # width 1: no conv state to shift
])
def test_rows_step_matches_reference(dtype, batch, d_inner, dt_rank, d_state, width, block_c):
    """The many-rows step (`ssm_step_rows_triton`: dt_proj, the state update and the gate over a 16-row tile)."""
    fused, ref = run_step_both(make_step(batch, d_inner, dt_rank, d_state, width, dtype), rows=True, block_c=block_c)
    for name, a, b in zip(("y", "conv_state", "ssm_state"), fused, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert rel_err(a, b) < TOL[dtype], (name, rel_err(a, b))


@pytest.mark.parametrize("norms,bias,keep", [(False, True, False), (True, True, True)])
def test_rows_step_options(norms, bias, keep):
    fused, ref = run_step_both(make_step(6, 300, 10, 16, 4, torch.float32, norms=norms, bias=bias, keep=keep),
                               rows=True)
    for name, a, b in zip(("y", "conv_state", "ssm_state"), fused, ref):
        assert rel_err(a, b) < TOL[torch.float32], (name, rel_err(a, b))


@gpu_only
@pytest.mark.parametrize("batch", [1, 2, 4, 8, 32, 128])
def test_fused_step_at_hymba_size_compiled(batch):
    """Hymba-1.5B's sizes in bf16 against the reference, and the dispatcher under `torch.compile(fullgraph=True)`
    gives the kernels' exact results (the two-kernel step up to FUSED_STEP_MAX_ROWS rows, the many-rows one past)."""
    from hymba.ops.scan import FUSED_STEP_MAX_ROWS, ssm_step

    inputs = make_step(batch, 3200, 100, 16, 4, torch.bfloat16)
    fused, ref = run_step_both(inputs, rows=batch > FUSED_STEP_MAX_ROWS)
    for name, a, b in zip(("y", "conv_state", "ssm_state"), fused, ref):
        assert rel_err(a, b) < TOL[torch.bfloat16], (name, rel_err(a, b))

    conv, ssm = inputs["conv_state"].clone(), inputs["ssm_state"].clone()
    rest = {k: v for k, v in inputs.items() if k not in ("conv_state", "ssm_state")}
    step = torch.compile(ssm_step, fullgraph=True)
    with torch.inference_mode():
        y = step(conv, ssm, **rest)
    for name, a, b in zip(("y", "conv_state", "ssm_state"), (y, conv, ssm), fused):
        assert torch.equal(a, b), name
