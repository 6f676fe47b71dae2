"""swiglu(x @ gate.T, x @ up.T) for decode batches in one kernel (see `hymba.ops.mlp`).

One program per (BLOCK_M rows, BLOCK_N outputs): it streams the same BLOCK_N rows of both weights over the hidden
dimension in BLOCK_K slices, accumulates both products in float32, rounds each to the model's dtype as the two linear
layers would, and stores silu(gate) * up. BLOCK_M covers the whole batch up to 128 rows (padded to tl.dot's 16), so
each weight is read once: weight-bound, the kernel's time is how fast it reads 2 x intermediate x hidden weights.

Triton is optional: this module is imported only when it is importable. Under TRITON_INTERPRET=1 the kernel also
takes CPU tensors, which is how the tests exercise it without a GPU.
"""

from __future__ import annotations

import os
from functools import cache

import torch
import triton
import triton.language as tl

from hymba.ops.launch import pdl_launch, wait_for_inputs

__all__ = ["gate_up_swiglu_triton"]

MAX_BLOCK_M = 128  # rows per program, at most; more rows take more programs (each reading the weights again)
# (rows up to, (block_n, block_k, num_warps, num_stages)): the fastest tiles at Hymba-1.5B's shape on an H200
# (bench_mlp.py; session 27 at 64 rows 9.8 us against 14.6 for the plain path and 12.3 with the 32-row tiles, at 128
# rows 15.2 against 15.8). Past the last entry, its tiles.
TILES = ((32, (64, 128, 4, 4)), (64, (64, 64, 4, 4)), (MAX_BLOCK_M, (64, 64, 8, 3)))
# Each pipeline stage holds one x tile and one tile of each weight; at 128 rows four stages of 128-wide K tiles need
# 256 KiB, past the H200's 227 KiB per program, so the stage count is capped to what fits the device.
INTERPRETER_SHARED_MEMORY_BYTES = 227 * 1024  # under TRITON_INTERPRET on CPU tensors: as an H100 / H200


def default_tiles(rows: int) -> tuple[int, int, int, int]:
    """(block_n, block_k, num_warps, num_stages) for `rows` rows, from TILES."""
    return next((tiles for limit, tiles in TILES if rows <= limit), TILES[-1][1])


@cache
def shared_memory_bytes(device: torch.device) -> int:
    """Shared memory one program may use on `device` (227 KiB on an H100 or H200, 163 KiB on an A100)."""
    if device.type != "cuda":
        return INTERPRETER_SHARED_MEMORY_BYTES
    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def pipeline_stages(block_m: int, block_n: int, block_k: int, element_size: int, shared_bytes: int,
                    stages: int) -> int:
    """`stages`, or fewer where that many stages of (x, gate, up) tiles would not fit in `shared_bytes`."""
    per_stage = (block_m + 2 * block_n) * block_k * element_size
    return max(1, min(stages, shared_bytes // per_stage))


@triton.jit
def _gate_up_swiglu_kernel(
    x_ptr, gate_ptr, up_ptr, out_ptr,
    rows, n, k,
    stride_x, stride_gate, stride_up, stride_out,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_inputs(USE_PDL)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < rows, offs_n < n
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for start in range(0, k, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k
        x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        w_mask = mask_n[:, None] & mask_k[None, :]
        gate = tl.load(gate_ptr + offs_n[:, None] * stride_gate + offs_k[None, :], mask=w_mask, other=0.0)
        up = tl.load(up_ptr + offs_n[:, None] * stride_up + offs_k[None, :], mask=w_mask, other=0.0)
        if DOT_FP32:  # float32 inputs, and the interpreter, whose bf16 tl.dot is wrong
            x32 = x.to(tl.float32)
            acc_gate += tl.dot(x32, tl.trans(gate.to(tl.float32)), input_precision="ieee")
            acc_up += tl.dot(x32, tl.trans(up.to(tl.float32)), input_precision="ieee")
        else:
            acc_gate += tl.dot(x, tl.trans(gate))
            acc_up += tl.dot(x, tl.trans(up))
    dtype = out_ptr.dtype.element_ty
    gate = acc_gate.to(dtype).to(tl.float32)
    up = acc_up.to(dtype).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], out.to(dtype),
             mask=mask_m[:, None] & mask_n[None, :])


# A custom op, so that the compiled decode step (`torch.compile(..., fullgraph=True)`) keeps the launch whole.
@torch.library.custom_op("hymba::gate_up_swiglu", mutates_args=())
def gate_up_swiglu_triton(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, block_n: int = 0,
                          block_k: int = 0, num_warps: int = 0, num_stages: int = 0) -> torch.Tensor:
    """x (rows, hidden); weights (intermediate, hidden), rows contiguous. Zero tuning arguments take the module's
    defaults."""
    rows, k = x.shape
    n = gate_weight.shape[0]
    if gate_weight.stride(1) != 1 or up_weight.stride(1) != 1:
        raise ValueError("gate_up_swiglu_triton reads weights whose rows are contiguous (as nn.Linear holds them)")
    x = x.contiguous()
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    tiles = default_tiles(rows)
    block_n, block_k, num_warps = block_n or tiles[0], block_k or tiles[1], num_warps or tiles[2]
    dot_fp32 = x.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    block_m = min(MAX_BLOCK_M, max(16, triton.next_power_of_2(rows)))  # 16: the smallest M of tl.dot
    num_stages = num_stages or pipeline_stages(block_m, block_n, block_k, x.element_size(),
                                               shared_memory_bytes(x.device), tiles[3])
    _gate_up_swiglu_kernel[(triton.cdiv(rows, block_m), triton.cdiv(n, block_n))](
        x, gate_weight, up_weight, out, rows, n, k,
        x.stride(0), gate_weight.stride(0), up_weight.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_FP32=dot_fp32,
        num_warps=num_warps, num_stages=num_stages, **pdl_launch(x),
    )
    return out


@gate_up_swiglu_triton.register_fake
def _(x, gate_weight, up_weight, block_n=0, block_k=0, num_warps=0, num_stages=0):
    return x.new_empty(x.shape[0], gate_weight.shape[0])
