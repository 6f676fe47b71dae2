"""Causal depthwise conv1d (Mamba's short convolution) in Triton: a sequence kernel and a one-step update kernel.

Semantics and dtypes are those of `hymba.ops.conv.reference`:

    out_t = act(bias + sum_k weight[:, k] * x_{t-width+1+k}),   x_{<0} read from initial_state (or 0)

The forward returns (out in x's dtype, final_state (batch, dim, width-1) in x's dtype: the last width-1 inputs of
the padded sequence). As in the reference, weight, bias and initial_state are rounded to x's dtype; the kernel
then accumulates and applies SiLU in float32 (the reference rounds once more, before the activation).

Backward: with `TRITON_BACKWARD` (and width <= 4), `_conv_bwd_kernel`, a walk over each block of positions that
recomputes the pre-activation from a window of inputs held in registers and writes dx and per-block partial sums of
d weight and d bias (reduced in PyTorch: deterministic, no atomics). Without it, PyTorch autograd through the
reference (`causal_conv1d_ref` recomputed in float32 from the saved inputs), the path wider convs take. At a 1.5B
training step's shape (8 x 2,176 positions, 3,200 channels, bf16; `benchmarks/bench_conv.py`, one H200) forward +
backward take 0.43 ms per layer with the walk, against 4.21 through autograd and 1.58 with the tile kernel it
replaced (session 19's figure; that kernel re-read a shifted input tile for every tap of every recomputed
pre-activation and summed d weight across lanes).

Triton is optional: this module is imported only when it is importable. Under TRITON_INTERPRET=1 the
kernels also take CPU tensors, which is how the tests exercise them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hymba.ops.conv.reference import causal_conv1d_ref
from hymba.ops.launch import pdl_launch, wait_for_inputs

__all__ = ["causal_conv1d_triton", "causal_conv1d_update_triton"]

# The backward as the Triton kernel (`_conv_bwd_kernel`) rather than autograd through the reference; see above.
TRITON_BACKWARD = True


def _check_activation(activation: str | None) -> bool:
    """True for SiLU, False for none; the reference's error otherwise."""
    if activation is None:
        return False
    if activation in ("silu", "swish"):
        return True
    raise ValueError(f"unsupported conv activation {activation!r}; use 'silu' or None")


@triton.jit
def _load_padded(x_ptrs, init_ptrs, pos, mask_d, length, stride_x_l, stride_init_k,
                 HAS_INIT: tl.constexpr, WIDTH: tl.constexpr):
    """Column(s) `pos` (may be negative) of cat([initial_state, x], -1) shifted by width-1, as float32 (BLOCK_D, P).

    Negative positions read initial_state[:, width-1+pos] rounded to x's dtype (as the reference's cat does),
    or 0 without an initial state; positions >= length read 0."""
    in_x = (pos >= 0) & (pos < length)
    vals = tl.load(x_ptrs[:, None] + pos[None, :] * stride_x_l, mask=mask_d[:, None] & in_x[None, :], other=0.0)
    vals = vals.to(tl.float32)
    if HAS_INIT:
        in_init = (pos < 0) & (pos >= 1 - WIDTH)
        init = tl.load(init_ptrs[:, None] + (WIDTH - 1 + pos[None, :]) * stride_init_k,
                       mask=mask_d[:, None] & in_init[None, :], other=0.0)
        vals += init.to(x_ptrs.dtype.element_ty).to(tl.float32)
    return vals


