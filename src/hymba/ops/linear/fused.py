"""A decode step's projections at a few rows, each one kernel with what surrounds it (see `hymba.ops.linear`).

At one to a few rows a projection is a GEMV bound by reading its weight, and the small elementwise kernels around it
(the RMSNorm before it, the residual add after it) cost about as much again in launches and ramp-up. One program per
BLOCK_N outputs:

1. with input norms, sums the squares of each row's input (or of both inputs, for the branch norms' average) over
   the whole row;
2. streams its BLOCK_N rows of the weight (of both weights, for SwiGLU) in BLOCK_K slices, normalising the matching
   slice of the input on the way in, and accumulates products in float32 elementwise (no tensor-core tile to pad
   the rows to);
3. reduces, rounds to the model's dtype as a linear layer does, and applies the epilogue: the bias, SwiGLU, the
   residual add.

Every intermediate is rounded where `fused_linear_ref` rounds it (each norm's cast back, its scale, their sum), so
only the order of the float32 sums differs from it.

On CUDA the kernels launch as programmatic dependents (PDL): a kernel's programs may start while the kernel before it
finishes, and wait (`gdc_wait`) before they touch anything but their weights, which no kernel of the step writes.

Triton is optional: this module is imported only when it is importable. Under TRITON_INTERPRET=1 the kernel also
takes CPU tensors, which is how the tests exercise it without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["TILES", "fused_rows_linear"]

# Outputs per program and input slice per step by (norms, SwiGLU), and warps per program.
TILES = {"default": (8, 512, 4), "swiglu": (8, 256, 4)}


@triton.jit
def _normed_slice(x_ptr, norm_ptr, rstd, offs_m, offs_k, mask_m, mask_k, stride_x, NORMED: tl.constexpr):
    """Rows offs_m, inputs offs_k of x, RMS-normalised and scaled as `rms_norm` does (each step rounded to x's
    dtype)."""
    x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                other=0.0)
    if NORMED:
        dtype = x.dtype
        x = (x.to(tl.float32) * rstd[:, None]).to(dtype)
        scale = tl.load(norm_ptr + offs_k, mask=mask_k, other=0.0)
        x = (scale[None, :].to(tl.float32) * x.to(tl.float32)).to(dtype)
    return x


@triton.jit
def _rstd(x_ptr, offs_m, mask_m, k, stride_x, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / RMS of each row offs_m of x (k inputs), in float32."""
    squares = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for start in range(0, k, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=mask_m[:, None] & (offs_k < k)[None, :],
                    other=0.0).to(tl.float32)
        squares += x * x
    return tl.rsqrt(tl.sum(squares, axis=1) / k + eps)


@triton.jit
def _fused_rows_linear_kernel(
    x_ptr, norm_ptr, x2_ptr, norm2_ptr, w_ptr, up_ptr, bias_ptr, residual_ptr, out_ptr,
    rows, n, k, eps,
    stride_x, stride_x2, stride_w, stride_up, stride_residual, stride_out,
    NORMS: tl.constexpr, SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < rows, offs_n < n
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # the inputs are the previous kernel's outputs
        tl.extra.cuda.gdc_launch_dependents()
    rstd = tl.zeros((BLOCK_M,), tl.float32)
    rstd2 = tl.zeros((BLOCK_M,), tl.float32)
    if NORMS >= 1:
        rstd = _rstd(x_ptr, offs_m, mask_m, k, stride_x, eps, BLOCK_M, BLOCK_K)
    if NORMS == 2:
        rstd2 = _rstd(x2_ptr, offs_m, mask_m, k, stride_x2, eps, BLOCK_M, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), tl.float32)
    for start in range(0, k, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k
        h = _normed_slice(x_ptr, norm_ptr, rstd, offs_m, offs_k, mask_m, mask_k, stride_x, NORMS >= 1)
        if NORMS == 2:  # the branch norms' average, rounded as (norm_a(a) + norm_b(b)) / 2 is
            h2 = _normed_slice(x2_ptr, norm2_ptr, rstd2, offs_m, offs_k, mask_m, mask_k, stride_x2, True)
            h = ((h.to(tl.float32) + h2.to(tl.float32)).to(h.dtype).to(tl.float32) / 2).to(h.dtype)
        h = h.to(tl.float32)[:, None, :]
        w_mask = mask_n[:, None] & mask_k[None, :]
        w = tl.load(w_ptr + offs_n[:, None] * stride_w + offs_k[None, :], mask=w_mask, other=0.0)
        acc += h * w.to(tl.float32)[None, :, :]
        if SWIGLU:
            up = tl.load(up_ptr + offs_n[:, None] * stride_up + offs_k[None, :], mask=w_mask, other=0.0)
            acc_up += h * up.to(tl.float32)[None, :, :]
    dtype = out_ptr.dtype.element_ty
    out = tl.sum(acc, axis=2)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out.to(dtype).to(tl.float32)
    if SWIGLU:
        up = tl.sum(acc_up, axis=2).to(dtype).to(tl.float32)
        out = (out * tl.sigmoid(out)).to(dtype).to(tl.float32) * up
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + offs_m[:, None] * stride_residual + offs_n[None, :], mask=mask, other=0.0)
        out = out.to(dtype).to(tl.float32) + residual.to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], out.to(dtype), mask=mask)


