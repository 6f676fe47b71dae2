"""Triton causal conv1d (sequence and one-step update) against the PyTorch reference, forward and backward.

Without CUDA the kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set before the
kernels are defined). bf16 tolerances are loose: the reference rounds the conv to bf16 before SiLU, the kernel
applies SiLU in float32 (and the interpreter truncates float32 -> bf16 casts instead of rounding to nearest).
bf16 results are compared with the reference's math in float32 on the same bf16 values (`reference_fp32`).
"""

import pytest
import torch
from conftest import rel_err
from triton_setup import DEVICE, gpu_only  # sets TRITON_INTERPRET without CUDA; skips without Triton

from hymba.ops.conv import triton as conv_triton
from hymba.ops.conv.reference import causal_conv1d_ref, causal_conv1d_update_ref
from hymba.ops.conv.triton import causal_conv1d_triton, causal_conv1d_update_triton

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make_inputs(batch, dim, length, width, dtype, *, bias=True, init=True, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if strided:  # x as one half of a wider projection, transposed from (batch, L, 2*dim): no unit stride in L
        x = torch.randn(batch, length, 2 * dim, generator=g).to(dtype).transpose(1, 2)[:, :dim]
    else:
        x = torch.randn(batch, dim, length, generator=g).to(dtype)
    weight = torch.randn(dim, width, generator=g) / width**0.5
    inputs = dict(x=x, weight=weight, bias=torch.randn(dim, generator=g) if bias else None,
                  initial_state=torch.randn(batch, dim, width - 1, generator=g).to(dtype) if init else None)
    return {k: None if v is None else v.to(DEVICE) for k, v in inputs.items()}


def reference_fp32(x, weight, bias, initial_state, activation):
    """The reference on float32 copies of the inputs, rounded to x's dtype first as the reference itself does.

    For float32 this is the reference exactly. For bf16 it is the reference's math without its bf16
    intermediates, and it sidesteps PyTorch's CPU bf16 conv1d, which takes seconds even at these sizes."""
    def up(t):
        return None if t is None else t.to(x.dtype).float()

    out, final = causal_conv1d_ref(up(x), up(weight), up(bias), up(initial_state), activation)
    return out.to(x.dtype), final.to(x.dtype)


@pytest.fixture(params=[False, True], ids=["autograd backward", "triton backward"])
def backward_kernel(request, monkeypatch):
    """Runs a test with the conv's backward through the reference's autograd and through `_conv_bwd_kernel`."""
    monkeypatch.setattr(conv_triton, "TRITON_BACKWARD", request.param)


def run_both(inputs, activation, use_out=True, use_final=True):
    """Kernel and reference on leaf copies; backprop a random projection of (out, final_state)."""
    results = []
    for fn in (causal_conv1d_triton, reference_fp32):
        leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inputs.items()}
        out, final = fn(leaves["x"], leaves["weight"], leaves["bias"], leaves["initial_state"], activation)
        gen = torch.Generator().manual_seed(1)
        loss = 0
        if use_out:
            loss = loss + (out.float() * torch.randn(out.shape, generator=gen).to(out.device)).sum()
        if use_final:
            loss = loss + (final.float() * torch.randn(final.shape, generator=gen).to(final.device)).sum()
        loss.backward()
        results.append((out.detach(), final.detach(), {k: v.grad for k, v in leaves.items() if v is not None}))
    return results


def test_reference_fp32_is_the_reference_for_bf16():
    """The bf16 comparisons use `reference_fp32`; once, check it against the literal bf16 reference."""
    inputs = make_inputs(1, 8, 6, 4, torch.bfloat16)
    out, final = reference_fp32(*inputs.values(), "silu")
    out_ref, final_ref = causal_conv1d_ref(*inputs.values(), "silu")
    assert out.dtype == out_ref.dtype and final.dtype == final_ref.dtype
    assert rel_err(out, out_ref) < 2e-2 and torch.equal(final, final_ref)