@triton.jit
def _pre_activation(x_ptrs, init_ptrs, w_ptr, bias_ptr, offs_d, mask_d, pos, length, stride_x_l, stride_init_k,
                    stride_w_d, stride_w_k, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, WIDTH: tl.constexpr):
    """bias + sum_k weight[:, k] * x_{pos-width+1+k} in float32 (BLOCK_D, P), weight and bias rounded to x's dtype:
    each tap k reads the input tile shifted by k - (width-1)."""
    x_dtype = x_ptrs.dtype.element_ty
    acc = tl.zeros((mask_d.shape[0], pos.shape[0]), tl.float32)
    for k in tl.static_range(WIDTH):
        w = tl.load(w_ptr + offs_d * stride_w_d + k * stride_w_k, mask=mask_d, other=0.0)
        w = w.to(x_dtype).to(tl.float32)
        acc += w[:, None] * _load_padded(x_ptrs, init_ptrs, pos + (k - (WIDTH - 1)), mask_d, length, stride_x_l,
                                         stride_init_k, HAS_INIT, WIDTH)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(x_dtype).to(tl.float32)[:, None]
    return acc


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, out_ptr, final_ptr,
    dim, length,
    stride_x_b, stride_x_d, stride_x_l,
    stride_w_d, stride_w_k,
    stride_init_b, stride_init_d, stride_init_k,
    stride_out_b, stride_out_d, stride_out_l,
    HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
    WIDTH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One program: batch pid_b, BLOCK_D channels, BLOCK_L positions; final_state is contiguous.

    Each tap k reads the input tile shifted by k - (width-1); the program with pid_l == 0 also writes the final
    state (the last width-1 padded inputs), which may reach back into initial_state when length < width-1."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_l = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = offs_d < dim

    x_ptrs = x_ptr + pid_b * stride_x_b + offs_d * stride_x_d
    init_ptrs = x_ptrs  # never read without an initial state
    if HAS_INIT:
        init_ptrs = init_ptr + pid_b * stride_init_b + offs_d * stride_init_d

    acc = _pre_activation(x_ptrs, init_ptrs, w_ptr, bias_ptr, offs_d, mask_d, offs_l, length, stride_x_l,
                          stride_init_k, stride_w_d, stride_w_k, HAS_BIAS, HAS_INIT, WIDTH)
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    out_ptrs = out_ptr + pid_b * stride_out_b + offs_d[:, None] * stride_out_d + offs_l[None, :] * stride_out_l
    tl.store(out_ptrs, acc, mask=mask_d[:, None] & (offs_l < length)[None, :])

    if WIDTH > 1:
        if pid_l == 0:
            offs_w = tl.arange(0, BLOCK_W)
            final = _load_padded(x_ptrs, init_ptrs, length - (WIDTH - 1) + offs_w, mask_d, length, stride_x_l,
                                 stride_init_k, HAS_INIT, WIDTH)
            final_ptrs = final_ptr + (pid_b * dim + offs_d[:, None]) * (WIDTH - 1) + offs_w[None, :]
            tl.store(final_ptrs, final, mask=mask_d[:, None] & (offs_w < WIDTH - 1)[None, :])


