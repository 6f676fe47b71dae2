"""A decode step's projections at one to a few rows, each one kernel with what surrounds it (see `hymba.ops.linear`).

At a few rows a projection is a GEMV bound by reading its weight, and the small kernels around it (the RMSNorm before
it, SwiGLU, the residual add after it) cost about as much again in launches and ramp-up. Here one program holds
BLOCK_N whole rows of the weight (of both weights, for SwiGLU): it issues every load of them at once, at its start,
so all of a program's bytes are in flight together instead of a loop's few stages. The weights are loaded before
the program waits for the kernel before it (`wait_for_inputs`, programmatic dependent launch on sm_90+): no kernel
of a decode step writes them, and a projection is never a step's first kernel, so they stream in while that kernel
drains. Then, for each row, x (and x2) is loaded whole, normed exactly as `fused_linear_ref` norms it (the same
float32 sums and the same roundings), multiplied into the weight rows with float32 FMAs and summed; the epilogue adds
the bias, rounds to the model's dtype as a linear layer does, and applies SwiGLU and the residual add, each rounded
where the reference rounds it. Only the order of the float32 sums differs from cuBLAS's.

The products are elementwise FMAs, not tensor-core dots, so the work grows with the rows: this is for MAX_ROWS at
most, where the weight's bytes dominate. The two versions before this one lost to cuBLAS on an H200 (session 28: an
elementwise loop over slices of the inputs, which Triton does not pipeline; session 29: a tl.dot loop over 16 padded
rows with split-K: 1.0-2.3 TB/s at one row), see `hymba.ops.linear`.

Triton is optional: this module is imported only when it is importable. Under TRITON_INTERPRET=1 the kernel also
takes CPU tensors, which is how the tests exercise it without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hymba.ops.launch import pdl_launch, wait_for_inputs

__all__ = ["MAX_ROWS", "TILES", "fused_rows_linear"]

MAX_ROWS = 4
# (weight elements a program holds, per weight; num_warps): with SwiGLU (two weights), and without. BLOCK_N is the
# elements over the row's padded length (a power of two), so each program holds about the same bytes whatever the
# projection's shape. Compiled offline for sm_90 at Hymba-1.5B's shapes these take 62-96 registers a thread and
# spill nothing; a program's weight loads are all issued before its wait (`griddepcontrol.wait`).
TILES = {"swiglu": (8192, 4), "default": (16384, 8)}


@triton.jit
def _rounded_as_product(v, x_ptr, norm_ptr):
    """v (float32) rounded as PyTorch stores a product of x and a norm weight: to their dtype where they agree, else
    float32 (the wider of bf16 / fp16 and float32, and what bf16 and fp16 promote to)."""
    if norm_ptr.dtype.element_ty == x_ptr.dtype.element_ty:
        v = v.to(x_ptr.dtype.element_ty).to(tl.float32)
    return v


@triton.jit
def _normed_row(x_ptr, norm_ptr, offs_k, mask_k, k, eps, NORMED: tl.constexpr):
    """One row of x in float32, rms-normed with the norm's weight where NORMED as `_scaled_norm` computes it: normalised
    in float32, rounded to x's dtype, then scaled (the product rounded to the wider of the two dtypes)."""
    x = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    if NORMED:
        x = (x * tl.rsqrt(tl.sum(x * x, axis=0) / k + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
        weight = tl.load(norm_ptr + offs_k, mask=mask_k, other=0.0)
        x = _rounded_as_product(weight.to(tl.float32) * x, x_ptr, norm_ptr)
    return x


@triton.jit
def _fused_rows_linear_kernel(
    x_ptr, norm_ptr, x2_ptr, norm2_ptr, w_ptr, up_ptr, bias_ptr, residual_ptr, out_ptr,
    rows, n, k, eps,
    stride_x, stride_x2, stride_w, stride_up, stride_residual, stride_out,
    NORMS: tl.constexpr, SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Outputs offs_n of every row: BLOCK_N whole weight rows (BLOCK_K >= k inputs), loaded before the wait."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n, mask_k = offs_n < n, offs_k < k
    w_offs = offs_n[:, None] * stride_w + offs_k[None, :]
    w_mask = mask_n[:, None] & mask_k[None, :]
    w = tl.load(w_ptr + w_offs, mask=w_mask, other=0.0)
    up = w
    if SWIGLU:
        up = tl.load(up_ptr + offs_n[:, None] * stride_up + offs_k[None, :], mask=w_mask, other=0.0)
    bias = tl.zeros((BLOCK_N,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    wait_for_inputs(USE_PDL)

    dtype = out_ptr.dtype.element_ty
    for row in range(rows):
        h = _normed_row(x_ptr + row * stride_x, norm_ptr, offs_k, mask_k, k, eps, NORMS >= 1)
        if NORMS == 2:
            h2 = _normed_row(x2_ptr + row * stride_x2, norm2_ptr, offs_k, mask_k, k, eps, True)
            h = (_rounded_as_product(h + h2, x_ptr, norm_ptr) / 2).to(dtype).to(tl.float32)
        elif NORMS == 1:
            h = h.to(dtype).to(tl.float32)
        out = (tl.sum(w.to(tl.float32) * h[None, :], axis=1) + bias).to(dtype).to(tl.float32)
        if SWIGLU:
            gate = out
            out = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
            out = out * tl.sum(up.to(tl.float32) * h[None, :], axis=1).to(dtype).to(tl.float32)
        if HAS_RESIDUAL:
            residual = tl.load(residual_ptr + row * stride_residual + offs_n, mask=mask_n, other=0.0)
            out = out.to(dtype).to(tl.float32) + residual.to(tl.float32)
        tl.store(out_ptr + row * stride_out + offs_n, out.to(dtype), mask=mask_n)


def block_n_for(k: int, tile_elements: int) -> int:
    """Weight rows per program: `tile_elements` over the row's padded length, at least 1."""
    return max(1, tile_elements // triton.next_power_of_2(k))


# A custom op, so that the compiled decode step (`torch.compile(..., fullgraph=True)`) keeps the launch whole.
@torch.library.custom_op("hymba::fused_rows_linear", mutates_args=())
def fused_rows_linear(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None,
                      x2: torch.Tensor | None = None, norm2_weight: torch.Tensor | None = None, eps: float = 1e-6,
                      bias: torch.Tensor | None = None, up_weight: torch.Tensor | None = None,
                      residual: torch.Tensor | None = None, tile_elements: int = 0, num_warps: int = 0,
                      pdl: bool = True) -> torch.Tensor:
    """`fused_linear_ref` for x (rows, k) (and x2, residual alike; at most MAX_ROWS rows); weights (n, k) with
    contiguous rows. Zero tuning arguments take TILES'; `pdl=False` launches without programmatic dependence."""
    rows, k = x.shape
    n = weight.shape[0]
    if rows > MAX_ROWS:
        raise ValueError(f"fused_rows_linear takes at most {MAX_ROWS} rows, got {rows}")
    if weight.stride(1) != 1 or (up_weight is not None and up_weight.stride(1) != 1):
        raise ValueError("fused_rows_linear reads weights whose rows are contiguous (as nn.Linear holds them)")
    x = x.contiguous()
    x2 = x if x2 is None else x2.contiguous()
    swiglu = up_weight is not None
    elements, warps = TILES["swiglu" if swiglu else "default"]
    block_n = block_n_for(k, tile_elements or elements)
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    _fused_rows_linear_kernel[(triton.cdiv(n, block_n),)](
        x, norm_weight, x2, norm2_weight, weight, up_weight, bias, residual, out,
        rows, n, k, eps,
        x.stride(0), x2.stride(0), weight.stride(0), 0 if up_weight is None else up_weight.stride(0),
        0 if residual is None else residual.stride(0), out.stride(0),
        NORMS=0 if norm_weight is None else 1 if norm2_weight is None else 2, SWIGLU=swiglu,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        BLOCK_N=block_n, BLOCK_K=triton.next_power_of_2(k),
        num_warps=num_warps or warps, **pdl_launch(x, pdl),
    )
    return out


@fused_rows_linear.register_fake
def _(x, weight, norm_weight=None, x2=None, norm2_weight=None, eps=1e-6, bias=None, up_weight=None, residual=None,
      tile_elements=0, num_warps=0, pdl=True):
    return x.new_empty(x.shape[0], weight.shape[0])