INTERPRETED = not isinstance(_fused_rows_linear_kernel, triton.runtime.JITFunction)


# A custom op, so that the compiled decode step (`torch.compile(..., fullgraph=True)`) keeps the launch whole.
@torch.library.custom_op("hymba::fused_rows_linear", mutates_args=())
def fused_rows_linear(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None,
                      x2: torch.Tensor | None = None, norm2_weight: torch.Tensor | None = None, eps: float = 1e-6,
                      bias: torch.Tensor | None = None, up_weight: torch.Tensor | None = None,
                      residual: torch.Tensor | None = None, block_n: int = 0, block_k: int = 0,
                      num_warps: int = 0, pdl: bool = True) -> torch.Tensor:
    """`fused_linear_ref` for x (rows, k) (and x2, residual alike; rows at most 4 by design, as the accumulators
    hold every row); weights (n, k) with contiguous rows. Zero tuning arguments take TILES."""
    rows, k = x.shape
    n = weight.shape[0]
    if weight.stride(1) != 1 or (up_weight is not None and up_weight.stride(1) != 1):
        raise ValueError("fused_rows_linear reads weights whose rows are contiguous (as nn.Linear holds them)")
    x = x.contiguous()
    x2 = x if x2 is None else x2.contiguous()
    residual_stride = 0 if residual is None else residual.stride(0)
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    tiles = TILES["swiglu" if up_weight is not None else "default"]
    block_n, block_k, num_warps = block_n or tiles[0], block_k or tiles[1], num_warps or tiles[2]
    norms = 0 if norm_weight is None else 1 if norm2_weight is None else 2
    use_pdl = pdl and x.is_cuda and not INTERPRETED
    _fused_rows_linear_kernel[(triton.cdiv(n, block_n),)](
        x, norm_weight, x2, norm2_weight, weight, up_weight, bias, residual, out,
        rows, n, k, eps,
        x.stride(0), x2.stride(0), weight.stride(0), 0 if up_weight is None else up_weight.stride(0),
        residual_stride, out.stride(0),
        NORMS=norms, SWIGLU=up_weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        BLOCK_M=max(1, triton.next_power_of_2(rows)), BLOCK_N=block_n, BLOCK_K=block_k, USE_PDL=use_pdl,
        num_warps=num_warps, **({"launch_pdl": True} if use_pdl else {}),
    )
    return out


@fused_rows_linear.register_fake
def _(x, weight, norm_weight=None, x2=None, norm2_weight=None, eps=1e-6, bias=None, up_weight=None, residual=None,
      block_n=0, block_k=0, num_warps=0, pdl=True):
    return x.new_empty(x.shape[0], weight.shape[0])
