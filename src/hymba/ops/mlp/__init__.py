"""The MLP's first half, swiglu(x @ gate.T, x @ up.T): `gate_up_swiglu` picks the implementation.

A decode step's MLP at a few rows is two weight-bound GEMVs and an elementwise kernel: on an H200 at batch 1 the
1.5B shape's gate and up GEMVs took 9.1 and 9.5 us each (1.9 TB/s of weights) and SwiGLU 1.2 us (docs/bench.md).
`hymba.ops.mlp.triton` reads both weights in one kernel, once for up to 128 rows, and applies SwiGLU to its tile
before storing it. It runs for up to `FUSED_MAX_ROWS` rows without gradients (0 turns it off). On an H200
(`benchmarks/bench_mlp.py`, session 18) it took 8.6-9.3 us at 1-32 rows against 11.5-13.8 for the plain path (1.3-1.6x)
and made the whole captured decode step at an 8K context 3-4% faster (batch 1: 3.16 -> 3.03 ms; batch 32: 4.51 ->
4.38). With 64-row tiles of 64 inputs (session 27) it took 9.8 against 14.6 us at 64 rows and the captured step 5.39
-> 5.31 ms; at 128 rows 15.2 against 15.8 us, but the step was not faster (7.62 against 7.70 ms), so 128 rows stay
with cuBLAS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hymba.ops import HALF_DTYPES, compiled_on_gpu, gpu_kernels_usable

__all__ = ["FUSED_MAX_ROWS", "gate_up_swiglu", "gate_up_swiglu_ref", "swiglu"]

FUSED_MAX_ROWS = 64


@compiled_on_gpu
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def gate_up_swiglu_ref(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate_weight.T) * (x @ up_weight.T), each product rounded to x's dtype as a linear layer's is."""
    return swiglu(F.linear(x, gate_weight), F.linear(x, up_weight))


def gate_up_swiglu(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor) -> torch.Tensor:
    """x (..., hidden); weights (intermediate, hidden). Returns (..., intermediate) in x's dtype."""
    rows = x.numel() // x.shape[-1]
    if (rows <= FUSED_MAX_ROWS and x.dtype in HALF_DTYPES and gpu_kernels_usable(x)
            and not (torch.is_grad_enabled() and (x.requires_grad or gate_weight.requires_grad))):
        from hymba.ops.mlp.triton import gate_up_swiglu_triton

        return gate_up_swiglu_triton(x.reshape(rows, x.shape[-1]), gate_weight, up_weight).view(
            *x.shape[:-1], gate_weight.shape[0])
    return gate_up_swiglu_ref(x, gate_weight, up_weight)
