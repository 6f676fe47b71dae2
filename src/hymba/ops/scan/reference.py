"""The selective scan written as the recurrence it is: one step per position, float32 state; and the projections
that feed it, for the fused decode step to be tested against.

Slow and obviously right; every faster implementation is tested against these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hymba.ops.conv.reference import causal_conv1d_update_ref
from hymba.ops.norm import rms_norm


def discretize(delta, A, B, u, delta_bias=None, delta_softplus=True):
    """Returns (dt, dA, dBu) in float32: dt (b, d, L), dA = exp(dt*A) and dBu = dt*B*u, both (b, d, L, n)."""
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    dA = torch.exp(dt.unsqueeze(-1) * A.float()[:, None, :])  # (b, d, L, n)
    dBu = (dt * u.float()).unsqueeze(-1) * B.float().transpose(1, 2).unsqueeze(1)  # (b, d, L, n)
    return dt, dA, dBu


def finish_output(y, u, D, z, out_dtype):
    """y + D*u, gated by silu(z), in float32, cast to the input dtype."""
    y = y + u.float() * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(out_dtype)


def selective_scan_ref(u, delta, A, B, C, D, z=None, delta_bias=None, delta_softplus=True, initial_state=None):
    """Sequential selective scan. Shapes as in `hymba.ops.scan`; returns (y, last_state)."""
    batch, d_inner, length = u.shape
    _, dA, dBu = discretize(delta, A, B, u, delta_bias, delta_softplus)
    h = u.new_zeros(batch, d_inner, A.shape[1], dtype=torch.float32) if initial_state is None else initial_state.float()
    Cf = C.float()
    ys = []
    for t in range(length):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, Cf[:, :, t]))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, d_inner, 0, dtype=torch.float32)
    return finish_output(y, u, D, z, u.dtype), h


def selective_state_update_ref(state, u, delta, A, B, C, D, z=None, delta_bias=None, delta_softplus=True,
                               A_is_log=False):
    """One step of the recurrence. state (b, d, n) float32 is updated in place; u, delta, z (b, d); B, C (b, n).
    With `A_is_log`, `A` holds A_log (A = -exp(A_log))."""
    if A_is_log:
        A = -torch.exp(A.float())
    _, dA, dBu = discretize(delta.unsqueeze(-1), A, B.unsqueeze(-1), u.unsqueeze(-1), delta_bias, delta_softplus)
    state.mul_(dA[:, :, 0]).add_(dBu[:, :, 0])
    y = torch.einsum("bdn,bn->bd", state, C.float())
    return finish_output(y.unsqueeze(-1), u.unsqueeze(-1), D, None if z is None else z.unsqueeze(-1), u.dtype)[..., 0]


# x_proj's outputs (dt_rank + 2 d_state: 132 at the 1.5B shape) and dt_proj's inputs (dt_rank: 100) are not
# multiples of 8, so a bf16 row of either is not 16-byte aligned and cuBLAS runs its sm80 align-2 kernels: at 16k
# tokens of a 1.5B training step they took 635 us a layer, forward and backward (141 us for x_proj's forward at about
# 100 TFLOP/s), where reading and writing their activations at copy bandwidth takes about 180 (H200, session 29's
# profile). On CUDA both are padded with zeros to a multiple of this, as the LM head's rows are (`cross_entropy`).
CUDA_GEMM_ALIGN = 8


def ssm_projections(u, x_proj_weight, dt_proj_weight, norm_weights=None, eps=1e-6, align=None):
    """The selective scan's input-dependent parameters from its input u (..., d_inner), position-major:
    x_proj splits into (dt, B, C), each RMS-normed when `norm_weights` = (dt, B, C) norm weights are given, and
    dt_proj maps dt to delta without its bias (which goes inside softplus). Returns delta (..., d_inner) and
    B, C (..., d_state), in u's dtype.

    Both matmuls run on shapes padded with zeros to a multiple of `align` (default `CUDA_GEMM_ALIGN` on CUDA, 1
    elsewhere): x_proj gains zero rows whose outputs nothing reads, dt_proj zero columns that meet zeros appended to
    dt. The values are those of the unpadded matmuls; only the kernels cuBLAS picks change."""
    align = align or (CUDA_GEMM_ALIGN if u.is_cuda else 1)
    dt_rank = dt_proj_weight.shape[1]
    d_state = (x_proj_weight.shape[0] - dt_rank) // 2
    pad_out, pad_rank = -x_proj_weight.shape[0] % align, -dt_rank % align
    if pad_out:
        x_proj_weight = F.pad(x_proj_weight, (0, 0, 0, pad_out))
    dt, B, C, _ = torch.split(F.linear(u, x_proj_weight), [dt_rank, d_state, d_state, pad_out], dim=-1)
    if norm_weights is not None:
        dt, B, C = (rms_norm(t, weight, eps) for t, weight in zip((dt, B, C), norm_weights))
    if pad_rank:
        dt, dt_proj_weight = F.pad(dt, (0, pad_rank)), F.pad(dt_proj_weight, (0, pad_rank))
    return F.linear(dt, dt_proj_weight), B, C


def ssm_step_inputs_ref(conv_state, x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, norm_weights=None,
                        eps=1e-6, keep=None):
    """One decode step up to the state update: the conv update (SiLU) of x (b, d_inner), `conv_state` shifted in
    place, then `ssm_projections`. `keep` (b,), 0 at a padded token, zeroes x before the conv and u after it.
    Returns (u, delta (b, d_inner), B, C (b, d_state))."""
    if keep is not None:
        x = x * keep[:, None]
    u = causal_conv1d_update_ref(conv_state, x, conv_weight, conv_bias)
    if keep is not None:
        u = u * keep[:, None]
    return (u, *ssm_projections(u, x_proj_weight, dt_proj_weight, norm_weights, eps))


def ssm_step_ref(conv_state, ssm_state, x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A_log,
                 D, norm_weights=None, eps=1e-6, keep=None):
    """One decode step of the SSM heads: `ssm_step_inputs_ref`, then `selective_state_update_ref` with the gate z
    (b, d_inner) and A = -exp(A_log). Both states are updated in place; returns y (b, d_inner) in x's dtype."""
    u, delta, B, C = ssm_step_inputs_ref(conv_state, x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                                         norm_weights, eps, keep)
    return selective_state_update_ref(ssm_state, u, delta, A_log, B, C, D, z, dt_bias, A_is_log=True)
