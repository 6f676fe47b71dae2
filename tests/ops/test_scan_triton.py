"""Triton selective scan and decode update against the sequential reference, forward and backward.

Without CUDA the kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, which must be set
before the kernels are defined, i.e. before importing hymba.ops.scan.triton). The interpreter is slow, so the
CPU shapes are small but odd (channel counts that are not multiples of the block, d_state 5, chunk boundaries
that split L unevenly); the realistic sizes run only on a GPU.
"""

import math

import pytest
import torch
from conftest import rel_err
from triton_setup import DEVICE, gpu_only  # sets TRITON_INTERPRET without CUDA; skips without Triton

# isort: split
import triton
import triton.language as tl

from hymba.ops.scan.reference import selective_scan_ref, selective_state_update_ref
from hymba.ops.scan.triton import _softplus, selective_scan_triton, selective_state_update_triton


def make_inputs(batch, d_inner, d_state, length, dtype=torch.float32, *, z=True, bias=True, h0=True, strided=False,
                seed=0):
    """Mamba-like inputs: A = -exp(.) (d_inner, d_state), dt bias from Mamba's init range, bf16 only where the
    model has it (u, delta, B, C, z; A, D, bias and the state stay float32)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=dtype):
        return torch.randn(*shape, generator=g).to(dtype)

    if strided:
        # u and delta as channel halves of one tensor, B and C as transposes of (batch, L, d_state): no unit strides.
        u, delta = randn(batch, 2 * d_inner, length).chunk(2, dim=1)
        B = randn(batch, length, d_state).transpose(1, 2)
        C = randn(batch, length, d_state).transpose(1, 2)
    else:
        u, delta, B, C = randn(batch, d_inner, length), randn(batch, d_inner, length), randn(batch, d_state, length), \
            randn(batch, d_state, length)
    delta = delta * 0.5
    A = -torch.exp(0.5 * randn(d_inner, d_state, dtype=torch.float32))
    D = randn(d_inner, dtype=torch.float32)
    dt_init = torch.exp(torch.rand(d_inner, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    delta_bias = (dt_init + torch.log(-torch.expm1(-dt_init))) if bias else None
    inputs = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=randn(batch, d_inner, length) if z else None,
                  delta_bias=delta_bias,
                  initial_state=randn(batch, d_inner, d_state, dtype=torch.float32) if h0 else None)
    return {k: None if v is None else v.to(DEVICE) for k, v in inputs.items()}


def scan_args(inputs, softplus=True):
    """Positional arguments of the scan functions from `make_inputs`' dict."""
    return (inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"], inputs["z"],
            inputs["delta_bias"], softplus, inputs["initial_state"])


def run_both(inputs, softplus=True, use_y=True, use_state=True, **kernel_kwargs):
    """Forward both implementations on leaf copies of `inputs`; backprop a random projection of (y, last_state)."""
    results = []
    gen = torch.Generator().manual_seed(1)
    for fn in (selective_scan_triton, selective_scan_ref):
        leaves = {k: None if v is None else v.detach().clone().requires_grad_(v.is_floating_point())
                  for k, v in inputs.items()}
        kwargs = kernel_kwargs if fn is selective_scan_triton else {}
        y, state = fn(*scan_args(leaves, softplus), **kwargs)
        gen.manual_seed(1)
        loss = 0
        if use_y:
            loss = loss + (y.float() * torch.randn(y.shape, generator=gen).to(y.device)).sum()
        if use_state:
            loss = loss + (state * torch.randn(state.shape, generator=gen).to(state.device)).sum()
        loss.backward()
        grads = {k: v.grad for k, v in leaves.items() if v is not None}
        results.append((y.detach(), state.detach(), grads))
    return results


def check(results, fwd_tol, bwd_tol):
    (y, state, grads), (y_ref, state_ref, grads_ref) = results
    assert y.dtype == y_ref.dtype and state.dtype == torch.float32 and state.shape == state_ref.shape
    assert rel_err(y, y_ref) < fwd_tol
    assert rel_err(state, state_ref) < fwd_tol
    for name, ref in grads_ref.items():
        if ref is None:  # the reference's graph does not reach it (e.g. z when only the state is used)
            assert grads[name] is None or not grads[name].any(), name
            continue
        assert grads[name].dtype == ref.dtype and grads[name].shape == ref.shape, name
        assert rel_err(grads[name], ref) < bwd_tol, name