@triton.jit
def _tap(w_ptr, offs_d, mask_d, stride_w_d, stride_w_k, x_dtype, k: tl.constexpr, WIDTH: tl.constexpr):
    """Weight column k of the taps as four, (x_{t-3}, x_{t-2}, x_{t-1}, x_t), in float32 after rounding to x's
    dtype: a conv narrower than four has zeros in its first 4 - width taps."""
    if k < 4 - WIDTH:
        return tl.zeros_like(mask_d.to(tl.float32))
    w = tl.load(w_ptr + offs_d * stride_w_d + (k - (4 - WIDTH)) * stride_w_k, mask=mask_d, other=0.0)
    return w.to(x_dtype).to(tl.float32)


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, dout_ptr, dfinal_ptr, dx_ptr, dinit_ptr, dw_ptr, dbias_ptr,
    dim, length, n_lblocks,
    stride_x_b, stride_x_d, stride_x_l,
    stride_w_d, stride_w_k,
    stride_init_b, stride_init_d, stride_init_k,
    stride_dout_b, stride_dout_d, stride_dout_l,
    stride_dfinal_b, stride_dfinal_d, stride_dfinal_k,
    stride_dx_b, stride_dx_d, stride_dx_l,
    HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr, SILU: tl.constexpr,
    WIDTH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """One program: batch pid_b, BLOCK_D channels, positions [t0, t0 + BLOCK_L), walked one at a time. With gpre the
    gradient of the pre-activation (recomputed from x) and the taps as four (w0..w3 on x_{t-3}..x_t, see `_tap`):

        dx_s = w3 gpre_s + w2 gpre_{s+1} + w1 gpre_{s+2} + w0 gpre_{s+3} (+ dfinal)
        dw_k = sum_t gpre_t x_{t-3+k}    dbias = sum_t gpre_t

    Step t computes gpre_t from the last four inputs, which the walk keeps in registers, adds its terms to dw and
    dbias (for t inside the block) and completes dx_{t-3} from the last four gpre; three steps past the block
    complete its last positions. Every input is read once (the tile kernel this replaced re-read shifted tiles for
    every tap, and reduced dw across lanes). dw (batch, n_lblocks, dim, 4) and dbias (batch, n_lblocks, dim) are
    float32 partials; the program with pid_l == 0 also writes d initial_state (batch, dim, width-1) float32,
    contiguous, from the steps whose dx_{t-3} falls before position 0."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_l = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    t0 = pid_l * BLOCK_L
    t1 = tl.minimum(t0 + BLOCK_L, length)
    x_dtype = x_ptr.dtype.element_ty

    x_ptrs = x_ptr + pid_b * stride_x_b + offs_d * stride_x_d
    dout_ptrs = dout_ptr + pid_b * stride_dout_b + offs_d * stride_dout_d
    dx_ptrs = dx_ptr + pid_b * stride_dx_b + offs_d * stride_dx_d
    init_ptrs = x_ptrs  # never read without an initial state, nor dfinal without its gradient
    if HAS_INIT:
        init_ptrs = init_ptr + pid_b * stride_init_b + offs_d * stride_init_d
    dfinal_ptrs = x_ptrs
    if HAS_DFINAL:
        dfinal_ptrs = dfinal_ptr + pid_b * stride_dfinal_b + offs_d * stride_dfinal_d

    w0 = _tap(w_ptr, offs_d, mask_d, stride_w_d, stride_w_k, x_dtype, 0, WIDTH)
    w1 = _tap(w_ptr, offs_d, mask_d, stride_w_d, stride_w_k, x_dtype, 1, WIDTH)
    w2 = _tap(w_ptr, offs_d, mask_d, stride_w_d, stride_w_k, x_dtype, 2, WIDTH)
    w3 = _tap(w_ptr, offs_d, mask_d, stride_w_d, stride_w_k, x_dtype, 3, WIDTH)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(x_dtype).to(tl.float32)

    # x_{t-1}, x_{t-2}, x_{t-3} and gpre_{t-1}, gpre_{t-2}, gpre_{t-3} (positions before t0 contribute no gpre here:
    # their dx belongs to the block before, or is d initial_state, where gpre at negative positions is 0).
    start = tl.full((1,), t0, tl.int32)  # as a one-position vector: `_load_padded` takes (and returns) columns
    x1 = tl.reshape(_load_padded(x_ptrs, init_ptrs, start - 1, mask_d, length, stride_x_l, stride_init_k, HAS_INIT,
                                 WIDTH), (BLOCK_D,))
    x2 = tl.reshape(_load_padded(x_ptrs, init_ptrs, start - 2, mask_d, length, stride_x_l, stride_init_k, HAS_INIT,
                                 WIDTH), (BLOCK_D,))
    x3 = tl.reshape(_load_padded(x_ptrs, init_ptrs, start - 3, mask_d, length, stride_x_l, stride_init_k, HAS_INIT,
                                 WIDTH), (BLOCK_D,))
    g1 = tl.zeros((BLOCK_D,), tl.float32)
    g2 = tl.zeros((BLOCK_D,), tl.float32)
    g3 = tl.zeros((BLOCK_D,), tl.float32)
    dw0 = tl.zeros((BLOCK_D,), tl.float32)
    dw1 = tl.zeros((BLOCK_D,), tl.float32)
    dw2 = tl.zeros((BLOCK_D,), tl.float32)
    dw3 = tl.zeros((BLOCK_D,), tl.float32)
    dbias = tl.zeros((BLOCK_D,), tl.float32)

    # Step t's x and dout are loaded a step ahead, as stored, and converted in the step (see the scan's walks).
    at = tl.zeros_like(offs_d) + t0
    x_raw = tl.load(x_ptrs + at * stride_x_l, mask=mask_d, other=0.0)  # t0 < length
    dout_raw = tl.load(dout_ptrs + at * stride_dout_l, mask=mask_d, other=0.0)
    for t in range(t0, t0 + BLOCK_L + 3):
        at = tl.zeros_like(offs_d) + t  # t as a tensor, so the masks are tensors
        ahead = mask_d & (at + 1 < length)  # past the end, x and dout load as 0 (so gpre is 0)
        x_next = tl.load(x_ptrs + (at + 1) * stride_x_l, mask=ahead, other=0.0)
        dout_next = tl.load(dout_ptrs + (at + 1) * stride_dout_l, mask=ahead, other=0.0)
        x0 = x_raw.to(tl.float32)
        g0 = dout_raw.to(tl.float32)
        if SILU:
            pre = bias + w0 * x3 + w1 * x2 + w2 * x1 + w3 * x0
            sig = 1.0 / (1.0 + tl.exp(-pre))
            g0 = g0 * sig * (1.0 + pre * (1.0 - sig))
        g_here = tl.where(at < t1, g0, 0.0)  # the steps past the block only complete its dx
        dw0 += g_here * x3
        dw1 += g_here * x2
        dw2 += g_here * x1
        dw3 += g_here * x0
        dbias += g_here

        # dx at s = t - 3: this block's, or (the first block) d initial_state's before position 0.
        s = at - 3
        dx = w3 * g3 + w2 * g2 + w1 * g1 + w0 * g0
        if HAS_DFINAL:
            # final[:, j] is the padded input at x position length - (width-1) + j.
            j = s - (length - (WIDTH - 1))
            dx += tl.load(dfinal_ptrs + j * stride_dfinal_k, mask=mask_d & (j >= 0) & (j < WIDTH - 1),
                          other=0.0).to(tl.float32)
        tl.store(dx_ptrs + s * stride_dx_l, dx, mask=mask_d & (s >= t0) & (s < t1))
        if HAS_INIT:
            if pid_l == 0:
                i = s + (WIDTH - 1)  # initial_state[:, i] is the padded input at x position i - (width-1)
                tl.store(dinit_ptr + (pid_b * dim + offs_d) * (WIDTH - 1) + i, dx, mask=mask_d & (s < 0) & (i >= 0))

        x3, x2, x1 = x2, x1, x0
        g3, g2, g1 = g2, g1, g0
        x_raw, dout_raw = x_next, dout_next

    partial = (pid_b * n_lblocks + pid_l) * dim + offs_d  # this program's row of the partial sums
    tl.store(dw_ptr + partial * 4 + 0, dw0, mask=mask_d)
    tl.store(dw_ptr + partial * 4 + 1, dw1, mask=mask_d)
    tl.store(dw_ptr + partial * 4 + 2, dw2, mask=mask_d)
    tl.store(dw_ptr + partial * 4 + 3, dw3, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + partial, dbias, mask=mask_d)


def _conv_bwd(x, weight, bias, initial_state, dout, dfinal, silu):
    """(dx, d weight, d bias, d initial_state) by `_conv_bwd_kernel`, each in its input's dtype (None when absent)."""
    batch, dim, length = x.shape
    width = weight.shape[1]
    # 128 channels a one-warp program (four per lane: 8-byte loads of the position-major activations), 64 positions:
    # 8 x 2,176 x 3,200 is then 6,800 programs, and the three steps past each block cost 5%.
    block_d = min(128, triton.next_power_of_2(dim))
    block_l = min(64, triton.next_power_of_2(max(length, 1)))
    n_lblocks = max(1, triton.cdiv(length, block_l))
    dx = torch.empty(batch, length, dim, device=x.device, dtype=x.dtype).transpose(1, 2)  # position-major, as x
    f32 = dict(device=x.device, dtype=torch.float32)
    dw = torch.empty(batch, n_lblocks, dim, 4, **f32)
    dbias = torch.empty(batch, n_lblocks, dim, **f32) if bias is not None else None
    dinit = torch.zeros(batch, dim, width - 1, **f32) if initial_state is not None else None
    init_strides = (0, 0, 0) if initial_state is None else initial_state.stride()
    dfinal_strides = (0, 0, 0) if dfinal is None else dfinal.stride()
    _conv_bwd_kernel[(batch, triton.cdiv(dim, block_d), n_lblocks)](
        x, weight, bias, initial_state, dout, dfinal, dx, dinit, dw, dbias,
        dim, length, n_lblocks,
        *x.stride(), *weight.stride(), *init_strides, *dout.stride(), *dfinal_strides, *dx.stride(),
        HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None, HAS_DFINAL=dfinal is not None, SILU=silu,
        WIDTH=width, BLOCK_D=block_d, BLOCK_L=block_l, num_warps=max(1, block_d // 128),
    )
    dweight = dw.sum((0, 1))[:, 4 - width:].to(weight.dtype)  # the taps as four: a narrower conv's are the last
    return (dx, dweight, None if bias is None else dbias.sum((0, 1)).to(bias.dtype),
            None if initial_state is None else dinit.to(initial_state.dtype))


def _conv_fwd(x, weight, bias, initial_state, silu, block_d=None, block_l=None):
    batch, dim, length = x.shape
    width = weight.shape[1]
    # out is position-major ((batch, L, dim) in memory, returned as its (batch, dim, L) view), as the model reads it.
    out = torch.empty(batch, length, dim, device=x.device, dtype=x.dtype).transpose(1, 2)
    final = torch.empty(batch, dim, width - 1, device=x.device, dtype=x.dtype)
    # 64 x 16 tiles: channels are contiguous in the model's tensors, so a tile row is one 128-byte run; every tap
    # keeps a tile of pointers and masks live, and 64 x 64 spills on sm_90.
    block_d = block_d or min(64, triton.next_power_of_2(dim))
    block_l = block_l or min(16, triton.next_power_of_2(max(length, 1)))
    grid = (batch, triton.cdiv(dim, block_d), max(1, triton.cdiv(length, block_l)))
    init_strides = (0, 0, 0) if initial_state is None else initial_state.stride()
    _conv_fwd_kernel[grid](
        x, weight, bias, initial_state, out, final,
        dim, length,
        *x.stride(), *weight.stride(), *init_strides, *out.stride(),
        HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None, SILU=silu,
        WIDTH=width, BLOCK_D=block_d, BLOCK_L=block_l, BLOCK_W=triton.next_power_of_2(max(width - 1, 1)),
    )
    return out, final


class _CausalConv1dFn(torch.autograd.Function):
    """Forward: the Triton kernel. Backward: `_conv_bwd_kernel`, or autograd through `causal_conv1d_ref` recomputed
    from the saved inputs in float32 (after the reference's rounding of weight, bias and initial_state to x's dtype);
    either way gradients are accumulated in float32 and then cast to each input's dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, activation, block_d, block_l):
        out, final = _conv_fwd(x, weight, bias, initial_state, _check_activation(activation), block_d, block_l)
        ctx.save_for_backward(x, weight, bias, initial_state)
        ctx.activation = activation
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        return out, final

    @staticmethod
    def backward(ctx, dout, dfinal):
        x, weight, bias, initial_state = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(x)
        if TRITON_BACKWARD and weight.shape[1] <= 4:  # the kernel takes the taps as four (see `_tap`)
            grads = _conv_bwd(x, weight, bias, initial_state, dout, dfinal, _check_activation(ctx.activation))
            return (*[g if need else None for g, need in zip(grads, ctx.needs_input_grad[:4], strict=True)],
                    None, None, None)
        if dfinal is None:
            dfinal = torch.zeros(x.shape[0], x.shape[1], weight.shape[1] - 1, device=x.device, dtype=x.dtype)
        leaves = [None if t is None else t.detach().requires_grad_(need)
                  for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[:4], strict=True)]
        x = leaves[0]
        with torch.enable_grad():
            upcast = [None if t is None else t.to(x.dtype).float() for t in leaves]
            out, final = causal_conv1d_ref(*upcast, activation=ctx.activation)
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad((out, final), wanted, (dout, dfinal), allow_unused=True))
        return (*[next(grads) if t is not None and t.requires_grad else None for t in leaves], None, None, None)


def causal_conv1d_triton(x, weight, bias=None, initial_state=None, activation: str | None = "silu",
                         *, block_d: int | None = None, block_l: int | None = None):
    """x (batch, dim, L), weight (dim, width), bias (dim,), initial_state (batch, dim, width-1) ->
    (out (batch, dim, L) in x's dtype, final_state (batch, dim, width-1) in x's dtype), as `causal_conv1d_ref`.

    Differentiable: the backward is `_conv_bwd_kernel`, or autograd through the reference (see module docstring)."""
    tensors = (x, weight, bias, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _CausalConv1dFn.apply(x, weight, bias, initial_state, activation, block_d, block_l)
    return _conv_fwd(x, weight, bias, initial_state, _check_activation(activation), block_d, block_l)


@triton.jit
def _conv_update_row(state_ptr, x, w_ptr, bias_ptr, offs_d, mask_d, stride_state_d, stride_state_k, stride_w_d,
                     stride_w_k, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, WIDTH: tl.constexpr,
                     BLOCK_W: tl.constexpr):
    """One row's step over channels offs_d: window = [state, x] (x in the state's dtype); returns act(w . window +
    bias) in float32 and shifts `state_ptr`'s row (d, width-1) in place to end with x. Also
    `hymba.ops.scan.triton_step`'s fused conv + x_proj kernel."""
    state_dtype = state_ptr.dtype.element_ty
    offs_w = tl.arange(0, BLOCK_W)
    w_last = tl.load(w_ptr + offs_d * stride_w_d + (WIDTH - 1) * stride_w_k, mask=mask_d, other=0.0)
    acc = w_last.to(state_dtype).to(tl.float32) * x.to(tl.float32)
    if WIDTH > 1:
        # window[:, k] = state[:, k] for k < width-1; the new state is window[:, 1:].
        state_ptrs = state_ptr + offs_d[:, None] * stride_state_d
        in_state = offs_w < WIDTH - 1
        mask = mask_d[:, None] & in_state[None, :]
        window = tl.load(state_ptrs + offs_w[None, :] * stride_state_k, mask=mask, other=0.0)
        w = tl.load(w_ptr + offs_d[:, None] * stride_w_d + offs_w[None, :] * stride_w_k, mask=mask, other=0.0)
        acc += tl.sum(w.to(state_dtype).to(tl.float32) * window.to(tl.float32), axis=1)
        # The shifted state is read now: after the barrier the stores may overwrite what other threads read.
        from_state = offs_w + 1 < WIDTH - 1
        shifted = tl.load(state_ptrs + (offs_w[None, :] + 1) * stride_state_k,
                          mask=mask_d[:, None] & from_state[None, :], other=0.0)
        shifted = tl.where(from_state[None, :], shifted, x[:, None])
        tl.debug_barrier()
        tl.store(state_ptrs + offs_w[None, :] * stride_state_k, shifted, mask=mask)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(state_dtype).to(tl.float32)
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    return acc


