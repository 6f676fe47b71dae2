"""Mamba-1 selective scan: `selective_scan` picks the fastest available implementation (Triton on CUDA, the
parallel chunked scan on GPUs without Triton, the time-major recurrence on CPUs).

All implementations share one signature (mamba_ssm's layout, so kernels are drop-in):

    u, delta, z: (batch, d_inner, L)    A: (d_inner, d_state)    B, C: (batch, d_state, L)    D: (d_inner,)

    dt  = softplus(delta + delta_bias)                       (if delta_softplus)
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t         (state in float32)
    y_t = C_t . h_t + D * u_t;   y *= silu(z)                (if z is given)

They return `(y, last_state)` with `y` in u's dtype and `last_state` (batch, d_inner, d_state) float32,
and `selective_state_update` is the one-token form used by cached decoding (state updated in place).
`ssm_projections` computes delta, B and C from u (x_proj, norms, dt_proj); `ssm_step_inputs` is one decode
step's conv update and projections, in four small kernels on CUDA.
"""

from __future__ import annotations

import torch

from hymba.ops import gpu_kernels_usable
from hymba.ops.scan.chunked import selective_scan_chunked
from hymba.ops.scan.cpu import selective_scan_cpu
from hymba.ops.scan.reference import (
    selective_scan_ref,
    selective_state_update_ref,
    ssm_projections,
    ssm_step_inputs_ref,
)

__all__ = ["selective_scan", "selective_scan_chunked", "selective_scan_cpu", "selective_scan_ref",
           "selective_state_update", "selective_state_update_ref", "ssm_projections", "ssm_step_inputs",
           "ssm_step_inputs_ref"]

# Below this length the sequential loop is cheaper than building the parallel scan's intermediates.
SEQUENTIAL_MAX_LEN = 8
# Positions per block of the Triton scan's parallel kernels (`selective_scan_triton`'s block_l); None walks positions
# one at a time, the default until the parallel kernels are measured on a GPU (benchmarks/bench_scan.py).
TRITON_BLOCK_L: int | None = None


def selective_scan(u, delta, A, B, C, D, z=None, delta_bias=None, delta_softplus=True, initial_state=None):
    """Selective scan with the implementation chosen by device and length (see module docstring)."""
    if gpu_kernels_usable(u):
        from hymba.ops.scan.triton import selective_scan_triton

        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                     block_l=TRITON_BLOCK_L)
    if not u.is_cuda:
        return selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    if u.shape[-1] <= SEQUENTIAL_MAX_LEN:
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)


def selective_state_update(state, u, delta, A, B, C, D, z=None, delta_bias=None, delta_softplus=True,
                           A_is_log=False):
    """One decode step: updates `state` (batch, d_inner, d_state) in place and returns y (batch, d_inner).
    With `A_is_log`, `A` holds A_log: the kernel takes -exp itself, saving an elementwise kernel per layer and step."""
    if gpu_kernels_usable(u):
        from hymba.ops.scan.triton import selective_state_update_triton

        return selective_state_update_triton(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                             A_is_log=A_is_log)
    return selective_state_update_ref(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, A_is_log)


def ssm_step_inputs(conv_state, x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, norm_weights=None,
                    eps=1e-6, keep=None):
    """One decode step up to the state update: returns (u, delta, B, C); see `ssm_step_inputs_ref`."""
    if gpu_kernels_usable(x) and not torch.is_grad_enabled():
        from hymba.ops.scan.triton_step import ssm_step_inputs_triton

        return ssm_step_inputs_triton(conv_state, x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                                      *(norm_weights or (None, None, None)), eps, keep)
    return ssm_step_inputs_ref(conv_state, x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, norm_weights,
                               eps, keep)
