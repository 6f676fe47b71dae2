"""The LM head's product for decode rows: `project(module, x)` is `module(x)`, through `hymba.ops.linear.triton`'s
kernel where that applies (a plain `nn.Linear`, at most `SMALL_ROWS_MAX` rows, a bf16 or fp16 CUDA tensor, no
gradients wanted).

At a few rows a projection is a weight-bound GEMV. For the LM head's 32,001 x 1,600 weight cuBLAS falls off its fast
path: on an H200 (`benchmarks/bench_linear.py`, session 19) it took 39.9 us at 1 row, 99 at 8, 136 at 32 and 135 at
128 (0.7-2.6 TB/s), where the kernel, one program per 64 vocabulary rows streaming the weight once for all rows, took
25.6 / 26.4 / 28.4 / 39.7 us (2.6-4.0 TB/s). For the layers' own projections (in_proj, out_proj, down_proj) cuBLAS
won at 1-32 rows (the kernel 0.55-0.9x, split-K included), so they stay `nn.Linear` calls.
"""

from __future__ import annotations

import torch
from torch import nn

from hymba.ops import HALF_DTYPES, gpu_kernels_usable

__all__ = ["SMALL_ROWS_MAX", "project"]

SMALL_ROWS_MAX = 128  # rows: one program holds them all (MAX_BLOCK_M); measured to 128


def project(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) for x (..., in_features). A wrapped layer (a LoRA adapter) always runs as itself."""
    rows = x.numel() // x.shape[-1]
    if (type(module) is nn.Linear and rows <= SMALL_ROWS_MAX and x.dtype in HALF_DTYPES and gpu_kernels_usable(x)
            and not (torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad))):
        from hymba.ops.linear.triton import small_rows_linear

        return small_rows_linear(x.reshape(rows, x.shape[-1]), module.weight, module.bias).view(
            *x.shape[:-1], module.out_features)
    return module(x)
