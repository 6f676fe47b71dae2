"""Mamba-1 selective scan in Triton: a fused forward, a Triton backward, and the one-token decode update.

Shapes and semantics are those of `hymba.ops.scan` (see its docstring and `reference.py`):

    u, delta, z: (batch, d_inner, L)    A: (d_inner, d_state)    B, C: (batch, d_state, L)    D: (d_inner,)

Forward (the standard Mamba-1 kernel layout): one program per (batch, block of BLOCK_D channels) keeps its
(d_state, BLOCK_D) float32 state in registers and walks L one position at a time, fusing
softplus(delta + bias), exp(dt*A), dt*B*u, C.h, the D skip and the silu(z) gate, so nothing of size
(batch, d_inner, L, d_state) ever reaches memory.

Backward walks L in reverse. The gradient needs h_{t-1} at every step, which the reverse walk cannot
recover (dividing out exp(dt*A) is unstable), so the forward saves the state at chunk boundaries (every
`chunk` positions: (batch, d_inner, L/chunk, d_state) float32); the backward recomputes the states of one
chunk into a per-program scratch buffer and then walks that chunk backwards. Reductions over channels
(dB, dC) are written as per-channel-block partial sums and reduced in PyTorch (deterministic, no atomics);
reductions over batch and time (dA, dD, d delta_bias) are accumulated in registers per program and reduced
over batch in PyTorch.

Triton is optional: this module is imported only when it is importable. Under TRITON_INTERPRET=1 the
kernels also take CPU tensors, which is how the tests exercise them without a GPU. Interpreter quirks: it
truncates float32 -> bf16 casts (a GPU rounds to nearest), tl.debug_barrier is a no-op there (each program
runs alone), and every call of a @triton.jit helper (tl.sum, _softplus) costs about a millisecond, so a
backward step takes ~15 ms per program: keep interpreted shapes small.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from hymba.ops.launch import pdl_launch, wait_for_inputs

__all__ = ["selective_scan_triton", "selective_state_update_triton"]

# Positions between saved states in the forward: the backward's scratch holds this many states per program.
DEFAULT_CHUNK = 64
# The walk backward's warps per program, and whether its reverse loop loads each step's inputs a step ahead (the
# recompute loop always loads four ahead): tuning knobs read at each backward, swept by benchmarks/bench_scan.py
# --backward. One warp (its channel sums stay inside the warp) loading a step ahead was the fastest on an H200
# (session 19, forward + backward per layer at 8 x 2,176, chunks of 32): 6.6 ms, against 13.0 with 4 warps and no
# prefetching, 7.2 with one warp and none, 14.0 with 2 warps and 37.1 with 8.
BACKWARD_WALK_WARPS = 1
BACKWARD_PREFETCH = True
# Segments of positions the walks split each (batch row, channel block) into, one program each, so that short grids
# still fill the GPU (`_scan_fwd_kernel`, `_scan_bwd_kernel`); None chooses them by `scan_segments` for the GPU's SMs.
# A walk has batch x d_inner / 32 programs, 800 for Hymba-1.5B at batch 8, where an H200's 132 SMs hold 2,112 of the
# segmented forward's at once (16 each at 128 registers a thread, `benchmarks/scan_sass.py --segments 5`) and 1,056
# of the segmented backward's (8 at 229), or 1,584 with BACKWARD_MAX_REGISTERS = 168 (12; its reverse loop then
# spills 4 of 541 instructions a step). Each segment past the first also costs a cheaper walk over it (its states, or
# its adjoint's carries), whose SASS instructions a position over the walk's are the *_EXTRA_COST: 120 / (824 / 4)
# and 141 / (483 / 4 + 528). Not yet timed on a GPU: sweep them with `benchmarks/bench_scan.py --segments`. 1, the
# default, is the one program per row and channel block measured so far, compiled as before (SEGMENTED off).
FORWARD_SEGMENTS: int | None = 1
BACKWARD_SEGMENTS: int | None = 1
BACKWARD_MAX_REGISTERS: int | None = None
FORWARD_REGISTERS, FORWARD_EXTRA_COST = 128, 0.58
BACKWARD_REGISTERS, BACKWARD_EXTRA_COST = 229, 0.22
# softplus(x) == x above this (torch.nn.functional.softplus's default threshold), and its gradient is 1.
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)
# Below this exp(x) softplus takes a series (see `_softplus`): about x < -3.5, where Mamba's dt biases start (dt from
# 1e-3 to 0.1 is softplus of -6.9 to -2.3).
SOFTPLUS_SERIES_BELOW = tl.constexpr(0.03)
# exp(x) is written exp2(x * log2 e), and the kernels hold A * log2 e: on sm_90 tl.exp is five instructions (the scaling
# and a guard against denormal results) where tl.exp2 is one MUFU.EX2 that flushes denormals to zero. The decays
# exp(dt*A) are the walks' busiest arithmetic: 16 per lane per step.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# softplus's logarithm as one MUFU.LG2 (lg2.approx.ftz: its argument, 1 + exp(x), is at least 1, never denormal) where
# the kernels compile for an NVIDIA GPU, in place of tl.log's libdevice polynomial (about 15 instructions). The walks
# take a softplus per channel and position: for sm_90 this and the series below e = 0.03 (see `_softplus`) took the
# backward's SASS instructions a position from 681 to 653 and the forward's from 219 to 202 (`benchmarks/scan_sass.py`),
# with a smaller error than before. tl.log2 under the interpreter, which runs no PTX, and on ROCm.
PTX_LOG2 = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1" and torch.version.hip is None)


def _block_d(d_inner: int, block_d: int | None) -> int:
    """Channels per program: 32 keeps ~(d_inner/32 * batch) programs in flight and a 32x16 state per program."""
    if block_d is not None:
        return block_d
    return min(32, triton.next_power_of_2(d_inner))


@triton.jit
def _softplus(x):
    """log(1 + e) with e = exp(x), as torch's softplus: x itself above its threshold (where e would overflow), and
    below e = SOFTPLUS_SERIES_BELOW the series e - e^2/2 + e^3/3 - e^4/4 (relative error under e^3/5, 5e-6 there),
    where the logarithm of 1 + e, rounded to float32, would lose most digits of a small result (as would
    lg2.approx's absolute error of 2^-22); torch takes log1p there."""
    e = tl.exp2(tl.minimum(x, SOFTPLUS_THRESHOLD) * LOG2E)
    if PTX_LOG2:
        log2 = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [1.0 + e], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        log2 = tl.log2(1.0 + e)
    series = e * (1.0 - e * (0.5 - e * (1.0 / 3.0 - e * 0.25)))
    return tl.where(x > SOFTPLUS_THRESHOLD, x, tl.where(e < SOFTPLUS_SERIES_BELOW, series, log2 * LN2))


@triton.jit
def _load_step(delta_ptrs, u_ptrs, B_ptrs, C_ptrs, z_ptrs, mask_d, mask_n, pos, length, HAS_Z: tl.constexpr):
    """Position `pos`'s (delta, u, B, C, z) as stored; zeros past the end, and z = 0 without a gate.

    The walks load a step ahead and convert in the step that uses them (`_to_f32`): a conversion next to its load
    would wait on the load at once, exposing its latency every step."""
    in_range = tl.full((1,), pos, tl.int32) < length  # a tensor, not a Python bool, so it can join the masks
    md, mn = mask_d & in_range, mask_n & in_range
    delta = tl.load(delta_ptrs, mask=md, other=0.0)
    u = tl.load(u_ptrs, mask=md, other=0.0)
    Bt = tl.load(B_ptrs, mask=mn, other=0.0)
    Ct = tl.load(C_ptrs, mask=mn, other=0.0)
    z = tl.load(z_ptrs, mask=md, other=0.0) if HAS_Z else tl.zeros_like(u)
    return delta, u, Bt, Ct, z


@triton.jit
def _to_f32(delta, u, Bt, Ct, z, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """A step's inputs as `_load_step` loaded them, in float32, with delta also as x = delta + bias and as
    dt = softplus(x) (or x): returns (x, dt, u, B, C, z)."""
    x, dt = _delta_to_dt(delta, bias, HAS_BIAS, SOFTPLUS)
    return x, dt, u.to(tl.float32), Bt.to(tl.float32), Ct.to(tl.float32), z.to(tl.float32)


@triton.jit
def _delta_to_dt(delta, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta as stored -> (x = delta + bias, dt = softplus(x), or x without softplus) in float32."""
    x = delta.to(tl.float32)
    if HAS_BIAS:
        x += bias
    dt = _softplus(x) if SOFTPLUS else x
    return x, dt


@triton.jit
def _fwd_program_start(A_ptr, D_ptr, bias_ptr, h0_ptr, pid_b, d_inner, d_state, stride_A_d, stride_A_n,
                       stride_h0_b, stride_h0_d, stride_h0_n, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_H0: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """A forward program's channels and states, and what it loads once: A (as A * log2 e) and the state h as
    (d_state, channels) tiles, the bias and D per channel (zeros when absent), h from h0 or zero."""
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d_inner
    mask_n = offs_n < d_state
    mask_nd = mask_n[:, None] & mask_d[None, :]
    # Padded lanes load A = 0 and u = B = C = 0, so their state stays 0 and nothing non-finite appears.
    A = tl.load(A_ptr + offs_n[:, None] * stride_A_n + offs_d[None, :] * stride_A_d, mask=mask_nd, other=0.0)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    D = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    h = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    if HAS_H0:
        h += tl.load(h0_ptr + pid_b * stride_h0_b + offs_n[:, None] * stride_h0_n + offs_d[None, :] * stride_h0_d,
                     mask=mask_nd, other=0.0).to(tl.float32)
    return offs_d, offs_n, mask_d, mask_n, A.to(tl.float32) * LOG2E, bias, D, h


@triton.jit
def _fwd_walk_position(h, inputs, ckpt_ptrs, pos, k: tl.constexpr, ptrs, steps, params, HAS_D: tl.constexpr,
                       HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, SAVE_CKPT: tl.constexpr,
                       CHUNK: tl.constexpr):
    """The forward walk's position `pos`, the k-th of its iteration: saves the state before it where a chunk starts,
    steps the state with the position's inputs as `_load_step` loaded them and stores y (at or past `length`, the
    identity and no store), then loads the inputs of position pos + 4. `ptrs` are (delta, u, B, C, z, y) at the
    iteration's first position, `steps` their strides over positions and the checkpoints' stride, `params` (A, bias,
    D, mask_d, mask_n, mask_nd, length). Returns (the state, those inputs, the checkpoint pointers)."""
    delta_ptrs, u_ptrs, B_ptrs, C_ptrs, z_ptrs, y_ptrs = ptrs
    stride_delta_l, stride_u_l, stride_B_l, stride_C_l, stride_z_l, stride_y_l, stride_ckpt_c = steps
    A, bias, D, mask_d, mask_n, mask_nd, length = params
    if SAVE_CKPT:
        if pos % CHUNK == 0:
            if pos < length:  # (the state after the last position is hlast, not a checkpoint)
                tl.store(ckpt_ptrs, h, mask=mask_nd)
                ckpt_ptrs += stride_ckpt_c
    delta_raw, u_raw, B_raw, C_raw, z_raw = inputs
    _, dt, u, Bt, Ct, z = _to_f32(delta_raw, u_raw, B_raw, C_raw, z_raw, bias, HAS_BIAS, SOFTPLUS)
    in_range = tl.full((1,), pos, tl.int32) < length
    dt = tl.where(in_range, dt, 0.0)
    h = tl.exp2(dt[None, :] * A) * h + Bt[:, None] * (dt * u)[None, :]
    y = tl.sum(h * Ct[:, None], axis=0)
    if HAS_D:
        y += D * u
    if HAS_Z:
        y = y * z / (1.0 + tl.exp2(-z * LOG2E))
    tl.store(y_ptrs + k * stride_y_l, y, mask=mask_d & in_range)
    ahead = k + 4
    inputs = _load_step(delta_ptrs + ahead * stride_delta_l, u_ptrs + ahead * stride_u_l, B_ptrs + ahead * stride_B_l,
                        C_ptrs + ahead * stride_C_l, z_ptrs + ahead * stride_z_l, mask_d, mask_n, pos + 4, length,
                        HAS_Z)
    return h, inputs, ckpt_ptrs


@triton.jit
def _program_channels(d_inner, d_state, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The channels (block program_id(1)) and states of a segment walk's program, and their masks."""
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    return offs_d, offs_n, offs_d < d_inner, offs_n < d_state


@triton.jit
def _segment_starts_kernel(
    ends_ptr, dt_sums_ptr, A_ptr, init_ptr, starts_ptr,
    d_inner, d_state, n_segments, stride_A_d, stride_A_n, stride_init_b, stride_init_d, stride_init_n,
    HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """What each segment of a walk starts from, for one (batch, channel block): starts (batch, n_segments, d_inner,
    d_state). Forward: segment 0 starts from init (the initial state, or zero), and segment s + 1 from ends[s] +
    exp(A dt_sums[s]) starts[s], where ends[s] is the state segment s leaves from a zero start
    (`_scan_fwd_states_kernel`). With REVERSE the same from the last segment back (the backward's carries: init is
    dL/dh_last, and ends[s - 1], dt_sums[s - 1] are segment s's, `_scan_bwd_carries_kernel`). ends (batch,
    n_segments - 1, d_inner, d_state) and dt_sums (batch, n_segments - 1, d_inner)."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d, offs_n, mask_d, mask_n = _program_channels(d_inner, d_state, BLOCK_D, BLOCK_N)
    mask_dn = mask_d[:, None] & mask_n[None, :]
    tile = offs_d[:, None] * d_state + offs_n[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * stride_A_d + offs_n[None, :] * stride_A_n, mask=mask_dn, other=0.0)
    A = A.to(tl.float32) * LOG2E
    h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    if HAS_INIT:
        h += tl.load(init_ptr + pid_b * stride_init_b + offs_d[:, None] * stride_init_d
                     + offs_n[None, :] * stride_init_n, mask=mask_dn, other=0.0).to(tl.float32)
    segment = n_segments - 1 if REVERSE else 0
    tl.store(starts_ptr + (pid_b * n_segments + segment) * d_inner * d_state + tile, h, mask=mask_dn)
    for i in range(0, n_segments - 1):
        slot = n_segments - 2 - i if REVERSE else i  # the segment whose end folds in: slot + 1 with REVERSE, else slot
        ended = pid_b * (n_segments - 1) + slot
        dt_sum = tl.load(dt_sums_ptr + ended * d_inner + offs_d, mask=mask_d, other=0.0)
        end = tl.load(ends_ptr + ended * d_inner * d_state + tile, mask=mask_dn, other=0.0)
        h = end + tl.exp2(dt_sum[:, None] * A) * h
        segment = slot if REVERSE else slot + 1
        tl.store(starts_ptr + (pid_b * n_segments + segment) * d_inner * d_state + tile, h, mask=mask_dn)


def _segment_starts(ends, dt_sums, A, init, reverse, block_d):
    """`_segment_starts_kernel` over the (batch, channel blocks) of `ends` (batch, n_segments - 1, d_inner, d_state):
    returns starts (batch, n_segments, d_inner, d_state)."""
    batch, gaps, d_inner, d_state = ends.shape
    starts = torch.empty(batch, gaps + 1, d_inner, d_state, device=ends.device, dtype=torch.float32)
    _segment_starts_kernel[(batch, triton.cdiv(d_inner, block_d))](
        ends, dt_sums, A, init, starts, d_inner, d_state, gaps + 1, *A.stride(), *_strides3(init),
        HAS_INIT=init is not None, REVERSE=reverse, BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(d_state),
        num_warps=1)
    return starts


@triton.jit
def _scan_fwd_states_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr, states_ptr, dt_sums_ptr,
    d_inner, d_state, segment_len,
    stride_u_b, stride_u_d, stride_u_l,
    stride_delta_b, stride_delta_d, stride_delta_l,
    stride_A_d, stride_A_n,
    stride_B_b, stride_B_n, stride_B_l,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Segment program_id(2) of the forward's (see `_scan_fwd_kernel`; every segment but the last, so all of them
    full), for one (batch, channel block): walks it from a zero state with the recurrence alone (no outputs), and
    stores the state it leaves and its sum of dt (for `_segment_starts`): the state entering the segment adds
    exp(A sum dt) times itself to that, the product of its decays."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d, offs_n, mask_d, mask_n = _program_channels(d_inner, d_state, BLOCK_D, BLOCK_N)
    mask_nd = mask_n[:, None] & mask_d[None, :]
    first = tl.program_id(2) * segment_len
    A = tl.load(A_ptr + offs_n[:, None] * stride_A_n + offs_d[None, :] * stride_A_d, mask=mask_nd, other=0.0)
    A = A.to(tl.float32) * LOG2E
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    u_ptrs = u_ptr + pid_b * stride_u_b + offs_d * stride_u_d + first * stride_u_l
    delta_ptrs = delta_ptr + pid_b * stride_delta_b + offs_d * stride_delta_d + first * stride_delta_l
    B_ptrs = B_ptr + pid_b * stride_B_b + offs_n * stride_B_n + first * stride_B_l
    h = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dt_sum = tl.zeros((BLOCK_D,), tl.float32)
    # Each step's inputs are loaded a step ahead and converted in the step that uses them, as in the walks (the
    # segment is full, so the load past its end reads the next segment's first position, unused).
    delta, u, Bt = (tl.load(delta_ptrs, mask=mask_d, other=0.0), tl.load(u_ptrs, mask=mask_d, other=0.0),
                    tl.load(B_ptrs, mask=mask_n, other=0.0))
    for _ in range(0, segment_len):
        delta_ptrs += stride_delta_l
        u_ptrs += stride_u_l
        B_ptrs += stride_B_l
        delta_next, u_next, B_next = (tl.load(delta_ptrs, mask=mask_d, other=0.0),
                                      tl.load(u_ptrs, mask=mask_d, other=0.0), tl.load(B_ptrs, mask=mask_n, other=0.0))
        _, dt = _delta_to_dt(delta, bias, HAS_BIAS, SOFTPLUS)
        h = tl.exp2(dt[None, :] * A) * h + Bt.to(tl.float32)[:, None] * (dt * u.to(tl.float32))[None, :]
        dt_sum += dt
        delta, u, Bt = delta_next, u_next, B_next

    slot = pid_b * tl.num_programs(2) + tl.program_id(2)
    tl.store(states_ptr + (slot * d_inner + offs_d[None, :]) * d_state + offs_n[:, None], h, mask=mask_nd)
    tl.store(dt_sums_ptr + slot * d_inner + offs_d, dt_sum, mask=mask_d)


@triton.jit
def _linear_recurrence(a1, b1, a2, b2):
    """Composes h -> a1 h + b1, then h -> a2 h + b2 (the associative step of h_t = a_t h_{t-1} + b_t)."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, starts_ptr,
    y_ptr, hlast_ptr, ckpt_ptr,
    d_inner, d_state, length, segment_len,
    stride_u_b, stride_u_d, stride_u_l,
    stride_delta_b, stride_delta_d, stride_delta_l,
    stride_A_d, stride_A_n,
    stride_B_b, stride_B_n, stride_B_l,
    stride_C_b, stride_C_n, stride_C_l,
    stride_z_b, stride_z_d, stride_z_l,
    stride_h0_b, stride_h0_d, stride_h0_n,
    stride_y_b, stride_y_d, stride_y_l,
    stride_ckpt_b, stride_ckpt_d, stride_ckpt_c,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, SAVE_CKPT: tl.constexpr, SEGMENTED: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """One program: batch `pid_b`, channels [pid_d*BLOCK_D, +BLOCK_D), segment program_id(2) of
    `segment_len` positions (with one segment, all L), its positions in order: one at a time
    (BLOCK_L = 1, the walk) or BLOCK_L at a time (BLOCK_L dividing CHUNK), a block's inputs loaded as tiles and its
    states given by an associative scan over the block ((BLOCK_L, BLOCK_N, BLOCK_D), log2(BLOCK_L) levels), so that
    only the carry from block to block is sequential. Past the end a block takes identity steps (dt = 0).

    y (batch, d_inner, L; any strides), hlast (batch, d_inner, d_state) and ckpt (batch, d_inner, n_chunks, d_state,
    last dim contiguous) are outputs; ckpt[:, :, c] is the state *before* position c*CHUNK (only when SAVE_CKPT).

    The state tile is (d_state, channels): channels run across a warp's lanes and each lane keeps its channel's
    d_state values in registers, so C.h sums inside a thread, without shuffles, on the walk's critical path.

    With SEGMENTED a segment starts from the state the earlier ones leave, starts (batch, n_segments, d_inner,
    d_state; `_segment_starts`, the initial state folded in, so h0 is not read), and only the last one stores hlast.
    Segments start at multiples of 4, of CHUNK (when SAVE_CKPT) and of BLOCK_L.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    segment = tl.program_id(2)
    offs_d, offs_n, mask_d, mask_n, A, bias, D, h = _fwd_program_start(
        A_ptr, D_ptr, bias_ptr, h0_ptr, pid_b, d_inner, d_state, stride_A_d, stride_A_n, stride_h0_b, stride_h0_d,
        stride_h0_n, HAS_D, HAS_BIAS, HAS_H0, BLOCK_D, BLOCK_N)
    mask_nd = mask_n[:, None] & mask_d[None, :]
    if SEGMENTED:
        h = tl.load(starts_ptr + ((pid_b * tl.num_programs(2) + segment) * d_inner + offs_d[None, :]) * d_state
                    + offs_n[:, None], mask=mask_nd, other=0.0)
    # This segment's positions: [first, end). Written so that the compiler knows first is a multiple of 4 (the launcher
    # makes it one), and so that of the walk's four positions an iteration only the first can start a chunk.
    first = 0
    end = length
    if SEGMENTED:
        first = segment * (segment_len // 4) * 4
        end = tl.minimum(first + segment_len, length)

    ckpt_ptrs = hlast_ptr + offs_n[:, None] + offs_d[None, :]  # a stand-in of the same type, never written
    if SAVE_CKPT:
        ckpt_ptrs = (ckpt_ptr + pid_b * stride_ckpt_b + (first // CHUNK) * stride_ckpt_c + offs_n[:, None]
                     + offs_d[None, :] * stride_ckpt_d)

    if BLOCK_L > 1:
        offs_l = tl.arange(0, BLOCK_L)
        last = (offs_l == BLOCK_L - 1)[:, None, None]

        for start in range(first, end, BLOCK_L):
            if SAVE_CKPT:
                if start % CHUNK == 0:
                    tl.store(ckpt_ptrs, h, mask=mask_nd)
                    ckpt_ptrs += stride_ckpt_c
            pos = start + offs_l
            mask_ld = (pos < end)[:, None] & mask_d[None, :]  # (BLOCK_L, BLOCK_D)
            mask_ln = (pos < end)[:, None] & mask_n[None, :]  # (BLOCK_L, BLOCK_N)
            delta = tl.load(delta_ptr + pid_b * stride_delta_b + pos[:, None] * stride_delta_l
                            + offs_d[None, :] * stride_delta_d, mask=mask_ld, other=0.0)
            u = tl.load(u_ptr + pid_b * stride_u_b + pos[:, None] * stride_u_l + offs_d[None, :] * stride_u_d,
                        mask=mask_ld, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + pid_b * stride_B_b + pos[:, None] * stride_B_l + offs_n[None, :] * stride_B_n,
                         mask=mask_ln, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + pid_b * stride_C_b + pos[:, None] * stride_C_l + offs_n[None, :] * stride_C_n,
                         mask=mask_ln, other=0.0).to(tl.float32)
            _, dt = _delta_to_dt(delta, bias[None, :], HAS_BIAS, SOFTPLUS)
            dt = tl.where(mask_ld, dt, 0.0)  # the identity step past the end (softplus(0) is not 0)
            decay = tl.exp2(dt[:, None, :] * A[None, :, :])  # (BLOCK_L, BLOCK_N, BLOCK_D)
            inputs = Bt[:, :, None] * (dt * u)[:, None, :]
            decay, inputs = tl.associative_scan((decay, inputs), 0, _linear_recurrence)
            states = decay * h[None, :, :] + inputs  # every position's state, the carry folded in
            y = tl.sum(states * Ct[:, :, None], axis=1)  # (BLOCK_L, BLOCK_D)
            h = tl.sum(tl.where(last, states, 0.0), axis=0)
            if HAS_D:
                y += D[None, :] * u
            if HAS_Z:
                z = tl.load(z_ptr + pid_b * stride_z_b + pos[:, None] * stride_z_l + offs_d[None, :] * stride_z_d,
                            mask=mask_ld, other=0.0).to(tl.float32)
                y = y * z / (1.0 + tl.exp2(-z * LOG2E))
            tl.store(y_ptr + pid_b * stride_y_b + pos[:, None] * stride_y_l + offs_d[None, :] * stride_y_d, y,
                     mask=mask_ld)
    else:
        # Pointers at the segment's first position.
        u_ptrs = u_ptr + pid_b * stride_u_b + offs_d * stride_u_d + first * stride_u_l
        delta_ptrs = delta_ptr + pid_b * stride_delta_b + offs_d * stride_delta_d + first * stride_delta_l
        B_ptrs = B_ptr + pid_b * stride_B_b + offs_n * stride_B_n + first * stride_B_l
        C_ptrs = C_ptr + pid_b * stride_C_b + offs_n * stride_C_n + first * stride_C_l
        y_ptrs = y_ptr + pid_b * stride_y_b + offs_d * stride_y_d + first * stride_y_l
        z_ptrs = u_ptrs  # never read without a gate
        if HAS_Z:
            z_ptrs = z_ptr + pid_b * stride_z_b + offs_d * stride_z_d + first * stride_z_l

        # Four positions an iteration, each from its own set of inputs, reloaded four positions ahead once its position
        # is done (as the backward's recompute: a load has three steps' work to arrive in, and no copy at the loop's
        # end waits on it). Positions past the end are identity steps with their output stores masked off. Loading
        # a step ahead at all gave 22% less scan time on an H100 (measured before the state tile was transposed).
        set0 = _load_step(delta_ptrs, u_ptrs, B_ptrs, C_ptrs, z_ptrs, mask_d, mask_n, first, end, HAS_Z)
        set1 = _load_step(delta_ptrs + stride_delta_l, u_ptrs + stride_u_l, B_ptrs + stride_B_l, C_ptrs + stride_C_l,
                          z_ptrs + stride_z_l, mask_d, mask_n, first + 1, end, HAS_Z)
        set2 = _load_step(delta_ptrs + 2 * stride_delta_l, u_ptrs + 2 * stride_u_l, B_ptrs + 2 * stride_B_l,
                          C_ptrs + 2 * stride_C_l, z_ptrs + 2 * stride_z_l, mask_d, mask_n, first + 2, end, HAS_Z)
        set3 = _load_step(delta_ptrs + 3 * stride_delta_l, u_ptrs + 3 * stride_u_l, B_ptrs + 3 * stride_B_l,
                          C_ptrs + 3 * stride_C_l, z_ptrs + 3 * stride_z_l, mask_d, mask_n, first + 3, end, HAS_Z)
        steps = (stride_delta_l, stride_u_l, stride_B_l, stride_C_l, stride_z_l, stride_y_l, stride_ckpt_c)
        params = (A, bias, D, mask_d, mask_n, mask_nd, end)
        for step in range(0, end - first, 4):
            t = first + step
            ptrs = (delta_ptrs, u_ptrs, B_ptrs, C_ptrs, z_ptrs, y_ptrs)
            h, set0, ckpt_ptrs = _fwd_walk_position(h, set0, ckpt_ptrs, t + 0, 0, ptrs, steps, params, HAS_D, HAS_Z,
                                                   HAS_BIAS, SOFTPLUS, SAVE_CKPT, CHUNK)
            h, set1, ckpt_ptrs = _fwd_walk_position(h, set1, ckpt_ptrs, t + 1, 1, ptrs, steps, params, HAS_D, HAS_Z,
                                                   HAS_BIAS, SOFTPLUS, SAVE_CKPT, CHUNK)
            h, set2, ckpt_ptrs = _fwd_walk_position(h, set2, ckpt_ptrs, t + 2, 2, ptrs, steps, params, HAS_D, HAS_Z,
                                                   HAS_BIAS, SOFTPLUS, SAVE_CKPT, CHUNK)
            h, set3, ckpt_ptrs = _fwd_walk_position(h, set3, ckpt_ptrs, t + 3, 3, ptrs, steps, params, HAS_D, HAS_Z,
                                                   HAS_BIAS, SOFTPLUS, SAVE_CKPT, CHUNK)
            delta_ptrs += 4 * stride_delta_l
            u_ptrs += 4 * stride_u_l
            B_ptrs += 4 * stride_B_l
            C_ptrs += 4 * stride_C_l
            z_ptrs += 4 * stride_z_l
            y_ptrs += 4 * stride_y_l

    if segment == tl.num_programs(2) - 1:
        tl.store(hlast_ptr + (pid_b * d_inner + offs_d[None, :]) * d_state + offs_n[:, None], h, mask=mask_nd)


@triton.jit
def _load_dt(delta_ptr, bias, offs, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(delta + bias, dt) as float32 at `offs`, dt = 0 where `mask` is off (the identity step)."""
    x, dt = _delta_to_dt(tl.load(delta_ptr + offs, mask=mask, other=0.0), bias, HAS_BIAS, SOFTPLUS)
    return x, tl.where(mask, dt, 0.0)


@triton.jit
def _load_recompute_step(delta_ptrs, u_ptrs, B_ptrs, mask_d, mask_n, i, chunk_len):
    """Step `i` of a chunk's recompute: (delta, u, B) as stored (see `_load_step`), zeros past the chunk's end."""
    in_range = tl.full((1,), i, tl.int32) < chunk_len
    md = mask_d & in_range
    delta = tl.load(delta_ptrs, mask=md, other=0.0)
    u = tl.load(u_ptrs, mask=md, other=0.0)
    Bt = tl.load(B_ptrs, mask=mask_n & in_range, other=0.0)
    return delta, u, Bt


@triton.jit
def _recompute_position(h, inputs, i, k: tl.constexpr, ptrs, steps, A, bias, mask_d, mask_n, chunk_len,
                        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Position i of a chunk's recompute, the k-th of its iteration: saves the state before it in the scratch, steps
    the state with the position's inputs as `_load_recompute_step` loaded them (past the chunk's end, the identity:
    dt = 0), then loads the inputs of position i + 4. `ptrs` are (delta, u, B, scratch) at the iteration's first
    position and `steps` their strides over positions. Returns (the state, those inputs)."""
    delta_ptrs, u_ptrs, B_ptrs, scratch_ptrs = ptrs
    stride_delta_l, stride_u_l, stride_B_l, tile = steps
    tl.store(scratch_ptrs + k * tile, h)
    delta, u, Bt = inputs
    _, dt = _delta_to_dt(delta, bias, HAS_BIAS, SOFTPLUS)
    dt = tl.where(i < chunk_len, dt, 0.0)
    h = tl.exp2(dt[:, None] * A) * h + (dt * u.to(tl.float32))[:, None] * Bt.to(tl.float32)[None, :]
    ahead = k + 4
    inputs = _load_recompute_step(delta_ptrs + ahead * stride_delta_l, u_ptrs + ahead * stride_u_l,
                                  B_ptrs + ahead * stride_B_l, mask_d, mask_n, i + 4, chunk_len)
    return h, inputs


@triton.jit
def _load_reverse_step(scratch_ptrs, delta_ptrs, u_ptrs, B_ptrs, C_ptrs, dout_ptrs, z_ptrs, mask_d, mask_n, i_rev,
                       chunk_len, HAS_DOUT: tl.constexpr, HAS_Z: tl.constexpr):
    """Step `i_rev` from a chunk's end in the reverse walk: h_{t-1} from the scratch (float32), and delta, u, B, C,
    the output gradient and z as stored (see `_load_step`); zeros once past the chunk's start, and for an absent
    output gradient or gate."""
    in_range = tl.full((1,), i_rev, tl.int32) < chunk_len
    md, mn = mask_d & in_range, mask_n & in_range
    h_prev = tl.load(scratch_ptrs, mask=md[:, None] & mn[None, :], other=0.0)  # padded lanes' states are 0 anyway
    delta, u, Bt, Ct, z = _load_step(delta_ptrs, u_ptrs, B_ptrs, C_ptrs, z_ptrs, mask_d, mask_n, i_rev, chunk_len,
                                     HAS_Z)
    gy = tl.load(dout_ptrs, mask=md, other=0.0) if HAS_DOUT else tl.zeros_like(u)
    return h_prev, delta, u, Bt, Ct, gy, z


@triton.jit
def _load_carry_step(delta_ptrs, C_ptrs, dout_ptrs, z_ptrs, mask_d, mask_n, in_range, HAS_DOUT: tl.constexpr,
                     HAS_Z: tl.constexpr):
    """A position's (delta, C, output gradient, z) as stored, for `_scan_bwd_carries_kernel`; zeros out of range."""
    md = mask_d & in_range
    delta = tl.load(delta_ptrs, mask=md, other=0.0)
    Ct = tl.load(C_ptrs, mask=mask_n & in_range, other=0.0)
    gy = tl.load(dout_ptrs, mask=md, other=0.0) if HAS_DOUT else tl.zeros_like(delta)
    z = tl.load(z_ptrs, mask=md, other=0.0) if HAS_Z else tl.zeros_like(delta)
    return delta, Ct, gy, z


@triton.jit
def _scan_bwd_carries_kernel(
    delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dout_ptr, carries_ptr, dt_sums_ptr,
    d_inner, d_state, length, segment_len,
    stride_delta_b, stride_delta_d, stride_delta_l,
    stride_A_d, stride_A_n,
    stride_C_b, stride_C_n, stride_C_l,
    stride_z_b, stride_z_d, stride_z_l,
    stride_dout_b, stride_dout_d, stride_dout_l,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DOUT: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Segment 1 + program_id(2) of the backward's (see `_scan_bwd_kernel`), for one (batch, channel block): walks
    it backwards from a zero carry with the adjoint's recurrence alone (g = gy C + carry, carry = a g; no states),
    and stores the carry it passes to the segment before it and its sum of dt (for `_segment_starts`): the carry
    entering the segment from later positions then adds exp(A sum dt) times itself, the product of its decays."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d, offs_n, mask_d, mask_n = _program_channels(d_inner, d_state, BLOCK_D, BLOCK_N)
    mask_dn = mask_d[:, None] & mask_n[None, :]
    segment = tl.program_id(2) + 1
    start = segment * segment_len
    steps = tl.minimum(length - start, segment_len)

    A = tl.load(A_ptr + offs_d[:, None] * stride_A_d + offs_n[None, :] * stride_A_n, mask=mask_dn, other=0.0)
    A = A.to(tl.float32) * LOG2E
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    t = start + steps - 1  # the segment's last position, walked first
    delta_ptrs = delta_ptr + pid_b * stride_delta_b + offs_d * stride_delta_d + t * stride_delta_l
    C_ptrs = C_ptr + pid_b * stride_C_b + offs_n * stride_C_n + t * stride_C_l
    dout_ptrs = delta_ptrs  # never read without an output gradient or a gate
    if HAS_DOUT:
        dout_ptrs = dout_ptr + pid_b * stride_dout_b + offs_d * stride_dout_d + t * stride_dout_l
    z_ptrs = delta_ptrs
    if HAS_Z:
        z_ptrs = z_ptr + pid_b * stride_z_b + offs_d * stride_z_d + t * stride_z_l
    carry = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dt_sum = tl.zeros((BLOCK_D,), tl.float32)
    # Each step's inputs are loaded a step ahead and converted in the step that uses them, as in the walks.
    inputs = _load_carry_step(delta_ptrs, C_ptrs, dout_ptrs, z_ptrs, mask_d, mask_n, tl.full((1,), True, tl.int1),
                              HAS_DOUT, HAS_Z)
    for i in range(0, steps):
        delta_ptrs -= stride_delta_l
        C_ptrs -= stride_C_l
        dout_ptrs -= stride_dout_l
        z_ptrs -= stride_z_l
        delta, Ct, gy, z = inputs
        inputs = _load_carry_step(delta_ptrs, C_ptrs, dout_ptrs, z_ptrs, mask_d, mask_n,
                                  tl.full((1,), i + 1, tl.int32) < steps, HAS_DOUT, HAS_Z)
        _, dt = _delta_to_dt(delta, bias, HAS_BIAS, SOFTPLUS)
        gy = gy.to(tl.float32)
        if HAS_Z:
            z = z.to(tl.float32)
            gy = gy * z / (1.0 + tl.exp2(-z * LOG2E))
        carry = (gy[:, None] * Ct.to(tl.float32)[None, :] + carry) * tl.exp2(dt[:, None] * A)
        dt_sum += dt

    slot = pid_b * tl.num_programs(2) + tl.program_id(2)
    tl.store(carries_ptr + (slot * d_inner + offs_d[:, None]) * d_state + offs_n[None, :], carry, mask=mask_dn)
    tl.store(dt_sums_ptr + slot * d_inner + offs_d, dt_sum, mask=mask_d)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr, dout_ptr, dhlast_ptr, carries_ptr,
    scratch_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    d_inner, d_state, length, segment_chunks,
    stride_u_b, stride_u_d, stride_u_l,
    stride_delta_b, stride_delta_d, stride_delta_l,
    stride_A_d, stride_A_n,
    stride_B_b, stride_B_n, stride_B_l,
    stride_C_b, stride_C_n, stride_C_l,
    stride_z_b, stride_z_d, stride_z_l,
    stride_ckpt_b, stride_ckpt_d, stride_ckpt_c,
    stride_dout_b, stride_dout_d, stride_dout_l,
    stride_dhlast_b, stride_dhlast_d, stride_dhlast_n,
    stride_out_b, stride_out_d, stride_out_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DOUT: tl.constexpr,
    HAS_DHLAST: tl.constexpr, SOFTPLUS: tl.constexpr, SEGMENTED: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PARALLEL: tl.constexpr, PREFETCH: tl.constexpr,
):
    """Reverse walk for one (batch, channel block, segment): the segment's chunks, from its last.

    With g_t = dL/dh_t (all paths), a_t = exp(dt_t*A) and gy = dout * silu(z):
        g_t = gy_t C_t + a_{t+1} g_{t+1}   (+ dL/dh_last at t = L-1)
        dC_t = sum_d gy_t h_t      dB_t = sum_d g_t dt_t u_t      du_t = gy_t D + dt_t sum_n g_t B_t
        d dt_t = u_t sum_n g_t B_t + sum_n g_t h_{t-1} a_t A      dA = sum_{b,t} g_t h_{t-1} a_t dt_t
        dz_t = dout_t (C_t.h_t + D u_t) silu'(z_t)      dD = sum_{b,t} gy_t u_t      dh0 = a_0 g_0
    Outputs: du, ddelta, dz (batch, d_inner, L) with the strides `stride_out_*` (position-major, as the model's
    activations, so each position writes one contiguous run of channels); dA (batch, n_segments, d_inner, d_state),
    dD and dbias (batch, n_segments, d_inner): per batch element and segment; dB, dC (batch, n_dblocks, L, d_state)
    contiguous: per channel block, one contiguous run of states per position; dh0 (batch, d_inner, d_state), from
    segment 0. scratch (batch, n_dblocks, n_segments, CHUNK, BLOCK_D, BLOCK_N) holds this program's recomputed states.

    A segment is `segment_chunks` chunks; with SEGMENTED there are several, one program each, so that short grids
    (few batch rows x channel blocks) still fill the GPU. The only thing a segment needs from the later ones is the
    carry entering its last position, and that depends on their dt, C, z and dout alone, not on their states:
    `_scan_bwd_carries_kernel` walks each later segment from a zero carry, and `_segment_starts` folds those walks'
    carries out into each segment's carry in (carries, (batch, n_segments, d_inner, d_state), dL/dh_last folded in,
    so dhlast is not read).

    With PARALLEL a chunk is done at once from its checkpoint, without the scratch: the states h_t and the states
    before each position h_{t-1} come from two associative scans forward (the second over the inputs shifted by
    one), the adjoint g from one in reverse, and only the carry passes from chunk to chunk. Tiles are then (CHUNK,
    BLOCK_D, BLOCK_N), and positions past the end identity steps with no output gradient.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    segment = tl.program_id(2)
    n_dblocks = tl.num_programs(1)
    n_segments = tl.num_programs(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d_inner
    mask_n = offs_n < d_state
    mask_dn = mask_d[:, None] & mask_n[None, :]

    A = tl.load(A_ptr + offs_d[:, None] * stride_A_d + offs_n[None, :] * stride_A_n, mask=mask_dn, other=0.0)
    A = A.to(tl.float32) * LOG2E  # A * log2 e from here on: exp(dt*A) = exp2(dt * this), see LOG2E
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    # carry = a_{t+1} g_{t+1}: the part of g_t that flows back from later positions.
    if SEGMENTED:
        carry = tl.load(carries_ptr + ((pid_b * n_segments + segment) * d_inner + offs_d[:, None]) * d_state
                        + offs_n[None, :], mask=mask_dn, other=0.0)
    elif HAS_DHLAST:
        carry = tl.load(dhlast_ptr + pid_b * stride_dhlast_b + offs_d[:, None] * stride_dhlast_d
                        + offs_n[None, :] * stride_dhlast_n, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), tl.float32)

    # This segment's chunks: [first_chunk, first_chunk + n_chunks), walked from the last.
    first_chunk = 0
    n_chunks = tl.cdiv(length, CHUNK)
    if SEGMENTED:
        first_chunk = segment * segment_chunks
        n_chunks = tl.minimum(n_chunks - first_chunk, segment_chunks)
    if PARALLEL:
        offs_l = tl.arange(0, CHUNK)
        first = (offs_l == 0)[:, None, None]
        A3 = A[None, :, :]  # (1, BLOCK_D, BLOCK_N)
        for c_rev in range(0, n_chunks):
            c = first_chunk + n_chunks - 1 - c_rev
            pos = c * CHUNK + offs_l  # (CHUNK,)
            here = pos < length
            before = here & (offs_l > 0)  # position t-1 inside this chunk (the first row's comes from the checkpoint)
            after = (pos + 1 < length) & (offs_l < CHUNK - 1)  # position t+1 inside this chunk
            m_here = here[:, None] & mask_d[None, :]  # (Triton's compiler takes no generator expressions)
            m_before = before[:, None] & mask_d[None, :]
            m_after = after[:, None] & mask_d[None, :]
            d_offs = (pos[:, None] * stride_delta_l + offs_d[None, :] * stride_delta_d) + pid_b * stride_delta_b
            u_offs = (pos[:, None] * stride_u_l + offs_d[None, :] * stride_u_d) + pid_b * stride_u_b
            B_offs = (pos[:, None] * stride_B_l + offs_n[None, :] * stride_B_n) + pid_b * stride_B_b
            mask_ln = here[:, None] & mask_n[None, :]
            x, dt = _load_dt(delta_ptr, bias[None, :], d_offs, m_here, HAS_BIAS, SOFTPLUS)
            _, dt_before = _load_dt(delta_ptr, bias[None, :], d_offs - stride_delta_l, m_before, HAS_BIAS, SOFTPLUS)
            _, dt_after = _load_dt(delta_ptr, bias[None, :], d_offs + stride_delta_l, m_after, HAS_BIAS, SOFTPLUS)
            u = tl.load(u_ptr + u_offs, mask=m_here, other=0.0).to(tl.float32)
            u_before = tl.load(u_ptr + u_offs - stride_u_l, mask=m_before, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + B_offs, mask=mask_ln, other=0.0).to(tl.float32)
            B_before = tl.load(B_ptr + B_offs - stride_B_l, mask=before[:, None] & mask_n[None, :],
                               other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + pid_b * stride_C_b + pos[:, None] * stride_C_l + offs_n[None, :] * stride_C_n,
                         mask=mask_ln, other=0.0).to(tl.float32)

            # States from the chunk's checkpoint: h_t, and h_{t-1} from the same scan over the inputs shifted by one.
            h_start = tl.load(ckpt_ptr + pid_b * stride_ckpt_b + c * stride_ckpt_c + offs_d[:, None] * stride_ckpt_d
                              + offs_n[None, :], mask=mask_dn, other=0.0)[None, :, :]
            a = tl.exp2(dt[:, :, None] * A3)  # (CHUNK, BLOCK_D, BLOCK_N)
            decay, inputs = tl.associative_scan((a, (dt * u)[:, :, None] * Bt[:, None, :]), 0, _linear_recurrence)
            h = decay * h_start + inputs
            decay, inputs = tl.associative_scan((tl.exp2(dt_before[:, :, None] * A3),
                                                 (dt_before * u_before)[:, :, None] * B_before[:, None, :]), 0,
                                                _linear_recurrence)
            h_prev = decay * h_start + inputs

            gy = tl.zeros((CHUNK, BLOCK_D), tl.float32)
            if HAS_DOUT:
                gy = tl.load(dout_ptr + pid_b * stride_dout_b + pos[:, None] * stride_dout_l
                             + offs_d[None, :] * stride_dout_d, mask=m_here, other=0.0).to(tl.float32)
            out_offs = pid_b * stride_out_b + offs_d[None, :] * stride_out_d + pos[:, None] * stride_out_l
            if HAS_Z:
                z = tl.load(z_ptr + pid_b * stride_z_b + pos[:, None] * stride_z_l + offs_d[None, :] * stride_z_d,
                            mask=m_here, other=0.0).to(tl.float32)
                sig_z = 1.0 / (1.0 + tl.exp2(-z * LOG2E))
                y_pre = tl.sum(h * Ct[:, None, :], axis=2)
                if HAS_D:
                    y_pre += D[None, :] * u
                tl.store(dz_ptr + out_offs, gy * y_pre * sig_z * (1.0 + z * (1.0 - sig_z)), mask=m_here)
                gy = gy * z * sig_z  # now d loss / d (C.h + D u)

            # The adjoint, from the chunk's end (where the carry from the next chunk enters) to its start.
            decay, g = tl.associative_scan((tl.exp2(dt_after[:, :, None] * A3), gy[:, :, None] * Ct[:, None, :]), 0,
                                           _linear_recurrence, reverse=True)
            g = decay * carry[None, :, :] + g
            carry = tl.sum(tl.where(first, g * a, 0.0), axis=0)

            dBC_offs = ((pid_b * n_dblocks + pid_d) * length + pos[:, None]) * d_state + offs_n[None, :]
            tl.store(dC_ptr + dBC_offs, tl.sum(gy[:, :, None] * h, axis=1), mask=mask_ln)
            tl.store(dB_ptr + dBC_offs, tl.sum(g * (dt * u)[:, :, None], axis=1), mask=mask_ln)
            gB = tl.sum(g * Bt[:, None, :], axis=2)
            g_decay = g * h_prev * a  # d loss / d (dt*A), elementwise
            ddelta = u * gB + tl.sum(g_decay * A3, axis=2) * LN2
            if SOFTPLUS:
                ddelta = tl.where(x > SOFTPLUS_THRESHOLD, ddelta, ddelta / (1.0 + tl.exp2(-x * LOG2E)))
            du = dt * gB
            if HAS_D:
                du += gy * D[None, :]
                dD_acc += tl.sum(gy * u, axis=0)
            tl.store(du_ptr + out_offs, du, mask=m_here)
            tl.store(ddelta_ptr + out_offs, ddelta, mask=m_here)
            dA_acc += tl.sum(g_decay * dt[:, :, None], axis=0)
            dbias_acc += tl.sum(tl.where(m_here, ddelta, 0.0), axis=0)
    else:
        # Position-0 pointers for this program; each chunk offsets them to where it starts. Without a gate or an output
        # gradient their pointers stand in for u's (never read).
        u_ptrs0 = u_ptr + pid_b * stride_u_b + offs_d * stride_u_d
        delta_ptrs0 = delta_ptr + pid_b * stride_delta_b + offs_d * stride_delta_d
        B_ptrs0 = B_ptr + pid_b * stride_B_b + offs_n * stride_B_n
        C_ptrs0 = C_ptr + pid_b * stride_C_b + offs_n * stride_C_n
        z_ptrs0 = u_ptrs0
        if HAS_Z:
            z_ptrs0 = z_ptr + pid_b * stride_z_b + offs_d * stride_z_d
        dout_ptrs0 = u_ptrs0
        if HAS_DOUT:
            dout_ptrs0 = dout_ptr + pid_b * stride_dout_b + offs_d * stride_dout_d
        out_offs0 = pid_b * stride_out_b + offs_d * stride_out_d  # du, ddelta, dz
        dBC_offs0 = (pid_b * n_dblocks + pid_d) * length * d_state + offs_n
        ckpt_ptrs0 = ckpt_ptr + pid_b * stride_ckpt_b + offs_d[:, None] * stride_ckpt_d + offs_n[None, :]
        # Scratch slot i of the current chunk holds the state *before* position start+i.
        tile = BLOCK_D * BLOCK_N
        program = pid_b * n_dblocks + pid_d
        if SEGMENTED:
            program = program * n_segments + segment
        scratch_ptrs0 = (scratch_ptr + program * (CHUNK * tile) + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N
                         + offs_n[None, :])
        # With PREFETCH the reverse walk loads each step's inputs one step ahead and converts them in the step that
        # uses them, as the forward walk does, so the chain of dependent steps does not also wait on memory each step.
        # Without it each step loads its own, and the loads before the loop are masked off (`first` out of range).
        ahead = 1 if PREFETCH else 0

        for c_rev in range(0, n_chunks):
            c = first_chunk + n_chunks - 1 - c_rev
            start = c * CHUNK
            chunk_len = tl.minimum(length - start, CHUNK)

            # 1. Recompute the chunk's states from its checkpoint, saving the state before each position. Four
            # positions an iteration, each from its own set of inputs, reloaded four positions ahead as soon as its
            # position is done: a load then has three positions' work to arrive in (one step is ~150 instructions, too
            # few to cover a load from memory), and no copy at the loop's end waits on it, as one would if the loaded
            # inputs were moved into the next step's. Positions past the chunk's end are identity steps.
            h = tl.load(ckpt_ptrs0 + c * stride_ckpt_c, mask=mask_dn, other=0.0)
            u_ptrs = u_ptrs0 + start * stride_u_l
            delta_ptrs = delta_ptrs0 + start * stride_delta_l
            B_ptrs = B_ptrs0 + start * stride_B_l
            scratch_ptrs = scratch_ptrs0
            set0 = _load_recompute_step(delta_ptrs, u_ptrs, B_ptrs, mask_d, mask_n, 0, chunk_len)
            set1 = _load_recompute_step(delta_ptrs + stride_delta_l, u_ptrs + stride_u_l, B_ptrs + stride_B_l, mask_d,
                                        mask_n, 1, chunk_len)
            set2 = _load_recompute_step(delta_ptrs + 2 * stride_delta_l, u_ptrs + 2 * stride_u_l,
                                        B_ptrs + 2 * stride_B_l, mask_d, mask_n, 2, chunk_len)
            set3 = _load_recompute_step(delta_ptrs + 3 * stride_delta_l, u_ptrs + 3 * stride_u_l,
                                        B_ptrs + 3 * stride_B_l, mask_d, mask_n, 3, chunk_len)
            steps = (stride_delta_l, stride_u_l, stride_B_l, tile)
            for i in range(0, CHUNK, 4):
                ptrs = (delta_ptrs, u_ptrs, B_ptrs, scratch_ptrs)
                h, set0 = _recompute_position(h, set0, i + 0, 0, ptrs, steps, A, bias, mask_d, mask_n, chunk_len,
                                              HAS_BIAS, SOFTPLUS)
                h, set1 = _recompute_position(h, set1, i + 1, 1, ptrs, steps, A, bias, mask_d, mask_n, chunk_len,
                                              HAS_BIAS, SOFTPLUS)
                h, set2 = _recompute_position(h, set2, i + 2, 2, ptrs, steps, A, bias, mask_d, mask_n, chunk_len,
                                              HAS_BIAS, SOFTPLUS)
                h, set3 = _recompute_position(h, set3, i + 3, 3, ptrs, steps, A, bias, mask_d, mask_n, chunk_len,
                                              HAS_BIAS, SOFTPLUS)
                u_ptrs += 4 * stride_u_l
                delta_ptrs += 4 * stride_delta_l
                B_ptrs += 4 * stride_B_l
                scratch_ptrs += 4 * tile
            # The reverse walk reads slots that other threads of this program wrote.
            tl.debug_barrier()

            # 2. Walk the chunk backwards from its last position: h holds h_t, the scratch gives h_{t-1}.
            t = start + chunk_len - 1
            u_ptrs = u_ptrs0 + t * stride_u_l
            delta_ptrs = delta_ptrs0 + t * stride_delta_l
            B_ptrs = B_ptrs0 + t * stride_B_l
            C_ptrs = C_ptrs0 + t * stride_C_l
            z_ptrs = z_ptrs0 + t * stride_z_l
            dout_ptrs = dout_ptrs0 + t * stride_dout_l
            out_offs = out_offs0 + t * stride_out_l
            dBC_offs = dBC_offs0 + t * d_state
            scratch_ptrs = scratch_ptrs0 + (chunk_len - 1) * tile
            first = 0 if PREFETCH else CHUNK
            h_prev, delta_raw, u_raw, B_raw, C_raw, gy_raw, z_raw = _load_reverse_step(
                scratch_ptrs, delta_ptrs, u_ptrs, B_ptrs, C_ptrs, dout_ptrs, z_ptrs, mask_d, mask_n, first, chunk_len,
                HAS_DOUT, HAS_Z)
            for i_rev in range(0, CHUNK):
                if i_rev < chunk_len:
                    h_prev1, delta1, u1, B1, C1, gy1, z1 = _load_reverse_step(
                        scratch_ptrs - ahead * tile, delta_ptrs - ahead * stride_delta_l, u_ptrs - ahead * stride_u_l,
                        B_ptrs - ahead * stride_B_l, C_ptrs - ahead * stride_C_l,
                        dout_ptrs - ahead * stride_dout_l, z_ptrs - ahead * stride_z_l, mask_d, mask_n,
                        i_rev + ahead, chunk_len, HAS_DOUT, HAS_Z)
                    if not PREFETCH:
                        h_prev, delta_raw, u_raw, B_raw, C_raw, gy_raw, z_raw = h_prev1, delta1, u1, B1, C1, gy1, z1
                    x, dt, u, Bt, Ct, z = _to_f32(delta_raw, u_raw, B_raw, C_raw, z_raw, bias, HAS_BIAS, SOFTPLUS)
                    gy = gy_raw.to(tl.float32)
                    if HAS_Z:
                        sig_z = 1.0 / (1.0 + tl.exp2(-z * LOG2E))
                        y_pre = tl.sum(h * Ct[None, :], axis=1)
                        if HAS_D:
                            y_pre += D * u
                        tl.store(dz_ptr + out_offs, gy * y_pre * sig_z * (1.0 + z * (1.0 - sig_z)), mask=mask_d)
                        gy = gy * z * sig_z  # now d loss / d (C.h + D u)
                    a = tl.exp2(dt[:, None] * A)
                    g = gy[:, None] * Ct[None, :] + carry
                    tl.store(dC_ptr + dBC_offs, tl.sum(gy[:, None] * h, axis=0), mask=mask_n)
                    tl.store(dB_ptr + dBC_offs, tl.sum(g * (dt * u)[:, None], axis=0), mask=mask_n)
                    gB = tl.sum(g * Bt[None, :], axis=1)
                    carry = g * a
                    g_decay = carry * h_prev  # d loss / d (dt*A), elementwise: g a h_{t-1}
                    ddelta = u * gB + tl.sum(g_decay * A, axis=1) * LN2
                    if SOFTPLUS:
                        # softplus' = sigmoid, exactly 1 where softplus is the identity.
                        ddelta = tl.where(x > SOFTPLUS_THRESHOLD, ddelta, ddelta / (1.0 + tl.exp2(-x * LOG2E)))
                    du = dt * gB
                    if HAS_D:
                        du += gy * D
                        dD_acc += gy * u
                    tl.store(du_ptr + out_offs, du, mask=mask_d)
                    tl.store(ddelta_ptr + out_offs, ddelta, mask=mask_d)
                    dA_acc += g_decay * dt[:, None]
                    dbias_acc += ddelta
                    h = h_prev
                    if PREFETCH:
                        h_prev, delta_raw, u_raw, B_raw, C_raw, gy_raw, z_raw = h_prev1, delta1, u1, B1, C1, gy1, z1

                    u_ptrs -= stride_u_l
                    delta_ptrs -= stride_delta_l
                    B_ptrs -= stride_B_l
                    C_ptrs -= stride_C_l
                    z_ptrs -= stride_z_l
                    dout_ptrs -= stride_dout_l
                    out_offs -= stride_out_l
                    dBC_offs -= d_state
                    scratch_ptrs -= tile
            # The next chunk's recompute overwrites slots this walk may still be reading in other threads.
            tl.debug_barrier()

    partial = pid_b  # this batch element's and segment's share of dA, dD and d bias
    if SEGMENTED:
        partial = pid_b * n_segments + segment
    tl.store(dA_ptr + (partial * d_inner + offs_d[:, None]) * d_state + offs_n[None, :], dA_acc, mask=mask_dn)
    tl.store(dD_ptr + partial * d_inner + offs_d, dD_acc, mask=mask_d)
    tl.store(dbias_ptr + partial * d_inner + offs_d, dbias_acc, mask=mask_d)
    if segment == 0:
        tl.store(dh0_ptr + (pid_b * d_inner + offs_d[:, None]) * d_state + offs_n[None, :], carry, mask=mask_dn)


def scan_segments(programs: int, units: int, slots: int, extra_cost: float, most: int = 16) -> int:
    """Segments for a walk of `programs` one-warp programs over `units` chunks of positions where `slots` programs
    run at once. Segments of equal length run in ceil(programs * segments / slots) rounds, each 1 / segments as long,
    and the extra walk covers (segments - 1) / segments of the positions at `extra_cost` of the walk's cost a
    position: the fewest segments within 5% of the best time by that count."""
    times = {s: math.ceil(programs * s / slots) / s + extra_cost * (s - 1) / s
             for s in range(1, max(1, min(most, units)) + 1)}
    best = min(times.values())
    return min(s for s, time in times.items() if time <= 1.05 * best)


def _segments(chosen: int | None, programs: int, units: int, device: torch.device, walk: bool, registers: int,
              extra_cost: float) -> int:
    """`chosen` (FORWARD_SEGMENTS or BACKWARD_SEGMENTS) up to `units`, or where that is None the GPU's choice by
    `scan_segments` for one-warp programs of `registers` registers a thread; that choice is the walk's, so the
    parallel kernels (`walk` False) take one segment then."""
    if chosen is not None:
        return max(1, min(chosen, units))
    if device.type != "cuda" or not walk:
        return 1
    per_sm = 65536 // (32 * (-(-registers // 8) * 8))  # a warp's registers are allocated 256 at a time
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return scan_segments(programs, units, sms * per_sm, extra_cost)


def backward_segments(programs: int, n_chunks: int, device: torch.device, walk: bool = True) -> int:
    """The backward's segments (`BACKWARD_SEGMENTS`, see `_segments`)."""
    return _segments(BACKWARD_SEGMENTS, programs, n_chunks, device, walk,
                     BACKWARD_MAX_REGISTERS or BACKWARD_REGISTERS, BACKWARD_EXTRA_COST)


def forward_segments(programs: int, units: int, device: torch.device, walk: bool = True) -> int:
    """The forward's segments (`FORWARD_SEGMENTS`, see `_segments`)."""
    return _segments(FORWARD_SEGMENTS, programs, units, device, walk, FORWARD_REGISTERS, FORWARD_EXTRA_COST)


def _tile_warps(block_l: int, block_n: int, block_d: int) -> int:
    """Warps for the parallel kernels: about 16 elements of each (block_l, block_n, block_d) tile per thread."""
    return min(16, max(1, block_l * block_n * block_d // 512))


def _strides3(x: torch.Tensor | None) -> tuple[int, ...]:
    """x's strides, or zeros standing in for an absent optional tensor."""
    return (0, 0, 0) if x is None else tuple(x.stride())


def _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_ckpt, chunk, block_d,
              block_l=None):
    """Launches the forward kernel (the walk, or with `block_l` the parallel one over blocks of that many
    positions); returns (y, last_state, checkpoints or None)."""
    batch, d_inner, length = u.shape
    d_state = A.shape[1]
    block_d = _block_d(d_inner, block_d)
    # y is stored position-major ((batch, L, d_inner) in memory, returned as its (batch, d_inner, L) view): the model
    # reads it back as (batch, L, d_inner) rows, and each step then writes one contiguous run of channels.
    y = torch.empty(batch, length, d_inner, device=u.device, dtype=u.dtype).transpose(1, 2)
    hlast = torch.empty(batch, d_inner, d_state, device=u.device, dtype=torch.float32)
    ckpt = None
    if save_ckpt:
        ckpt = torch.empty(batch, d_inner, triton.cdiv(length, chunk), d_state, device=u.device, dtype=torch.float32)
    n_dblocks = triton.cdiv(d_inner, block_d)
    block_n = triton.next_power_of_2(d_state)
    if block_l is None:
        warps, block_l = max(1, block_d // 32), 1
    else:
        if chunk % block_l:
            raise ValueError(f"block_l ({block_l}) must divide chunk ({chunk})")
        warps = _tile_warps(block_l, block_n, block_d)
    # Segments start where a state is saved, where a block of the parallel forward does, and at a multiple of 4 (the
    # walk's positions an iteration).
    unit = math.lcm(4, chunk if save_ckpt else block_l)
    units = max(1, triton.cdiv(length, unit))
    segments = forward_segments(batch * n_dblocks, units, u.device, walk=block_l == 1)
    segment_len = triton.cdiv(units, segments) * unit
    segments = max(1, triton.cdiv(length, segment_len))  # none empty
    starts = None
    if segments > 1:
        # (d_inner, d_state) a segment, states contiguous as each of the walk's lanes holds its channel's.
        ends = torch.empty(batch, segments - 1, d_inner, d_state, device=u.device, dtype=torch.float32)
        dt_sums = torch.empty(batch, segments - 1, d_inner, device=u.device, dtype=torch.float32)
        _scan_fwd_states_kernel[(batch, n_dblocks, segments - 1)](
            u, delta, A, B, delta_bias, ends, dt_sums, d_inner, d_state, segment_len, *u.stride(), *delta.stride(),
            *A.stride(), *B.stride(), HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
            BLOCK_D=block_d, BLOCK_N=block_n, num_warps=max(1, block_d // 32))
        starts = _segment_starts(ends, dt_sums, A, initial_state, False, block_d)
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state, starts, y, hlast, ckpt, d_inner, d_state,
            length, segment_len, *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *_strides3(z),
            *_strides3(initial_state), *y.stride(), *(_strides3(ckpt)[:3]))
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                 HAS_H0=initial_state is not None and starts is None, SOFTPLUS=bool(delta_softplus),
                 SAVE_CKPT=save_ckpt, SEGMENTED=segments > 1, CHUNK=chunk, BLOCK_D=block_d, BLOCK_N=block_n)
    _scan_fwd_kernel[(batch, n_dblocks, segments)](*args, **flags, BLOCK_L=block_l, num_warps=warps)
    return y, hlast, ckpt


class _SelectiveScanFn(torch.autograd.Function):
    """Forward saves the inputs and the per-chunk states; backward is `_scan_bwd_kernel`."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk, block_d, block_l,
                backward_block_l):
        # The parallel backward starts each block of positions from a saved state: one per block.
        chunk = backward_block_l or chunk
        if backward_block_l is None and chunk % 4:
            raise ValueError(f"chunk ({chunk}) must be a multiple of 4: the walk backward recomputes four positions an "
                             "iteration")
        y, hlast, ckpt = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                   save_ckpt=True, chunk=chunk, block_d=block_d, block_l=block_l)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, ckpt)
        # Unused outputs then arrive as None instead of zero tensors, so the kernel skips them.
        ctx.set_materialize_grads(False)
        ctx.delta_softplus, ctx.chunk, ctx.block_d = delta_softplus, chunk, block_d
        ctx.parallel = backward_block_l is not None
        return y, hlast

    @staticmethod
    def backward(ctx, dy, dhlast):
        u, delta, A, B, C, D, z, delta_bias, initial_state, ckpt = ctx.saved_tensors
        batch, d_inner, length = u.shape
        d_state = A.shape[1]
        chunk = ctx.chunk
        block_d = _block_d(d_inner, ctx.block_d)
        block_n = triton.next_power_of_2(d_state)
        n_dblocks = triton.cdiv(d_inner, block_d)
        dev = u.device
        f32 = dict(device=dev, dtype=torch.float32)
        # Position-major, like the activations they are the gradients of (see `_scan_bwd_kernel`).
        du = torch.empty(batch, length, d_inner, device=dev, dtype=u.dtype).transpose(1, 2)
        ddelta = torch.empty(batch, length, d_inner, device=dev, dtype=delta.dtype).transpose(1, 2)
        dz = torch.empty(batch, length, d_inner, device=dev, dtype=z.dtype).transpose(1, 2) if z is not None else None
        n_chunks = max(1, triton.cdiv(length, chunk))
        segments = backward_segments(batch * n_dblocks, n_chunks, dev, walk=not ctx.parallel)
        segment_chunks = triton.cdiv(n_chunks, segments)
        segments = triton.cdiv(n_chunks, segment_chunks)  # none empty
        dA = torch.empty(batch, segments, d_inner, d_state, **f32)
        dB = torch.empty(batch, n_dblocks, length, d_state, **f32)
        dC = torch.empty(batch, n_dblocks, length, d_state, **f32)
        dD = torch.empty(batch, segments, d_inner, **f32)
        dbias = torch.empty(batch, segments, d_inner, **f32)
        dh0 = torch.empty(batch, d_inner, d_state, **f32)
        flags = dict(HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_DOUT=dy is not None,
                     SOFTPLUS=bool(ctx.delta_softplus), BLOCK_D=block_d, BLOCK_N=block_n)
        carries = None
        if segments > 1:
            ends = torch.empty(batch, segments - 1, d_inner, d_state, **f32)
            dt_sums = torch.empty(batch, segments - 1, d_inner, **f32)
            _scan_bwd_carries_kernel[(batch, n_dblocks, segments - 1)](
                delta, A, C, z, delta_bias, dy, ends, dt_sums, d_inner, d_state, length, segment_chunks * chunk,
                *delta.stride(), *A.stride(), *C.stride(), *_strides3(z), *_strides3(dy), **flags,
                num_warps=BACKWARD_WALK_WARPS)
            carries = _segment_starts(ends, dt_sums, A, dhlast, True, block_d)
        inputs = (u, delta, A, B, C, D, z, delta_bias, ckpt, dy, dhlast, carries)
        outputs = (du, ddelta, dz, dA, dB, dC, dD, dbias, dh0)
        shapes = (d_inner, d_state, length, segment_chunks,
                  *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *_strides3(z),
                  ckpt.stride(0), ckpt.stride(1), ckpt.stride(2), *_strides3(dy), *_strides3(dhlast), *du.stride())
        flags.update(HAS_D=D is not None, HAS_DHLAST=dhlast is not None, SEGMENTED=segments > 1, CHUNK=chunk)
        if ctx.parallel:  # no scratch: the chunk lives in its tiles
            scratch, warps, registers = None, _tile_warps(chunk, block_n, block_d), {}
        else:
            scratch = torch.empty(batch, n_dblocks, segments, chunk, block_d, block_n, **f32)
            warps = BACKWARD_WALK_WARPS
            registers = {} if BACKWARD_MAX_REGISTERS is None else {"maxnreg": BACKWARD_MAX_REGISTERS}
        _scan_bwd_kernel[(batch, n_dblocks, segments)](
            *inputs, scratch, *outputs, *shapes, **flags, PARALLEL=ctx.parallel,
            PREFETCH=BACKWARD_PREFETCH and not ctx.parallel, num_warps=warps, **registers)

        def cast(grad, like):
            return None if like is None else grad.to(like.dtype)

        return (
            du, ddelta, cast(dA.sum((0, 1)), A), cast(dB.sum(1).transpose(1, 2), B),
            cast(dC.sum(1).transpose(1, 2), C), cast(dD.sum((0, 1)), D), dz, cast(dbias.sum((0, 1)), delta_bias),
            cast(dh0, initial_state), None, None, None, None, None,
        )


def selective_scan_triton(u, delta, A, B, C, D, z=None, delta_bias=None, delta_softplus=True, initial_state=None,
                          *, chunk: int | None = None, block_d: int | None = None, block_l: int | None = None,
                          backward_block_l: int | None = None):
    """Fused selective scan. Shapes and results as `selective_scan_ref`: returns (y in u's dtype, last_state
    (batch, d_inner, d_state) float32). Differentiable in every tensor input via the Triton backward.

    `chunk` (positions between states saved for the backward), `block_d` (channels per program), `block_l`
    (positions per block of the parallel forward; None walks positions one at a time) and `backward_block_l` (the
    same for the backward, which then needs a state saved per block; None: as `block_l`) are tuning knobs; they do
    not change results beyond float rounding. chunk None is `DEFAULT_CHUNK`, read at the call.
    """
    chunk = chunk or DEFAULT_CHUNK
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk,
                                      block_d, block_l, backward_block_l or block_l)
    y, hlast, _ = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                            save_ckpt=False, chunk=chunk, block_d=block_d, block_l=block_l)
    return y, hlast


@triton.jit
def _state_step(h, A, dt, u, Bt, Ct, state_dtype: tl.constexpr):
    """h (..., BLOCK_D, BLOCK_N) float32 -> (exp(dt A) h + dt B u rounded to the state's dtype, C . that), with A
    already scaled by log2 e, and every operand shaped to broadcast against h (dt and u with a trailing axis of 1,
    Bt and Ct with one before the state's). Also the fused decode steps' (`hymba.ops.scan.triton_step`)."""
    h = tl.exp2(dt * A) * h + (dt * u) * Bt
    # Round the state to its storage dtype before reading it out, as the in-place reference does.
    h = h.to(state_dtype).to(tl.float32)
    return h, tl.sum(h * Ct, axis=-1)


@triton.jit
def _state_update_kernel(
    state_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
    d_inner, d_state,
    stride_state_b, stride_state_d, stride_state_n,
    stride_u_b, stride_u_d, stride_delta_b, stride_delta_d,
    stride_A_d, stride_A_n, stride_B_b, stride_B_n, stride_C_b, stride_C_n, stride_z_b, stride_z_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    A_IS_LOG: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr,
):
    """One decode step for (batch pid_b, channel block pid_d): h = exp(dt*A) h + dt B u in place,
    y = (C.h + D u) * silu(z). With A_IS_LOG the A pointer holds A_log and A = -exp(A_log)."""
    wait_for_inputs(USE_PDL)
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d_inner
    mask_n = offs_n < d_state
    mask_dn = mask_d[:, None] & mask_n[None, :]

    state_ptrs = (state_ptr + pid_b * stride_state_b + offs_d[:, None] * stride_state_d
                  + offs_n[None, :] * stride_state_n)
    h = tl.load(state_ptrs, mask=mask_dn, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + offs_d[:, None] * stride_A_d + offs_n[None, :] * stride_A_n, mask=mask_dn, other=0.0)
    A = A.to(tl.float32)
    if A_IS_LOG:
        A = -tl.exp(A)
    A *= LOG2E  # A * log2 e from here on: exp(dt*A) = exp2(dt * this), see LOG2E
    x = tl.load(delta_ptr + pid_b * stride_delta_b + offs_d * stride_delta_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(x)
    else:
        dt = x
    u = tl.load(u_ptr + pid_b * stride_u_b + offs_d * stride_u_d, mask=mask_d, other=0.0).to(tl.float32)
    Bt = tl.load(B_ptr + pid_b * stride_B_b + offs_n * stride_B_n, mask=mask_n, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + pid_b * stride_C_b + offs_n * stride_C_n, mask=mask_n, other=0.0).to(tl.float32)

    h, y = _state_step(h, A, dt[:, None], u[:, None], Bt[None, :], Ct[None, :], state_ptr.dtype.element_ty)
    if HAS_D:
        y += u * tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * stride_z_b + offs_d * stride_z_d, mask=mask_d, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    # Every thread has read its state before any thread overwrites it (layouts may replicate elements).
    tl.debug_barrier()
    tl.store(state_ptrs, h, mask=mask_dn)
    tl.store(y_ptr + pid_b * d_inner + offs_d, y, mask=mask_d)


# A custom op, so a compiled decode step (`torch.compile(..., fullgraph=True)`) keeps the launch as one opaque call
# that updates `state` in place, instead of breaking the graph at Triton's launcher.
@torch.library.custom_op("hymba::selective_state_update", mutates_args=("state",))
def selective_state_update_triton(state: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
                                  B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None,
                                  z: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                                  delta_softplus: bool = True, block_d: int | None = None,
                                  A_is_log: bool = False) -> torch.Tensor:
    """One decode step, fused: `state` (batch, d_inner, d_state) is updated in place; u, delta, z (batch, d_inner);
    B, C (batch, d_state). Returns y (batch, d_inner) in u's dtype, as `selective_state_update_ref`.
    With `A_is_log`, `A` holds A_log and the kernel takes -exp of it."""
    batch, d_inner = u.shape
    d_state = A.shape[1]
    block_d = _block_d(d_inner, block_d)
    y = torch.empty(batch, d_inner, device=u.device, dtype=u.dtype)
    z_strides = (0, 0) if z is None else z.stride()
    _state_update_kernel[(batch, triton.cdiv(d_inner, block_d))](
        state, u, delta, A, B, C, D, z, delta_bias, y,
        d_inner, d_state,
        *state.stride(), *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *z_strides,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        A_IS_LOG=A_is_log, BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(d_state), **pdl_launch(u),
    )
    return y


@selective_state_update_triton.register_fake
def _(state, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, block_d=None, A_is_log=False):
    return u.new_empty(u.shape)