# (batch, d_inner, d_state, length, chunk, block_d, block_l): chunks that split L unevenly, channel blocks with a
# ragged tail; block_l None is the walk over positions one at a time, a number the parallel forward and backward over
# blocks of that many positions (a single position, a last block cut short; small, as the interpreter is slow).
FP32_CASES = [
    (2, 37, 16, 1, 64, 32, None),
    (2, 37, 5, 7, 4, 32, None),
    (2, 100, 16, 63, 16, 128, None),
    (1, 37, 5, 300, 64, 64, None),
    (1, 20, 16, 1, 16, 16, 16),
    (2, 37, 5, 7, 4, 32, 4),
    (2, 20, 5, 37, 8, 16, 8),
]


@pytest.mark.parametrize("batch,d_inner,d_state,length,chunk,block_d,block_l", FP32_CASES)
def test_scan_fp32_matches_reference(batch, d_inner, d_state, length, chunk, block_d, block_l):
    results = run_both(make_inputs(batch, d_inner, d_state, length), chunk=chunk, block_d=block_d, block_l=block_l)
    check(results, fwd_tol=1e-5, bwd_tol=1e-5)


@pytest.mark.parametrize("z,bias,h0,softplus,use_y,use_state,strided", [
    (False, False, False, False, True, True, False),  # every optional input off, no softplus
    (True, True, True, True, False, True, False),  # gradient only through the final state
    (True, False, True, True, True, False, True),  # only through y; non-unit strides everywhere
])
@pytest.mark.parametrize("block_l", [None, 2])
def test_scan_variants(z, bias, h0, softplus, use_y, use_state, strided, block_l):
    inputs = make_inputs(2, 37, 5, 9, z=z, bias=bias, h0=h0, strided=strided)
    results = run_both(inputs, softplus=softplus, use_y=use_y, use_state=use_state, chunk=4, block_d=32,
                       block_l=block_l)
    check(results, fwd_tol=1e-5, bwd_tol=1e-5)


def test_scan_walk_forward_with_parallel_backward():
    # The forward saves a state per backward block (8 here, not the chunk of 64 asked for).
    results = run_both(make_inputs(2, 20, 5, 37), chunk=64, block_d=16, block_l=None, backward_block_l=8)
    check(results, fwd_tol=1e-5, bwd_tol=1e-5)


@pytest.mark.parametrize("z,use_y,length", [(True, True, 37), (False, True, 9), (True, False, 16)])
def test_scan_walk_backward_loading_ahead_matches_reference(monkeypatch, z, use_y, length):
    """The walk backward with each step's inputs loaded a step ahead (`BACKWARD_PREFETCH`): chunks cut short, no gate,
    no output gradient (only the final state's)."""
    from hymba.ops.scan import triton as scan_triton

    monkeypatch.setattr(scan_triton, "BACKWARD_PREFETCH", True)
    monkeypatch.setattr(scan_triton, "BACKWARD_WALK_WARPS", 1)
    results = run_both(make_inputs(2, 37, 5, length, z=z), use_y=use_y, chunk=8, block_d=32, block_l=None)
    check(results, fwd_tol=1e-5, bwd_tol=1e-5)


@pytest.mark.parametrize("forward,backward,length,chunk,block_l,z,use_y,use_state", [
    (1, 3, 37, 4, None, True, True, True),  # 10 chunks in segments of 4, 4 and 2, the last cut short
    (1, 2, 9, 4, None, False, True, False),  # no gate; only y's gradient
    (1, 4, 16, 4, None, True, False, True),  # no output gradient: the carries are the final state's alone
    (1, 3, 37, 8, 8, True, True, True),  # the parallel backward over segments of blocks
    (3, 1, 37, 4, None, True, True, True),  # the forward in segments, each from the state the earlier ones leave
    (4, 2, 37, 8, 8, True, True, True),  # both, the parallel kernels
])
def test_scan_in_segments_matches_reference(monkeypatch, forward, backward, length, chunk, block_l, z, use_y,
                                            use_state):
    """The walks split into segments of positions, one program each, each starting from the state the earlier
    segments leave it (`FORWARD_SEGMENTS`, `_scan_fwd_states_kernel`) or the carry the later ones pass it
    (`BACKWARD_SEGMENTS`, `_scan_bwd_carries_kernel`); the initial state enters the first."""
    from hymba.ops.scan import triton as scan_triton

    monkeypatch.setattr(scan_triton, "FORWARD_SEGMENTS", forward)
    monkeypatch.setattr(scan_triton, "BACKWARD_SEGMENTS", backward)
    results = run_both(make_inputs(2, 37, 5, length, z=z), use_y=use_y, use_state=use_state, chunk=chunk, block_d=32,
                       block_l=block_l)
    check(results, fwd_tol=1e-5, bwd_tol=1e-5)


