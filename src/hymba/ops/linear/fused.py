"""A decode step's projections at a few rows, each one kernel with what surrounds it (see `hymba.ops.linear`).

At one to a few rows a projection is a GEMV bound by reading its weight, and the small elementwise kernels around it
(the RMSNorm before it, the residual add after it) cost about as much again in launches and ramp-up. One program per
BLOCK_N outputs (and per slice of the inputs, split-K) streams its BLOCK_N rows of the weight (of both weights, for
SwiGLU) in BLOCK_K steps against the rows of x padded to tl.dot's 16, so Triton pipelines the weight's loads as it
does for a GEMM; an elementwise-FMA loop, which it does not pipeline, left each program waiting on every slice.

The norm's scale is linear, so it is taken out of the loop: with s = 1/RMS(x),
    (w_norm * x * s) @ W.T = s * ((w_norm * x) @ W.T),
and the loop multiplies each slice of x by w_norm as it loads it, adding up the squares for s on the way: there is
no pass over x before the first weight load. The branch norms' average takes a second accumulator for x2 on the
same weight tile, (s (w1 * x) @ W.T + s2 (w2 * x2) @ W.T) / 2. The epilogue scales, adds the bias, rounds to the
model's dtype as a linear layer does, and applies SwiGLU and the residual add, each rounded where
`fused_linear_ref` rounds it. The norm itself is not rounded where the reference rounds it (x * s to the dtype, then
the scale), so in bf16 the two differ by about bf16's precision.

Split-K, for projections with few outputs (out_proj and down_proj, 1,600): each program stores its float32 partial
sums (and its slice's sums of squares), and a second kernel adds them up in a fixed order (one load of all splits)
and runs the same epilogue.

On sm_90+ GPUs the kernels launch as programmatic dependents (PDL, `hymba.ops.launch`).

Triton is optional: this module is imported only when it is importable. Under TRITON_INTERPRET=1 the kernels also
take CPU tensors, which is how the tests exercise them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hymba.ops.launch import pdl_launch, wait_for_inputs

__all__ = ["TILES", "fused_rows_linear"]

MAX_ROWS = 16  # rows, padded to tl.dot's smallest M
# (block_n, block_k, num_warps, num_stages): with SwiGLU (two weight tiles a step), and without.
TILES = {"swiglu": (64, 128, 4, 4), "default": (64, 64, 4, 4)}
TARGET_PROGRAMS = 264  # two per SM of an H200: below it, split-K (where there is no SwiGLU)


@triton.jit
def _dot(h, w, DOT_FP32: tl.constexpr):
    """h (M, K) float32 @ w (N, K).T in float32; on tensor cores in w's dtype unless DOT_FP32 (float32 weights, and
    the interpreter, whose bf16 tl.dot is wrong)."""
    if DOT_FP32:
        return tl.dot(h, tl.trans(w.to(tl.float32)), input_precision="ieee")
    return tl.dot(h.to(w.dtype), tl.trans(w))


@triton.jit
def _scaled_slice(x_ptr, norm_ptr, offs_m, offs_k, mask_m, mask_k, stride_x, NORMED: tl.constexpr):
    """Rows offs_m, inputs offs_k of x in float32, times the norm's scale where NORMED; and their squares."""
    x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                other=0.0).to(tl.float32)
    h = x
    if NORMED:
        h = tl.load(norm_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :] * x
    return h, x * x


@triton.jit
def _epilogue(acc, acc2, acc_up, squares, squares2, offs_m, offs_n, mask_m, mask_n, k, eps,
              bias_ptr, residual_ptr, out_ptr, stride_residual, stride_out,
              NORMS: tl.constexpr, SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """The norms' 1/RMS (from the rows' sums of squares over all k inputs), the bias, the rounding to the output's
    dtype, SwiGLU and the residual add, then the store."""
    if NORMS >= 1:
        inv_rms = tl.rsqrt(squares / k + eps)[:, None]
        acc = acc * inv_rms
        if SWIGLU:
            acc_up = acc_up * inv_rms
    if NORMS == 2:
        acc = (acc + acc2 * tl.rsqrt(squares2 / k + eps)[:, None]) / 2
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    dtype = out_ptr.dtype.element_ty
    out = acc.to(dtype).to(tl.float32)
    if SWIGLU:
        out = (out * tl.sigmoid(out)).to(dtype).to(tl.float32) * acc_up.to(dtype).to(tl.float32)
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + offs_m[:, None] * stride_residual + offs_n[None, :], mask=mask, other=0.0)
        out = out.to(dtype).to(tl.float32) + residual.to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], out.to(dtype), mask=mask)


