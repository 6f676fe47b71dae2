"""Projections for decode rows, where a plain `nn.Linear` call leaves speed behind.

- `project(module, x)` is `module(x)`, through `hymba.ops.linear.triton`'s kernel where that applies (a plain
  `nn.Linear`, at most `SMALL_ROWS_MAX` rows, a bf16 or fp16 CUDA tensor, no gradients wanted). For the LM head's
  32,001 x 1,600 weight cuBLAS falls off its fast path: on an H200 (`benchmarks/bench_linear.py`, session 19) it took
  39.9 us at 1 row, 99 at 8, 136 at 32 and 135 at 128 (0.7-2.6 TB/s), where the kernel, one program per 64
  vocabulary rows streaming the weight once for all rows, took 25.6 / 26.4 / 28.4 / 39.7 us (2.6-4.0 TB/s).
- `fused_linear(x, weight, ...)` is a layer's projection with what surrounds it: the RMSNorm before it (or the
  average of the two branch norms), SwiGLU of two weights, the residual add after it (`fused_linear_ref` says
  exactly what). At most `FUSED_MAX_ROWS` rows of a bf16 or fp16 CUDA tensor without gradients run it as one
  kernel (`hymba.ops.linear.fused`); everything else runs the reference, which the compiled step fuses as inductor
  can. The kernel is off (0) until it beats the reference in the step. Its first version, an elementwise-FMA loop
  without pipelined loads, lost on an H200 (session 28, `benchmarks/bench_fused_linear.py`, 32 weights in a graph
  so none is read from L2; each kernel's best tile at 1 row): it won only where the reference is weakest (out_proj
  with the branch norms' average: 9.6 against 14.0 us; down_proj 10.8 against 11.8) and lost the in_proj (13.5
  against 11.8 us) and gate/up (16.6 against 14.0), so the compiled step at an 8K context took 2.53 ms against 2.22
  at 1 row. Rebuilt on tl.dot over 16 padded rows, with split-K for few outputs, it lost again (session 30, same
  benchmark, at 1 row): in_proj 19.1 against 11.8 us, out_proj 15.6 against 12.5, gate/up 16.8 against 14.0; only
  down_proj won (7.6 against 10.7), whose residual add the compiled step already fuses into the next norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hymba.ops import HALF_DTYPES, gpu_kernels_usable
from hymba.ops.mlp import gate_up_swiglu
from hymba.ops.norm import normed_input

__all__ = ["FUSED_MAX_ROWS", "SMALL_ROWS_MAX", "fused_linear", "fused_linear_ref", "project"]

SMALL_ROWS_MAX = 128  # rows: one program holds them all (MAX_BLOCK_M); measured to 128
FUSED_MAX_ROWS = 0  # off: see above. At most 4 (`hymba.ops.linear.fused.MAX_ROWS`) when on


def project(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) for x (..., in_features). A wrapped layer (a LoRA adapter) always runs as itself."""
    rows = x.numel() // x.shape[-1]
    if (type(module) is nn.Linear and rows <= SMALL_ROWS_MAX and x.dtype in HALF_DTYPES and gpu_kernels_usable(x)
            and not (torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad))):
        from hymba.ops.linear.triton import small_rows_linear

        return small_rows_linear(x.reshape(rows, x.shape[-1]), module.weight, module.bias).view(
            *x.shape[:-1], module.out_features)
    return module(x)


def fused_linear_ref(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None,
                     x2: torch.Tensor | None = None, norm2_weight: torch.Tensor | None = None, eps: float = 1e-6,
                     bias: torch.Tensor | None = None, up_weight: torch.Tensor | None = None,
                     residual: torch.Tensor | None = None) -> torch.Tensor:
    """residual + f(h @ weight.T + bias), where h is x, or rms_norm(x) with `norm_weight`, or the average
    (rms_norm(x) + rms_norm(x2)) / 2 with `norm2_weight` too; f is the identity, or with `up_weight`
    swiglu(., h @ up_weight.T) (no bias then: the MLP has none). Each step rounded to x's dtype as the separate
    modules round it."""
    if up_weight is not None and bias is not None:
        raise ValueError("fused_linear takes a bias or an up_weight, not both")
    h = normed_input(x, norm_weight, x2, norm2_weight, eps)
    out = gate_up_swiglu(h, weight, up_weight) if up_weight is not None else F.linear(h, weight, bias)
    return out if residual is None else residual + out


def fused_linear(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None,
                 x2: torch.Tensor | None = None, norm2_weight: torch.Tensor | None = None, eps: float = 1e-6,
                 bias: torch.Tensor | None = None, up_weight: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """`fused_linear_ref` for x (..., in_features) (x2 and residual shaped alike), as one kernel at a few rows."""
    rows = x.numel() // x.shape[-1]
    if (rows <= FUSED_MAX_ROWS and x.dtype in HALF_DTYPES and gpu_kernels_usable(x)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        from hymba.ops.linear.fused import fused_rows_linear

        flat = lambda t: None if t is None else t.reshape(rows, t.shape[-1])  # noqa: E731
        return fused_rows_linear(flat(x), weight, norm_weight, flat(x2), norm2_weight, eps, bias, up_weight,
                                 flat(residual)).view(*x.shape[:-1], weight.shape[0])
    return fused_linear_ref(x, weight, norm_weight, x2, norm2_weight, eps, bias, up_weight, residual)