@pytest.mark.parametrize("block_l", [None, 4])
def test_scan_forward_in_segments_without_grad(monkeypatch, block_l):
    from hymba.ops.scan import triton as scan_triton

    inputs = make_inputs(2, 37, 5, 30)
    with torch.no_grad():
        want = selective_scan_ref(*scan_args(inputs))
        monkeypatch.setattr(scan_triton, "FORWARD_SEGMENTS", 3)  # of 12, 12 and 6 positions
        got = selective_scan_triton(*scan_args(inputs), block_d=32, block_l=block_l)
    assert rel_err(got[0], want[0]) < 1e-5 and rel_err(got[1], want[1]) < 1e-5


def test_segments_fill_the_gpu():
    from hymba.ops.scan.triton import BACKWARD_EXTRA_COST, scan_segments

    def backward_segments(programs, n_chunks, slots):
        return scan_segments(programs, n_chunks, slots, BACKWARD_EXTRA_COST)

    # 800 programs where 1,584 fit: one round of 800 leaves half the slots idle; 7 segments run 5,600 programs in 4
    # rounds of a seventh of the length each (0.57 of the time, plus 0.19 for the carries' walk), within 5% of the
    # best up to 16 segments (13: 0.54 + 0.20).
    assert backward_segments(800, 34, 1584) == 7
    assert backward_segments(800, 34, 1056) == 1  # 800 of 1,056: no split pays for its carries
    assert backward_segments(1584, 34, 1584) == 1  # already full
    assert backward_segments(800, 1, 1584) == 1  # one chunk cannot be split
    assert backward_segments(100, 3, 1584) == 3  # no more segments than chunks


@triton.jit
def _softplus_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, _softplus(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)


def test_softplus_matches_torch_at_every_scale():
    """The kernels' softplus against float64 log1p(exp(x)): within 6e-6 relative from dt of 1e-13 (x = -30) to the
    identity past 20, as the series below exp(x) = 0.03 keeps small results' digits (log(1 + e) in float32 loses
    them: up to 5e-4 relative at x = -9)."""
    x = torch.linspace(-30, 30, 6001, dtype=torch.float32, device=DEVICE)
    y = torch.empty_like(x)
    _softplus_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    want = torch.nn.functional.softplus(x.double())
    assert ((y.double() - want).abs() / want).max() < 6e-6


def test_scan_bf16_matches_reference():
    results = run_both(make_inputs(2, 37, 16, 24, dtype=torch.bfloat16), chunk=8, block_d=64)
    check(results, fwd_tol=2e-2, bwd_tol=2e-2)


def test_scan_without_grad_matches_with_grad():
    inputs = make_inputs(2, 37, 5, 9)
    with torch.no_grad():
        y, state = selective_scan_triton(*scan_args(inputs), chunk=4)
    (y_grad, state_grad, _), _ = run_both(inputs, chunk=4)
    assert torch.equal(y, y_grad) and torch.equal(state, state_grad)


def test_scan_gradient_of_a_plain_sum():
    """y.sum() hands the backward a broadcast (stride 0) gradient, and no gradient for the final state."""
    inputs = make_inputs(2, 37, 5, 6)
    grads = []
    for fn in (selective_scan_triton, selective_scan_ref):
        leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inputs.items()}
        fn(*scan_args(leaves))[0].sum().backward()
        grads.append({k: v.grad for k, v in leaves.items() if v is not None})
    for name, ref in grads[1].items():
        assert rel_err(grads[0][name], ref) < 1e-5, name


def test_scan_nan_fails_the_comparison():
    inputs = make_inputs(1, 8, 4, 3)
    inputs["u"][0, 0, 1] = float("nan")
    y, _ = selective_scan_triton(*scan_args(inputs))
    assert rel_err(y, torch.zeros_like(y)) == float("inf")  # fails any `< tolerance` check


