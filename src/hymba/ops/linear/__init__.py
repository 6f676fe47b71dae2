"""A linear layer's product for decode rows: `project(module, x)` is `module(x)`, through `hymba.ops.linear.triton`'s
kernel where that applies (a plain `nn.Linear`, at most `SMALL_ROWS_MAX` rows, a CUDA tensor, no gradients wanted).

At a few rows a projection is a weight-bound GEMV. cuBLAS read the 1.5B shape's decode weights at 1.9-2.6 TB/s on
an H200 (in_proj 11.3 us, out_proj 6.2 + 1.8 us of split-K reduction, down_proj 8.7 + 1.7; docs/bench.md) where the
fused gate/up kernel, the same tiling over two weights, reached 4.1 TB/s. The kernel reads each weight once for up to
128 rows and splits the reduction over the inputs where the outputs alone give too few programs (down_proj's 1,600
outputs in blocks of 64 are 25). 0 (the default) keeps `module(x)` until `benchmarks/bench_linear.py` measures it
faster on a GPU.
"""

from __future__ import annotations

import torch
from torch import nn

from hymba.ops import gpu_kernels_usable

__all__ = ["SMALL_ROWS_MAX", "project"]

SMALL_ROWS_MAX = 0


def project(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) for x (..., in_features). A wrapped layer (a LoRA adapter) always runs as itself."""
    rows = x.numel() // x.shape[-1]
    if (type(module) is nn.Linear and rows <= SMALL_ROWS_MAX and gpu_kernels_usable(x)
            and not (torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad))):
        from hymba.ops.linear.triton import small_rows_linear

        return small_rows_linear(x.reshape(rows, x.shape[-1]), module.weight, module.bias).view(
            *x.shape[:-1], module.out_features)
    return module(x)