# (batch, dim, length, width): L shorter than the window (the final state reaches into initial_state), L = 1,
# ragged channel and position blocks (the backward's blocks are 128 channels by 64 positions), widths 2, 3 and the
# usual 4.
CASES = [(2, 37, 1, 4), (2, 37, 2, 4), (2, 37, 7, 4), (2, 100, 63, 4), (1, 37, 300, 4), (1, 5, 10, 2),
         (1, 150, 70, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,dim,length,width", CASES)
def test_conv_matches_reference(batch, dim, length, width, dtype, backward_kernel):
    inputs = make_inputs(batch, dim, length, width, dtype)
    (out, final, grads), (out_ref, final_ref, grads_ref) = run_both(inputs, "silu")
    assert out.dtype == dtype and final.dtype == dtype
    assert rel_err(out, out_ref) < TOL[dtype]
    assert rel_err(final, final_ref) < TOL[dtype]
    for name, ref in grads_ref.items():
        assert grads[name].dtype == inputs[name].dtype
        assert rel_err(grads[name], ref) < TOL[dtype], name


@pytest.mark.parametrize("bias,init,strided,activation,use_out,use_final", [
    (False, False, False, None, True, True),
    (True, False, True, "swish", True, True),
    (True, True, False, "silu", True, False),  # the final state unused: its gradient arrives as None
    (True, True, True, "silu", False, True),  # only the final state used
])
def test_conv_variants(bias, init, strided, activation, use_out, use_final, backward_kernel):
    inputs = make_inputs(2, 37, 9, 4, torch.float32, bias=bias, init=init, strided=strided)
    (out, final, grads), (out_ref, final_ref, grads_ref) = run_both(inputs, activation, use_out, use_final)
    assert rel_err(out, out_ref) < 1e-5 and rel_err(final, final_ref) < 1e-5
    for name, ref in grads_ref.items():
        if ref is None:  # the reference's graph does not reach it (the weights when only the final state is used)
            assert grads[name] is None or not grads[name].any(), name
            continue
        assert rel_err(grads[name], ref) < 1e-5, name


def test_conv_without_grad_and_bad_activation():
    inputs = make_inputs(2, 37, 9, 4, torch.float32)
    out, final = causal_conv1d_triton(*inputs.values())
    out_ref, final_ref = causal_conv1d_ref(*inputs.values())
    assert rel_err(out, out_ref) < 1e-5 and torch.equal(final, final_ref)
    with pytest.raises(ValueError):
        causal_conv1d_triton(*inputs.values(), activation="gelu")


def test_conv_nan_fails_the_comparison():
    inputs = make_inputs(1, 8, 5, 4, torch.float32)
    inputs["x"][0, 3, 2] = float("nan")
    out, _ = causal_conv1d_triton(*inputs.values())
    assert rel_err(out, torch.zeros_like(out)) == float("inf")  # fails any `< tolerance` check


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim,width,bias,activation", [(37, 4, True, "silu"), (100, 2, False, None), (5, 1, True,
                                                                                                        "silu")])
def test_update_matches_reference_and_continues_the_sequence(dim, width, bias, activation, dtype):
    batch, steps = 2, 5
    inputs = make_inputs(batch, dim, steps, width, dtype, bias=bias)
    state = inputs["initial_state"].clone()
    state_ref = inputs["initial_state"].clone()
    outs = []
    for t in range(steps):
        x_t = inputs["x"][:, :, t]
        out = causal_conv1d_update_triton(state, x_t, inputs["weight"], inputs["bias"], activation)
        out_ref = causal_conv1d_update_ref(state_ref, x_t, inputs["weight"], inputs["bias"], activation)
        assert out.dtype == dtype and state.dtype == dtype
        assert rel_err(out, out_ref) < TOL[dtype]
        assert torch.equal(state, state_ref)  # the shift is a copy: exact
        outs.append(out)
    # Stepping is the sequence conv: same outputs, and the state ends as the sequence's final state.
    seq_out, seq_final = reference_fp32(*inputs.values(), activation=activation)
    assert rel_err(torch.stack(outs, dim=-1), seq_out) < TOL[dtype]
    assert torch.equal(state, seq_final)


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_realistic_size_gpu(dtype, backward_kernel):
    inputs = make_inputs(4, 3200, 2048, 4, dtype, strided=True)  # x as the model has it: position-major
    (out, final, grads), (out_ref, final_ref, grads_ref) = run_both(inputs, "silu")
    assert rel_err(out, out_ref) < TOL[dtype] and rel_err(final, final_ref) < TOL[dtype]
    for name, ref in grads_ref.items():
        assert rel_err(grads[name], ref) < TOL[dtype], name


@gpu_only
@pytest.mark.gpu
def test_update_realistic_size_gpu():
    inputs = make_inputs(4, 3200, 1, 4, torch.bfloat16)
    state, state_ref = inputs["initial_state"].clone(), inputs["initial_state"].clone()
    out = causal_conv1d_update_triton(state, inputs["x"][:, :, 0], inputs["weight"], inputs["bias"])
    out_ref = causal_conv1d_update_ref(state_ref, inputs["x"][:, :, 0], inputs["weight"], inputs["bias"])
    assert rel_err(out, out_ref) < 2e-2 and torch.equal(state, state_ref)