@triton.jit
def _fused_rows_linear_kernel(
    x_ptr, norm_ptr, x2_ptr, norm2_ptr, w_ptr, up_ptr, bias_ptr, residual_ptr, out_ptr, part_ptr, squares_ptr,
    rows, n, k, k_per_split, eps,
    stride_x, stride_x2, stride_w, stride_up, stride_residual, stride_out,
    NORMS: tl.constexpr, SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Outputs block pid_n over inputs [pid_k * k_per_split, + k_per_split). With SPLIT, the partials go to
    part (2, splits, rows, n) (x's products, then x2's) and the sums of squares to squares (2, splits, rows)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < rows, offs_n < n
    wait_for_inputs(USE_PDL)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, k)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    squares = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    squares2 = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for start in range(k_start, k_end, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        w_mask = mask_n[:, None] & mask_k[None, :]
        w = tl.load(w_ptr + offs_n[:, None] * stride_w + offs_k[None, :], mask=w_mask, other=0.0)
        h, x_squares = _scaled_slice(x_ptr, norm_ptr, offs_m, offs_k, mask_m, mask_k, stride_x, NORMS >= 1)
        squares += x_squares
        acc += _dot(h, w, DOT_FP32)
        if NORMS == 2:
            h2, x2_squares = _scaled_slice(x2_ptr, norm2_ptr, offs_m, offs_k, mask_m, mask_k, stride_x2, True)
            squares2 += x2_squares
            acc2 += _dot(h2, w, DOT_FP32)
        if SWIGLU:
            up = tl.load(up_ptr + offs_n[:, None] * stride_up + offs_k[None, :], mask=w_mask, other=0.0)
            acc_up += _dot(h, up, DOT_FP32)
    row_squares = tl.sum(squares, axis=1)
    row_squares2 = tl.sum(squares2, axis=1)
    if SPLIT:
        splits = tl.num_programs(1)
        mask = mask_m[:, None] & mask_n[None, :]
        part = part_ptr + (pid_k * rows + offs_m[:, None]) * n + offs_n[None, :]
        tl.store(part, acc, mask=mask)
        if NORMS == 2:
            tl.store(part + splits * rows * n, acc2, mask=mask)
        if NORMS >= 1:
            if pid_n == 0:  # every output block sums the same squares: one stores them
                tl.store(squares_ptr + pid_k * rows + offs_m, row_squares, mask=mask_m)
                if NORMS == 2:
                    tl.store(squares_ptr + (splits + pid_k) * rows + offs_m, row_squares2, mask=mask_m)
    else:
        _epilogue(acc, acc2, acc_up, row_squares, row_squares2, offs_m, offs_n, mask_m, mask_n, k, eps,
                  bias_ptr, residual_ptr, out_ptr, stride_residual, stride_out, NORMS, SWIGLU, HAS_BIAS, HAS_RESIDUAL)


@triton.jit
def _split_epilogue_kernel(
    part_ptr, squares_ptr, bias_ptr, residual_ptr, out_ptr,
    rows, n, k, splits, eps, stride_residual, stride_out,
    NORMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr,
):
    """The split-K partials of outputs block pid_n summed in split order (all BLOCK_S >= splits in one load), then
    the epilogue."""
    pid_n = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < rows, offs_n < n
    wait_for_inputs(USE_PDL)
    mask_s = offs_s < splits
    mask = mask_s[:, None, None] & mask_m[None, :, None] & mask_n[None, None, :]
    part = part_ptr + (offs_s[:, None, None] * rows + offs_m[None, :, None]) * n + offs_n[None, None, :]
    acc = tl.sum(tl.load(part, mask=mask, other=0.0), axis=0)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if NORMS == 2:
        acc2 = tl.sum(tl.load(part + splits * rows * n, mask=mask, other=0.0), axis=0)
    squares = tl.zeros((BLOCK_M,), tl.float32)
    squares2 = tl.zeros((BLOCK_M,), tl.float32)
    square_offs = offs_s[:, None] * rows + offs_m[None, :]
    square_mask = mask_s[:, None] & mask_m[None, :]
    if NORMS >= 1:
        squares = tl.sum(tl.load(squares_ptr + square_offs, mask=square_mask, other=0.0), axis=0)
    if NORMS == 2:
        squares2 = tl.sum(tl.load(squares_ptr + splits * rows + square_offs, mask=square_mask, other=0.0), axis=0)
    _epilogue(acc, acc2, acc, squares, squares2, offs_m, offs_n, mask_m, mask_n, k, eps,
              bias_ptr, residual_ptr, out_ptr, stride_residual, stride_out, NORMS, False, HAS_BIAS, HAS_RESIDUAL)


INTERPRETED = not isinstance(_fused_rows_linear_kernel, triton.runtime.JITFunction)


def split_k(n: int, k: int, block_n: int, block_k: int) -> int:
    """Input slices for `n` outputs: enough for about TARGET_PROGRAMS programs, each at least two steps of block_k
    long."""
    return max(1, min(triton.cdiv(TARGET_PROGRAMS, triton.cdiv(n, block_n)), k // (2 * block_k)))


# A custom op, so that the compiled decode step (`torch.compile(..., fullgraph=True)`) keeps the launch whole.
@torch.library.custom_op("hymba::fused_rows_linear", mutates_args=())
def fused_rows_linear(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None,
                      x2: torch.Tensor | None = None, norm2_weight: torch.Tensor | None = None, eps: float = 1e-6,
                      bias: torch.Tensor | None = None, up_weight: torch.Tensor | None = None,
                      residual: torch.Tensor | None = None, block_n: int = 0, block_k: int = 0,
                      num_warps: int = 0, num_stages: int = 0, splits: int = 0, pdl: bool = True) -> torch.Tensor:
    """`fused_linear_ref` for x (rows, k) (and x2, residual alike; at most MAX_ROWS rows); weights (n, k) with
    contiguous rows. Zero tuning arguments take TILES and `split_k` (SwiGLU never splits)."""
    rows, k = x.shape
    n = weight.shape[0]
    if rows > MAX_ROWS:
        raise ValueError(f"fused_rows_linear takes at most {MAX_ROWS} rows, got {rows}")
    if weight.stride(1) != 1 or (up_weight is not None and up_weight.stride(1) != 1):
        raise ValueError("fused_rows_linear reads weights whose rows are contiguous (as nn.Linear holds them)")
    x = x.contiguous()
    x2 = x if x2 is None else x2.contiguous()
    residual_stride = 0 if residual is None else residual.stride(0)
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    swiglu = up_weight is not None
    tiles = TILES["swiglu" if swiglu else "default"]
    block_n, block_k = block_n or tiles[0], block_k or tiles[1]
    num_warps, num_stages = num_warps or tiles[2], num_stages or tiles[3]
    # SwiGLU never splits: its split path would need the up partials too, and its projection has outputs enough.
    splits = 1 if swiglu else splits or split_k(n, k, block_n, block_k)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k  # slices start on block boundaries
    splits = triton.cdiv(k, k_per_split)
    norms = 0 if norm_weight is None else 1 if norm2_weight is None else 2
    launch = dict(num_warps=num_warps, **pdl_launch(x, pdl))
    part = squares = out  # not read or written without split-K
    if splits > 1:
        part = torch.empty(2 if norms == 2 else 1, splits, rows, n, device=x.device, dtype=torch.float32)
        squares = torch.empty(2, splits, rows, device=x.device, dtype=torch.float32)
    flags = dict(NORMS=norms, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, BLOCK_M=MAX_ROWS,
                 BLOCK_N=block_n)
    _fused_rows_linear_kernel[(triton.cdiv(n, block_n), splits)](
        x, norm_weight, x2, norm2_weight, weight, up_weight, bias, residual, out, part, squares,
        rows, n, k, k_per_split, eps,
        x.stride(0), x2.stride(0), weight.stride(0), 0 if up_weight is None else up_weight.stride(0),
        residual_stride, out.stride(0),
        SWIGLU=swiglu, SPLIT=splits > 1, BLOCK_K=block_k, DOT_FP32=x.dtype == torch.float32 or INTERPRETED,
        num_stages=num_stages, **flags, **launch,
    )
    if splits > 1:
        _split_epilogue_kernel[(triton.cdiv(n, block_n),)](
            part, squares, bias, residual, out, rows, n, k, splits, eps, residual_stride, out.stride(0),
            BLOCK_S=triton.next_power_of_2(splits), **flags, **launch,
        )
    return out


@fused_rows_linear.register_fake
def _(x, weight, norm_weight=None, x2=None, norm2_weight=None, eps=1e-6, bias=None, up_weight=None, residual=None,
      block_n=0, block_k=0, num_warps=0, num_stages=0, splits=0, pdl=True):
    return x.new_empty(x.shape[0], weight.shape[0])