@triton.jit
def _conv_update_kernel(
    state_ptr, x_ptr, w_ptr, bias_ptr, out_ptr,
    dim,
    stride_state_b, stride_state_d, stride_state_k,
    stride_x_b, stride_x_d,
    stride_w_d, stride_w_k,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    WIDTH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, USE_PDL: tl.constexpr,
):
    """One decode step for (batch pid_b, BLOCK_D channels): window = [state, x]; out = act(w . window + bias);
    state <- window[1:]. Arithmetic is float32 on values rounded to the state's dtype, as the reference computes
    in the state's dtype; out is cast to x's dtype."""
    wait_for_inputs(USE_PDL)
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    state_dtype = state_ptr.dtype.element_ty

    x = tl.load(x_ptr + pid_b * stride_x_b + offs_d * stride_x_d, mask=mask_d, other=0.0).to(state_dtype)
    acc = _conv_update_row(state_ptr + pid_b * stride_state_b, x, w_ptr, bias_ptr, offs_d, mask_d, stride_state_d,
                           stride_state_k, stride_w_d, stride_w_k, HAS_BIAS, SILU, WIDTH, BLOCK_W)
    tl.store(out_ptr + pid_b * dim + offs_d, acc.to(state_dtype), mask=mask_d)


# A custom op for the same reason as `hymba::selective_state_update`: whole-graph compilation of the decode step.
@torch.library.custom_op("hymba::causal_conv1d_update", mutates_args=("state",))
def causal_conv1d_update_triton(state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                bias: torch.Tensor | None = None, activation: str | None = "silu",
                                block_d: int | None = None) -> torch.Tensor:
    """One step: x (batch, dim); `state` (batch, dim, width-1) is shifted in place to end with x.
    Returns (batch, dim) in x's dtype, as `causal_conv1d_update_ref`."""
    silu = _check_activation(activation)
    batch, dim = x.shape
    width = weight.shape[1]
    block_d = block_d or min(128, triton.next_power_of_2(dim))
    out = torch.empty(batch, dim, device=x.device, dtype=x.dtype)
    _conv_update_kernel[(batch, triton.cdiv(dim, block_d))](
        state, x, weight, bias, out,
        dim,
        *state.stride(), *x.stride(), *weight.stride(),
        HAS_BIAS=bias is not None, SILU=silu,
        WIDTH=width, BLOCK_D=block_d, BLOCK_W=triton.next_power_of_2(max(width - 1, 1)), **pdl_launch(x),
    )
    return out


@causal_conv1d_update_triton.register_fake
def _(state, x, weight, bias=None, activation="silu", block_d=None):
    return x.new_empty(x.shape)
