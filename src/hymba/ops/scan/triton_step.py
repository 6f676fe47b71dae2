"""The SSM heads' decode step in few kernels: its inputs in four instead of about nine (`ssm_step_inputs_triton`),
at one or two rows the whole step in two (`ssm_step_triton`), and at a few dozen in four (`ssm_step_rows_triton`).

Per layer, a decode step computes before the state update (see `ssm_step_inputs_ref`, the reference):

    u = silu(conv update of x)            conv state shifted in place
    dt, B, C = split(x_proj(u))           x_proj: (dt_rank + 2 d_state) x d_inner, a few hundred KB
    dt, B, C = rms_norm(dt), rms_norm(B), rms_norm(C)
    delta = dt_proj(dt)                   dt_proj: d_inner x dt_rank

Run as written, that is a conv kernel, two small GEMMs (about 5 us each on an H100 however small the batch, plus a
split-K reduction at batch 128) and several elementwise kernels. Here:

1. the conv update, `hymba.ops.conv.triton`'s one-step kernel. (Done inside kernel 2 over a (16 rows, channels,
   width) window tile, it made that kernel take 22.7 us at batch 128 on an H100, against 5.6 us on its own.)
2. `_x_proj_partials_kernel`, one program per (16 rows, channel block): that block's share of x_proj as a `tl.dot`,
   written as float32 partial sums. Splitting x_proj over channels gives it many programs, instead of the few a
   (rows x 132) output tile gives a GEMM.
3. `_sum_partials_kernel`, one program per (row, 32 outputs): sums the partials of all channel blocks as one tile,
   in a fixed order (no atomics, so results do not change from run to run).
4. `_dt_proj_kernel`, one program per (16 rows, channel block): the three RMSNorms, then its block of delta as a
   `tl.dot` with dt_proj's weight.

`ssm_step_triton` is the whole step for a few rows (see `ssm_step_ref`), in two kernels instead of five:

A. `_conv_x_proj_kernel`, one program per channel block, walking the rows: the conv update, u, and that block's
   share of x_proj(u) as float32 partial sums (elementwise products and a sum: no tl.dot and its 16 padded rows).
   At one row on an H200 the pair takes 7.7 us where the five took 10.3 (docs/bench.md).
B. `_ssm_step_kernel`, one program per (row, channel block): sums the partials in a fixed order, the dt/B/C norms,
   its channels' delta from dt_proj, softplus, the state update, the D skip and the gate.

Every program of B re-reads the row's partials (n_blocks x n_proj float32, from L2) and A walks the rows one by one,
so past a few rows the four kernels and the separate state update win (`hymba.ops.scan.FUSED_STEP_MAX_ROWS`).
(Giving A and B blocks of rows to walk, B reading sums of the partials, was 3-11x slower from 4 rows on: a row of B
is about 1,300 SASS instructions of one-row reductions, so B's programs were bound by instructions, not memory.)

`ssm_step_rows_triton` is the whole step for more rows: kernels 1-3, then `_dt_proj_state_kernel`, one program per
(16 rows, channel block): the norms, delta as a `tl.dot` with dt_proj's weight, and the state update over a
(rows, channels, state) tile, the D skip and the gate. It wins up to `hymba.ops.scan.ROWS_STEP_MAX_ROWS` rows.

Rounding follows the reference wherever it rounds to the model's dtype (x_proj's output, the norms, delta).
Inference only: no backward.

Triton is optional: this module is imported only when it is importable. Under TRITON_INTERPRET=1 the kernels also
take CPU tensors, which is how the tests exercise them without a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hymba.ops.conv.triton import _conv_update_row, causal_conv1d_update_triton
from hymba.ops.launch import pdl_launch, wait_for_inputs
from hymba.ops.scan.triton import LOG2E, _softplus, _state_step

__all__ = ["ssm_step_inputs_triton", "ssm_step_rows_triton", "ssm_step_triton"]

BLOCK_ROWS = 16  # the smallest M of tl.dot; rows beyond the batch are masked


@triton.jit
def _x_proj_partials_kernel(
    u_ptr, x_proj_ptr, part_ptr,
    batch, dim, n_proj,
    stride_x_proj_p, stride_x_proj_d,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, P_BLOCKS: tl.constexpr,
    DOT_FP32: tl.constexpr, USE_PDL: tl.constexpr,
):
    """part[pid_d, rows, :] = u[rows, channels] @ x_proj[:, channels].T in float32, for BLOCK_B rows and the
    BLOCK_D channels of block pid_d; u is contiguous (batch, dim)."""
    wait_for_inputs(USE_PDL)
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    chans = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_b, mask_d = rows < batch, chans < dim
    u = tl.load(u_ptr + rows[:, None] * dim + chans[None, :], mask=mask_b[:, None] & mask_d[None, :], other=0.0)

    part_rows = part_ptr + pid_d * batch * n_proj + rows[:, None] * n_proj
    for p_block in tl.static_range(P_BLOCKS):
        offs_p = p_block * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < n_proj
        w_p = tl.load(x_proj_ptr + offs_p[:, None] * stride_x_proj_p + chans[None, :] * stride_x_proj_d,
                      mask=mask_p[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_P, BLOCK_D), read along rows
        part = _dot(u, tl.trans(w_p), DOT_FP32)
        tl.store(part_rows + offs_p[None, :], part, mask=mask_b[:, None] & mask_p[None, :])


@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    """a @ b accumulated in float32: on a's dtype (bf16 tensor cores), or exactly in float32 for float32 inputs and
    under the interpreter, whose bf16 tl.dot is wrong."""
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b.to(a.dtype))


@triton.jit
def _sum_partials_kernel(
    part_ptr, proj_ptr, batch, n_proj, n_blocks,
    BLOCK_BLOCKS: tl.constexpr, BLOCK_P: tl.constexpr, USE_PDL: tl.constexpr,
):
    """proj[row, p-block] = sum over channel blocks of the partials, in one (blocks x BLOCK_P) tile, rounded to the
    model's dtype as a GEMM's output is."""
    wait_for_inputs(USE_PDL)
    row = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    blocks = tl.arange(0, BLOCK_BLOCKS)
    mask = (blocks[:, None] < n_blocks) & (offs_p[None, :] < n_proj)
    part = tl.load(part_ptr + blocks[:, None] * batch * n_proj + row * n_proj + offs_p[None, :], mask=mask, other=0.0)
    tl.store(proj_ptr + row * n_proj + offs_p, tl.sum(part, axis=0).to(proj_ptr.dtype.element_ty),
             mask=offs_p < n_proj)


@triton.jit
def _rms_norm_rows(v, weight_ptr, offs, mask, n, eps, out_dtype: tl.constexpr):
    """`hymba.ops.norm.rms_norm` over each row of v (masked columns hold 0), with its two roundings."""
    inv_rms = tl.rsqrt(tl.sum(v * v, axis=1) / n + eps)
    normed = (v * inv_rms[:, None]).to(out_dtype).to(tl.float32)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return (weight[None, :] * normed).to(out_dtype).to(tl.float32)


@triton.jit
def _normed_projections(proj_ptr, rows, mask_b, dt_norm_ptr, B_norm_ptr, C_norm_ptr, offs_r, offs_n, mask_r, mask_n,
                        dt_rank, d_state, eps, HAS_NORMS: tl.constexpr, out_dtype: tl.constexpr):
    """dt, B, C of `rows` from x_proj(u) (batch, dt_rank + 2 d_state), each normed where the model norms them."""
    proj_rows = proj_ptr + rows[:, None] * (dt_rank + 2 * d_state)
    mask_bn = mask_b[:, None] & mask_n[None, :]
    dt = tl.load(proj_rows + offs_r[None, :], mask=mask_b[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
    B = tl.load(proj_rows + dt_rank + offs_n[None, :], mask=mask_bn, other=0.0).to(tl.float32)
    C = tl.load(proj_rows + dt_rank + d_state + offs_n[None, :], mask=mask_bn, other=0.0).to(tl.float32)
    if HAS_NORMS:
        dt = _rms_norm_rows(dt, dt_norm_ptr, offs_r, mask_r, dt_rank, eps, out_dtype)
        B = _rms_norm_rows(B, B_norm_ptr, offs_n, mask_n, d_state, eps, out_dtype)
        C = _rms_norm_rows(C, C_norm_ptr, offs_n, mask_n, d_state, eps, out_dtype)
    return dt, B, C


@triton.jit
def _dt_proj_kernel(
    proj_ptr, dt_proj_ptr, dt_norm_ptr, B_norm_ptr, C_norm_ptr, delta_ptr, B_ptr, C_ptr,
    batch, dim, dt_rank, d_state, eps,
    stride_dt_proj_d, stride_dt_proj_r,
    HAS_NORMS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, USE_PDL: tl.constexpr,
):
    """dt, B, C = split(x_proj(u)), normed; delta[rows, channels] = dt @ dt_proj[channels].T; B, C stored by the
    programs of the first channel block."""
    wait_for_inputs(USE_PDL)
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_r, offs_n = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_N)
    mask_b, mask_r, mask_n = rows < batch, offs_r < dt_rank, offs_n < d_state
    mask_bn = mask_b[:, None] & mask_n[None, :]
    out_dtype = delta_ptr.dtype.element_ty

    dt, B, C = _normed_projections(proj_ptr, rows, mask_b, dt_norm_ptr, B_norm_ptr, C_norm_ptr, offs_r, offs_n, mask_r,
                                   mask_n, dt_rank, d_state, eps, HAS_NORMS, out_dtype)
    if pid_d == 0:
        bn_offs = rows[:, None] * d_state + offs_n[None, :]
        tl.store(B_ptr + bn_offs, B.to(out_dtype), mask=mask_bn)
        tl.store(C_ptr + bn_offs, C.to(out_dtype), mask=mask_bn)

    chans = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = chans < dim
    w = tl.load(dt_proj_ptr + offs_r[:, None] * stride_dt_proj_r + chans[None, :] * stride_dt_proj_d,
                mask=mask_r[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_R, BLOCK_D)
    delta = _dot(dt.to(out_dtype), w, DOT_FP32)
    tl.store(delta_ptr + rows[:, None] * dim + chans[None, :], delta.to(out_dtype),
             mask=mask_b[:, None] & mask_d[None, :])


@triton.jit
def _conv_x_proj_kernel(
    conv_state_ptr, x_ptr, keep_ptr, conv_w_ptr, conv_bias_ptr, x_proj_ptr, u_ptr, part_ptr,
    batch, dim, dt_rank, n_proj,
    stride_state_b, stride_state_d, stride_state_k, stride_x_b, stride_x_d, stride_keep,
    stride_conv_w_d, stride_conv_w_k, stride_x_proj_p, stride_x_proj_d,
    HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, WIDTH: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_BC: tl.constexpr, USE_PDL: tl.constexpr,
):
    """For channel block pid_d, row by row: u = silu(conv update of x) (state shifted in place; keep = 0 zeroes x
    and u), stored, and part[pid_d, row, :] = x_proj[:, channels] @ u[channels] in float32."""
    wait_for_inputs(USE_PDL)
    pid_d = tl.program_id(0)
    chans = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = chans < dim
    dtype = u_ptr.dtype.element_ty
    # x_proj's columns for these channels, read once before the rows' dependent work: the dt rows, then B and C's.
    offs_r, offs_bc = tl.arange(0, BLOCK_R), dt_rank + tl.arange(0, BLOCK_BC)
    mask_r, mask_bc = offs_r < dt_rank, offs_bc < n_proj
    w_cols = x_proj_ptr + chans[None, :] * stride_x_proj_d
    w_dt = tl.load(w_cols + offs_r[:, None] * stride_x_proj_p, mask=mask_r[:, None] & mask_d[None, :], other=0.0)
    w_bc = tl.load(w_cols + offs_bc[:, None] * stride_x_proj_p, mask=mask_bc[:, None] & mask_d[None, :], other=0.0)
    for row in range(batch):
        x = tl.load(x_ptr + row * stride_x_b + chans * stride_x_d, mask=mask_d, other=0.0)
        if HAS_KEEP:
            keep = tl.load(keep_ptr + row * stride_keep)
            x = x * keep
        u = _conv_update_row(conv_state_ptr + row * stride_state_b, x.to(conv_state_ptr.dtype.element_ty),
                             conv_w_ptr, conv_bias_ptr, chans, mask_d, stride_state_d, stride_state_k,
                             stride_conv_w_d, stride_conv_w_k, HAS_BIAS, True, WIDTH, BLOCK_W).to(dtype)
        if HAS_KEEP:
            u = u * keep
        tl.store(u_ptr + row * dim + chans, u, mask=mask_d)
        u = u.to(tl.float32)[None, :]
        part_row = part_ptr + (pid_d * batch + row) * n_proj
        tl.store(part_row + offs_r, tl.sum(w_dt.to(tl.float32) * u, axis=1), mask=mask_r)
        tl.store(part_row + offs_bc, tl.sum(w_bc.to(tl.float32) * u, axis=1), mask=mask_bc)


@triton.jit
def _ssm_step_kernel(
    part_ptr, u_ptr, z_ptr, dt_proj_ptr, dt_bias_ptr, dt_norm_ptr, B_norm_ptr, C_norm_ptr, A_log_ptr, D_ptr,
    state_ptr, y_ptr,
    batch, dim, n_blocks, dt_rank, d_state, eps,
    stride_z_b, stride_z_d, stride_dt_proj_d, stride_dt_proj_r, stride_A_d, stride_A_n,
    stride_state_b, stride_state_d, stride_state_n,
    HAS_NORMS: tl.constexpr, BLOCK_BLOCKS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr, USE_PDL: tl.constexpr,
):
    """For row pid_b and channel block pid_c: dt, B, C = split(x_proj(u)) from the partials, normed; delta =
    dt_proj(dt); the state update with dt = softplus(delta + bias), A = -exp(A_log); y = (C.h + D u) silu(z)."""
    wait_for_inputs(USE_PDL)
    row = tl.program_id(0)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = chans < dim
    dtype = y_ptr.dtype.element_ty
    offs_r, offs_n = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_N)
    mask_r, mask_n = offs_r < dt_rank, offs_n < d_state
    n_proj = dt_rank + 2 * d_state

    # What does not depend on x_proj(u) is read first, so that those loads overlap the partials' sums and the norms.
    w = tl.load(dt_proj_ptr + chans[:, None] * stride_dt_proj_d + offs_r[None, :] * stride_dt_proj_r,
                mask=mask_c[:, None] & mask_r[None, :], other=0.0)
    dt_bias = tl.load(dt_bias_ptr + chans, mask=mask_c, other=0.0).to(tl.float32)
    mask_cn = mask_c[:, None] & mask_n[None, :]
    state_ptrs = (state_ptr + row * stride_state_b + chans[:, None] * stride_state_d
                  + offs_n[None, :] * stride_state_n)
    h = tl.load(state_ptrs, mask=mask_cn, other=0.0).to(tl.float32)
    A_log = tl.load(A_log_ptr + chans[:, None] * stride_A_d + offs_n[None, :] * stride_A_n, mask=mask_cn, other=0.0)
    u = tl.load(u_ptr + row * dim + chans, mask=mask_c, other=0.0).to(tl.float32)
    D = tl.load(D_ptr + chans, mask=mask_c, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + row * stride_z_b + chans * stride_z_d, mask=mask_c, other=0.0).to(tl.float32)

    # x_proj(u): the channel blocks' partials summed as one tile (a fixed order: no atomics), rounded as a GEMM's
    # output is; each (1, width) so the norms see one row.
    blocks = tl.arange(0, BLOCK_BLOCKS)
    part_rows = part_ptr + (blocks[:, None] * batch + row) * n_proj
    in_blocks = blocks[:, None] < n_blocks
    dt = tl.sum(tl.load(part_rows + offs_r[None, :], mask=in_blocks & mask_r[None, :], other=0.0), axis=0,
                keep_dims=True).to(dtype).to(tl.float32)
    B = tl.sum(tl.load(part_rows + dt_rank + offs_n[None, :], mask=in_blocks & mask_n[None, :], other=0.0), axis=0,
               keep_dims=True).to(dtype).to(tl.float32)
    C = tl.sum(tl.load(part_rows + dt_rank + d_state + offs_n[None, :], mask=in_blocks & mask_n[None, :],
                       other=0.0), axis=0, keep_dims=True).to(dtype).to(tl.float32)
    if HAS_NORMS:
        dt = _rms_norm_rows(dt, dt_norm_ptr, offs_r, mask_r, dt_rank, eps, dtype)
        B = _rms_norm_rows(B, B_norm_ptr, offs_n, mask_n, d_state, eps, dtype)
        C = _rms_norm_rows(C, C_norm_ptr, offs_n, mask_n, d_state, eps, dtype)

    delta = tl.sum(w.to(tl.float32) * dt, axis=1).to(dtype).to(tl.float32)  # rounded as dt_proj's output is
    dt_step = _softplus(delta + dt_bias)
    A = -tl.exp(A_log.to(tl.float32)) * LOG2E
    h, y = _state_step(h, A, dt_step[:, None], u[:, None], B, C, state_ptr.dtype.element_ty)
    y = (y + u * D) * z * tl.sigmoid(z)
    # Every thread has read its state before any thread overwrites it (layouts may replicate elements).
    tl.debug_barrier()
    tl.store(state_ptrs, h, mask=mask_cn)
    tl.store(y_ptr + row * dim + chans, y, mask=mask_c)


@triton.jit
def _dt_proj_state_kernel(
    proj_ptr, u_ptr, z_ptr, dt_proj_ptr, dt_bias_ptr, dt_norm_ptr, B_norm_ptr, C_norm_ptr, A_log_ptr, D_ptr,
    state_ptr, y_ptr,
    batch, dim, dt_rank, d_state, eps,
    stride_z_b, stride_z_d, stride_dt_proj_d, stride_dt_proj_r, stride_A_d, stride_A_n,
    stride_state_b, stride_state_d, stride_state_n,
    HAS_NORMS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, USE_PDL: tl.constexpr,
):
    """For BLOCK_B rows and channel block pid_c: dt, B, C = split(x_proj(u)) (summed, in the model's dtype), normed;
    delta = dt_proj(dt) as a tl.dot; the state update with dt = softplus(delta + bias), A = -exp(A_log), over a
    (rows, channels, state) tile; y = (C.h + D u) silu(z)."""
    wait_for_inputs(USE_PDL)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r, offs_n = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_N)
    mask_b, mask_c, mask_r, mask_n = rows < batch, chans < dim, offs_r < dt_rank, offs_n < d_state
    mask_bc = mask_b[:, None] & mask_c[None, :]
    mask_bcn = mask_bc[:, :, None] & mask_n[None, None, :]
    dtype = y_ptr.dtype.element_ty

    # What does not depend on x_proj(u) first: the weights, then the rows' state, u and z.
    w = tl.load(dt_proj_ptr + offs_r[:, None] * stride_dt_proj_r + chans[None, :] * stride_dt_proj_d,
                mask=mask_r[:, None] & mask_c[None, :], other=0.0)  # (BLOCK_R, BLOCK_C)
    dt_bias = tl.load(dt_bias_ptr + chans, mask=mask_c, other=0.0).to(tl.float32)
    A_log = tl.load(A_log_ptr + chans[:, None] * stride_A_d + offs_n[None, :] * stride_A_n,
                    mask=mask_c[:, None] & mask_n[None, :], other=0.0)
    D = tl.load(D_ptr + chans, mask=mask_c, other=0.0).to(tl.float32)
    state_ptrs = (state_ptr + rows[:, None, None] * stride_state_b + chans[None, :, None] * stride_state_d
                  + offs_n[None, None, :] * stride_state_n)
    h = tl.load(state_ptrs, mask=mask_bcn, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows[:, None] * dim + chans[None, :], mask=mask_bc, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rows[:, None] * stride_z_b + chans[None, :] * stride_z_d, mask=mask_bc, other=0.0)
    z = z.to(tl.float32)

    dt, B, C = _normed_projections(proj_ptr, rows, mask_b, dt_norm_ptr, B_norm_ptr, C_norm_ptr, offs_r, offs_n, mask_r,
                                   mask_n, dt_rank, d_state, eps, HAS_NORMS, dtype)
    delta = _dot(dt.to(dtype), w, DOT_FP32).to(dtype).to(tl.float32)  # rounded as dt_proj's output is
    dt_step = _softplus(delta + dt_bias[None, :])
    A = -tl.exp(A_log.to(tl.float32)) * LOG2E
    h, y = _state_step(h, A[None, :, :], dt_step[:, :, None], u[:, :, None], B[:, None, :], C[:, None, :],
                       state_ptr.dtype.element_ty)
    y = (y + u * D[None, :]) * z * tl.sigmoid(z)
    # Every thread has read its state before any thread overwrites it (layouts may replicate elements).
    tl.debug_barrier()
    tl.store(state_ptrs, h, mask=mask_bcn)
    tl.store(y_ptr + rows[:, None] * dim + chans[None, :], y, mask=mask_bc)


# Channels per program (bench_ssm_step.py --sweep on an H100); narrow dt_proj blocks spread its weight over more
# programs.
BLOCK_D_X_PROJ = 64
BLOCK_D_DT_PROJ = 128
# The fused step's: kernel A's channel block (dim / this is the partials' count) and kernel B's, at one row and at
# more (the fastest on an H200, bench_ssm_step.py --whole --sweep: narrower blocks give one row more programs).
BLOCK_D_FUSED_IN = 64
BLOCK_C_FUSED = (16, 32)
# The many-rows step's last kernel: channels per program (16 rows each) and warps.
BLOCK_C_ROWS = 16
NUM_WARPS_ROWS = 4


def _conv_x_proj_sums(conv_state, x, conv_weight, conv_bias, x_proj_weight, keep, block_d_in, dot_fp32):
    """Kernels 1-3 of `ssm_step_inputs_triton`: (u, x_proj(u) in x's dtype)."""
    batch, dim = x.shape
    n_proj = x_proj_weight.shape[0]
    block_p = 32
    n_blocks = triton.cdiv(dim, block_d_in)
    if keep is not None:
        x = x * keep[:, None]  # a padding row's x enters the conv state as 0 and its u is 0
    u = causal_conv1d_update_triton(conv_state, x, conv_weight, conv_bias)
    if keep is not None:
        u = u * keep[:, None]
    part = torch.empty(n_blocks, batch, n_proj, device=x.device, dtype=torch.float32)
    _x_proj_partials_kernel[(triton.cdiv(batch, BLOCK_ROWS), n_blocks)](
        u, x_proj_weight, part, batch, dim, n_proj, *x_proj_weight.stride(),
        BLOCK_B=BLOCK_ROWS, BLOCK_D=block_d_in, BLOCK_P=block_p, P_BLOCKS=triton.cdiv(n_proj, block_p),
        DOT_FP32=dot_fp32, **pdl_launch(u),
    )
    proj = torch.empty(batch, n_proj, device=x.device, dtype=x.dtype)
    _sum_partials_kernel[(batch, triton.cdiv(n_proj, block_p))](
        part, proj, batch, n_proj, n_blocks, BLOCK_BLOCKS=triton.next_power_of_2(n_blocks), BLOCK_P=block_p,
        **pdl_launch(part))
    return u, proj


# A custom op, so that the compiled decode step (`torch.compile(..., fullgraph=True)`) keeps the launches whole.
@torch.library.custom_op("hymba::ssm_step_inputs", mutates_args=("conv_state",))
def ssm_step_inputs_triton(conv_state: torch.Tensor, x: torch.Tensor, conv_weight: torch.Tensor,
                           conv_bias: torch.Tensor | None, x_proj_weight: torch.Tensor, dt_proj_weight: torch.Tensor,
                           dt_norm_weight: torch.Tensor | None = None, B_norm_weight: torch.Tensor | None = None,
                           C_norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                           keep: torch.Tensor | None = None, block_d_in: int = 0, block_d_out: int = 0,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `ssm_step_inputs_ref` (norm weights all given or all None). x (batch, d_inner); conv_state
    (batch, d_inner, width-1) shifted in place. Returns (u, delta, B, C) in x's dtype. Zero block sizes mean
    BLOCK_D_X_PROJ and BLOCK_D_DT_PROJ."""
    batch, dim = x.shape
    dt_rank = dt_proj_weight.shape[1]
    n_proj = x_proj_weight.shape[0]
    d_state = (n_proj - dt_rank) // 2
    block_d_in, block_d_out = block_d_in or BLOCK_D_X_PROJ, block_d_out or BLOCK_D_DT_PROJ
    dot_fp32 = x.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    u, proj = _conv_x_proj_sums(conv_state, x, conv_weight, conv_bias, x_proj_weight, keep, block_d_in, dot_fp32)
    delta = torch.empty_like(x)
    B = torch.empty(batch, d_state, device=x.device, dtype=x.dtype)
    C = torch.empty_like(B)
    _dt_proj_kernel[(triton.cdiv(batch, BLOCK_ROWS), triton.cdiv(dim, block_d_out))](
        proj, dt_proj_weight, dt_norm_weight, B_norm_weight, C_norm_weight, delta, B, C,
        batch, dim, dt_rank, d_state, eps,
        *dt_proj_weight.stride(),
        HAS_NORMS=dt_norm_weight is not None, BLOCK_B=BLOCK_ROWS, BLOCK_D=block_d_out,
        BLOCK_R=max(16, triton.next_power_of_2(dt_rank)), BLOCK_N=triton.next_power_of_2(d_state),
        DOT_FP32=dot_fp32, **pdl_launch(proj),
    )
    return u, delta, B, C


@ssm_step_inputs_triton.register_fake
def _(conv_state, x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_norm_weight=None, B_norm_weight=None,
      C_norm_weight=None, eps=1e-6, keep=None, block_d_in=0, block_d_out=0):
    d_state = (x_proj_weight.shape[0] - dt_proj_weight.shape[1]) // 2
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape[0], d_state), \
        x.new_empty(x.shape[0], d_state)


@torch.library.custom_op("hymba::ssm_step", mutates_args=("conv_state", "ssm_state"))
def ssm_step_triton(conv_state: torch.Tensor, ssm_state: torch.Tensor, x: torch.Tensor, z: torch.Tensor,
                    conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, x_proj_weight: torch.Tensor,
                    dt_proj_weight: torch.Tensor, dt_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor,
                    dt_norm_weight: torch.Tensor | None = None, B_norm_weight: torch.Tensor | None = None,
                    C_norm_weight: torch.Tensor | None = None, eps: float = 1e-6, keep: torch.Tensor | None = None,
                    block_d_in: int = 0, block_c: int = 0) -> torch.Tensor:
    """As `ssm_step_ref` (norm weights all given or all None), in two kernels. x, z (batch, d_inner), rows may be
    strided; conv_state (batch, d_inner, width-1) and ssm_state (batch, d_inner, d_state) updated in place. Returns y
    (batch, d_inner) in x's dtype. Zero block sizes mean BLOCK_D_FUSED_IN and BLOCK_C_FUSED's."""
    batch, dim = x.shape
    dt_rank = dt_proj_weight.shape[1]
    n_proj = x_proj_weight.shape[0]
    d_state = (n_proj - dt_rank) // 2
    width = conv_weight.shape[1]
    block_d_in, block_c = block_d_in or BLOCK_D_FUSED_IN, block_c or BLOCK_C_FUSED[batch > 1]
    n_blocks = triton.cdiv(dim, block_d_in)
    u = torch.empty(batch, dim, device=x.device, dtype=x.dtype)
    part = torch.empty(n_blocks, batch, n_proj, device=x.device, dtype=torch.float32)
    _conv_x_proj_kernel[(n_blocks,)](
        conv_state, x, keep, conv_weight, conv_bias, x_proj_weight, u, part, batch, dim, dt_rank, n_proj,
        *conv_state.stride(), *x.stride(), 0 if keep is None else keep.stride(0), *conv_weight.stride(),
        *x_proj_weight.stride(),
        HAS_BIAS=conv_bias is not None, HAS_KEEP=keep is not None, WIDTH=width,
        BLOCK_W=triton.next_power_of_2(max(width - 1, 1)), BLOCK_D=block_d_in,
        BLOCK_R=triton.next_power_of_2(dt_rank), BLOCK_BC=triton.next_power_of_2(2 * d_state), **pdl_launch(x),
    )
    y = torch.empty_like(u)
    _ssm_step_kernel[(batch, triton.cdiv(dim, block_c))](
        part, u, z, dt_proj_weight, dt_bias, dt_norm_weight, B_norm_weight, C_norm_weight, A_log, D, ssm_state, y,
        batch, dim, n_blocks, dt_rank, d_state, eps,
        *z.stride(), *dt_proj_weight.stride(), *A_log.stride(), *ssm_state.stride(),
        HAS_NORMS=dt_norm_weight is not None, BLOCK_BLOCKS=triton.next_power_of_2(n_blocks),
        BLOCK_R=triton.next_power_of_2(dt_rank), BLOCK_N=triton.next_power_of_2(d_state), BLOCK_C=block_c,
        **pdl_launch(x),
    )
    return y


@ssm_step_triton.register_fake
def _(conv_state, ssm_state, x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A_log, D,
      dt_norm_weight=None, B_norm_weight=None, C_norm_weight=None, eps=1e-6, keep=None, block_d_in=0, block_c=0):
    return x.new_empty(x.shape)


@torch.library.custom_op("hymba::ssm_step_rows", mutates_args=("conv_state", "ssm_state"))
def ssm_step_rows_triton(conv_state: torch.Tensor, ssm_state: torch.Tensor, x: torch.Tensor, z: torch.Tensor,
                         conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, x_proj_weight: torch.Tensor,
                         dt_proj_weight: torch.Tensor, dt_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor,
                         dt_norm_weight: torch.Tensor | None = None, B_norm_weight: torch.Tensor | None = None,
                         C_norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                         keep: torch.Tensor | None = None, block_c: int = 0, num_warps: int = 0) -> torch.Tensor:
    """As `ssm_step_triton`, for many rows: `ssm_step_inputs_triton`'s first three kernels, then dt_proj, the state
    update and the gate in one (`_dt_proj_state_kernel`). Zero launch parameters mean BLOCK_C_ROWS and
    NUM_WARPS_ROWS."""
    batch, dim = x.shape
    dt_rank = dt_proj_weight.shape[1]
    d_state = (x_proj_weight.shape[0] - dt_rank) // 2
    dot_fp32 = x.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    u, proj = _conv_x_proj_sums(conv_state, x, conv_weight, conv_bias, x_proj_weight, keep, BLOCK_D_X_PROJ, dot_fp32)
    y = torch.empty_like(u)
    block_c = block_c or BLOCK_C_ROWS
    _dt_proj_state_kernel[(triton.cdiv(batch, BLOCK_ROWS), triton.cdiv(dim, block_c))](
        proj, u, z, dt_proj_weight, dt_bias, dt_norm_weight, B_norm_weight, C_norm_weight, A_log, D, ssm_state, y,
        batch, dim, dt_rank, d_state, eps,
        *z.stride(), *dt_proj_weight.stride(), *A_log.stride(), *ssm_state.stride(),
        HAS_NORMS=dt_norm_weight is not None, BLOCK_B=BLOCK_ROWS, BLOCK_C=block_c,
        BLOCK_R=max(16, triton.next_power_of_2(dt_rank)), BLOCK_N=triton.next_power_of_2(d_state),
        DOT_FP32=dot_fp32, num_warps=num_warps or NUM_WARPS_ROWS, **pdl_launch(x),
    )
    return y


@ssm_step_rows_triton.register_fake
def _(conv_state, ssm_state, x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A_log, D,
      dt_norm_weight=None, B_norm_weight=None, C_norm_weight=None, eps=1e-6, keep=None, block_c=0, num_warps=0):
    return x.new_empty(x.shape)
