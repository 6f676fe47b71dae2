"""x @ weight.T (+ bias) for decode rows in one Triton kernel (see `hymba.ops.linear`).

One program per (BLOCK_N outputs, slice of the inputs): it streams its BLOCK_N rows of the weight over its slice in
BLOCK_K steps against all rows of x (padded to tl.dot's 16), accumulating in float32, so each weight element is read
once for up to 128 rows. With one slice it adds the bias and stores the output in x's dtype, rounded once as a linear
layer's is; with several (split-K, chosen so the grid holds about `TARGET_PROGRAMS` programs) each stores a float32
partial sum and PyTorch adds them up, in a fixed order (deterministic, no atomics), before the bias and the rounding.

Triton is optional: this module is imported only when it is importable. Under TRITON_INTERPRET=1 the kernel also
takes CPU tensors, which is how the tests exercise it without a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hymba.ops.launch import pdl_launch, wait_for_inputs

__all__ = ["small_rows_linear", "split_k"]

MAX_BLOCK_M = 128  # rows per program, at most; more rows take more programs (each reading the weight again)
BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = 64, 64, 4, 4  # the LM head's fastest tile at 1-32 rows on an H200
TARGET_PROGRAMS = 264  # two per SM of an H200


@triton.jit
def _small_rows_linear_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    rows, n, k, k_per_split,
    stride_x, stride_w, stride_out_split, stride_out,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_inputs(USE_PDL)
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < rows, offs_n < n
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, k)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for start in range(k_start, k_end, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * stride_w + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                    other=0.0)
        if DOT_FP32:  # float32 inputs, and the interpreter, whose bf16 tl.dot is wrong
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    out_ptrs = out_ptr + pid_k * stride_out_split + offs_m[:, None] * stride_out + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT:
        tl.store(out_ptrs, acc, mask=mask)  # float32 partials, summed by the caller
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def split_k(n: int, k: int, block_n: int = BLOCK_N, block_k: int = BLOCK_K) -> int:
    """Slices of the inputs for `n` outputs: enough for about TARGET_PROGRAMS programs, each slice at least 4 steps of
    block_k long."""
    output_blocks = triton.cdiv(n, block_n)
    return max(1, min(triton.cdiv(TARGET_PROGRAMS, output_blocks), k // (4 * block_k)))


# A custom op, so that the compiled decode step (`torch.compile(..., fullgraph=True)`) keeps the launch whole.
@torch.library.custom_op("hymba::small_rows_linear", mutates_args=())
def small_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, splits: int = 0,
                      block_n: int = 0, block_k: int = 0, num_warps: int = 0, num_stages: int = 0) -> torch.Tensor:
    """x (rows, in_features); weight (out_features, in_features) with contiguous rows, as nn.Linear holds it. Zero
    tuning arguments take the module's defaults (`splits`: `split_k`)."""
    rows, k = x.shape
    n = weight.shape[0]
    if weight.stride(1) != 1:
        raise ValueError("small_rows_linear reads a weight whose rows are contiguous (as nn.Linear holds it)")
    x = x.contiguous()
    block_n, block_k = block_n or BLOCK_N, block_k or BLOCK_K
    splits = splits or split_k(n, k, block_n, block_k)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k  # slices start on block boundaries
    splits = triton.cdiv(k, k_per_split)
    block_m = min(MAX_BLOCK_M, max(16, triton.next_power_of_2(rows)))  # 16: the smallest M of tl.dot
    if splits > 1:
        out = torch.empty(splits, rows, n, device=x.device, dtype=torch.float32)
    else:
        out = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    _small_rows_linear_kernel[(triton.cdiv(rows, block_m), triton.cdiv(n, block_n), splits)](
        x, weight, bias, out, rows, n, k, k_per_split,
        x.stride(0), weight.stride(0), out.stride(0) if splits > 1 else 0, out.stride(-2),
        HAS_BIAS=bias is not None, SPLIT=splits > 1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_FP32=x.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=num_warps or NUM_WARPS, num_stages=num_stages or NUM_STAGES, **pdl_launch(x),
    )
    if splits == 1:
        return out
    total = out.sum(0)
    if bias is not None:
        total += bias.float()
    return total.to(x.dtype)


@small_rows_linear.register_fake
def _(x, weight, bias=None, splits=0, block_n=0, block_k=0, num_warps=0, num_stages=0):
    return x.new_empty(x.shape[0], weight.shape[0])
