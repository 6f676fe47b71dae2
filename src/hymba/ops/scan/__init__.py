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
step's conv update and projections, in four small kernels on CUDA, and `ssm_step` the whole decode step of the SSM
heads (those, the state update and the gate): in two kernels up to `FUSED_STEP_MAX_ROWS` rows, in four up to
`ROWS_STEP_MAX_ROWS`, else in five.
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
    ssm_step_ref,
)

__all__ = ["selective_scan", "selective_scan_chunked", "selective_scan_cpu", "selective_scan_ref",
           "selective_state_update", "selective_state_update_ref", "ssm_projections", "ssm_step", "ssm_step_inputs",
           "ssm_step_inputs_ref", "ssm_step_ref", "triton_scan_blocks"]

# Below this length the sequential loop is cheaper than building the parallel scan's intermediates.
SEQUENTIAL_MAX_LEN = 8
# The Triton scan's parallel kernels (blocks of 16 positions, 8 channels per program) beat its walk over positions only
# where the walk has too few programs to fill the GPU. Hymba-1.5B's shape on an H200 (132 SMs): at batch 1 (the walk's
# 100 programs of 32 channels) 2.1x the walk forward over 640 positions and 1.6x forward + backward over 2,176; at
# batch 8 (800 programs) 0.41x forward (benchmarks/bench_scan.py, session 17). So they run while the walk would have at
# most this many programs.
PARALLEL_SCAN_MAX_WALK_PROGRAMS = 128
# Rows up to which a decode step's SSM heads run as `ssm_step_triton`'s two kernels (0 turns them off); past it, its
# partial sums re-read per program and its walk over rows cost more than the four input kernels + the state update.
# Hymba-1.5B on an H200 (benchmarks/bench_ssm_step.py --whole, session 25): 7.7 against 10.3 us at 1 row, 10.8 against
# 13.3 at 2, 16.5-21.5 against 15.5 at 4; the 8K decode step at batch 1 went from 412 to 450 tok/s, at batch 4 from
# 1,572 to 1,484 (so 4 rows stay with the five kernels).
FUSED_STEP_MAX_ROWS = 2
# Past FUSED_STEP_MAX_ROWS and up to this many rows (0 turns it off) the step runs as `ssm_step_rows_triton`: the
# input kernels' conv, x_proj and sums, then dt_proj, the state update and the gate in one kernel over 16-row tiles.
# On an H200 (bench_ssm_step.py --whole, session 27) 13.5 / 15.8 / 20.1 us at 4 / 8 / 32 rows against the five
# kernels' 15.4 / 17.5 / 21.4; at 64 and 128 rows 27.8 and 41.6 against 26.5 and 38.0 (its (16 rows, channels, state)
# tiles read the state slower than the state update's own kernel), so those stay with the five.
ROWS_STEP_MAX_ROWS = 32
# Forces the Triton scan's positions per block for every call (1 walks); None chooses by the rule above.
TRITON_BLOCK_L: int | None = None


def selective_scan(u, delta, A, B, C, D, z=None, delta_bias=None, delta_softplus=True, initial_state=None):
    """Selective scan with the implementation chosen by device and length (see module docstring)."""
    if gpu_kernels_usable(u):
        from hymba.ops.scan.triton import selective_scan_triton

        block_d, block_l = triton_scan_blocks(u.shape[0], u.shape[1])
        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                     block_d=block_d, block_l=block_l)
    if not u.is_cuda:
        return selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    if u.shape[-1] <= SEQUENTIAL_MAX_LEN:
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)


def triton_scan_blocks(batch: int, d_inner: int) -> tuple[int | None, int | None]:
    """(block_d, block_l) for `selective_scan_triton`: the parallel kernels' where the walk would leave the GPU
    idle, else the walk's (None, None: its default channels per program)."""
    block_l = TRITON_BLOCK_L
    if block_l is None:
        walk_programs = batch * -(-d_inner // 32)
        block_l = 16 if walk_programs <= PARALLEL_SCAN_MAX_WALK_PROGRAMS else 1
    return (8, block_l) if block_l > 1 else (None, None)


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


def ssm_step(conv_state, ssm_state, x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A_log, D,
             norm_weights=None, eps=1e-6, keep=None):
    """One decode step of the SSM heads, both states updated in place: returns y (batch, d_inner); see
    `ssm_step_ref`."""
    if gpu_kernels_usable(x) and not torch.is_grad_enabled() and x.shape[0] <= max(FUSED_STEP_MAX_ROWS,
                                                                                   ROWS_STEP_MAX_ROWS):
        from hymba.ops.scan.triton_step import ssm_step_rows_triton, ssm_step_triton

        step = ssm_step_triton if x.shape[0] <= FUSED_STEP_MAX_ROWS else ssm_step_rows_triton
        return step(conv_state, ssm_state, x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias,
                    A_log, D, *(norm_weights or (None, None, None)), eps, keep)
    u, delta, B, C = ssm_step_inputs(conv_state, x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                                     norm_weights, eps, keep)
    return selective_state_update(ssm_state, u, delta, A_log, B, C, D, z, dt_bias, A_is_log=True)