@pytest.mark.parametrize("d_inner,d_state,dtype,z,bias,softplus", [
    (37, 5, torch.float32, True, True, True),
    (100, 16, torch.float32, False, False, False),
    (37, 16, torch.bfloat16, True, True, True),
])
def test_state_update_matches_reference(d_inner, d_state, dtype, z, bias, softplus):
    batch, steps = 2, 4
    inputs = make_inputs(batch, d_inner, d_state, steps, dtype, z=z, bias=bias)
    state = inputs["initial_state"].clone()
    state_ref = inputs["initial_state"].clone()
    for t in range(steps):
        step = [inputs[k][..., t] for k in ("u", "delta")]
        step_z = inputs["z"][..., t] if z else None
        args = (inputs["A"], inputs["B"][..., t], inputs["C"][..., t], inputs["D"], step_z, inputs["delta_bias"],
                softplus)
        y = selective_state_update_triton(state, *step, *args)
        y_ref = selective_state_update_ref(state_ref, *step, *args)
        assert y.dtype == y_ref.dtype == dtype and state.dtype == torch.float32
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert rel_err(y, y_ref) < tol
        assert rel_err(state, state_ref) < 1e-5
    # Stepping is the scan: the final state and the outputs agree with one scan over the same inputs.
    y_scan, last = selective_scan_ref(*scan_args(inputs, softplus))
    assert rel_err(state, last) < 1e-5
    assert rel_err(y, y_scan[..., -1]) < tol


def test_state_update_from_A_log():
    """Given A_log (`A_is_log`), the kernel and the reference take A = -exp(A_log) themselves: same step as with A."""
    inputs = make_inputs(3, 37, 16, 1, torch.float32)
    A_log = torch.log(-inputs["A"])
    step = [inputs[k][..., 0] for k in ("u", "delta")]
    rest = (inputs["B"][..., 0], inputs["C"][..., 0], inputs["D"], inputs["z"][..., 0], inputs["delta_bias"])
    states = [inputs["initial_state"].clone() for _ in range(3)]
    y_ref = selective_state_update_ref(states[0], *step, inputs["A"], *rest)
    y_ref_log = selective_state_update_ref(states[1], *step, A_log, *rest, A_is_log=True)
    y = selective_state_update_triton(states[2], *step, A_log, *rest, A_is_log=True)
    assert rel_err(y_ref_log, y_ref) < 1e-6 and rel_err(y, y_ref) < 1e-5
    assert rel_err(states[2], states[0]) < 1e-5


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("block_l", [None, 16])
def test_scan_realistic_size_gpu(dtype, tol, block_l):
    results = run_both(make_inputs(4, 3200, 16, 2048, dtype), block_l=block_l)
    check(results, fwd_tol=tol, bwd_tol=tol)


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("forward,backward,registers", [(4, 5, 168), (None, None, 168), (16, 1, None)])
def test_scan_in_segments_realistic_size_gpu(monkeypatch, forward, backward, registers):
    """The segmented walks as they compile for the GPU (inline PTX, the register cap), against the reference."""
    from hymba.ops.scan import triton as scan_triton

    monkeypatch.setattr(scan_triton, "FORWARD_SEGMENTS", forward)
    monkeypatch.setattr(scan_triton, "BACKWARD_SEGMENTS", backward)
    monkeypatch.setattr(scan_triton, "BACKWARD_MAX_REGISTERS", registers)
    results = run_both(make_inputs(4, 3200, 16, 2048))
    check(results, fwd_tol=1e-4, bwd_tol=1e-4)


@gpu_only
@pytest.mark.gpu
def test_state_update_realistic_size_gpu():
    inputs = make_inputs(4, 3200, 16, 1, torch.bfloat16)
    state, state_ref = inputs["initial_state"].clone(), inputs["initial_state"].clone()
    step = [inputs[k][..., 0] for k in ("u", "delta")] + [inputs["A"], inputs["B"][..., 0], inputs["C"][..., 0],
                                                          inputs["D"], inputs["z"][..., 0], inputs["delta_bias"]]
    y = selective_state_update_triton(state, *step)
    y_ref = selective_state_update_ref(state_ref, *step)
    assert rel_err(y, y_ref) < 2e-2
    assert rel_err(state, state_ref) < 1e-5
