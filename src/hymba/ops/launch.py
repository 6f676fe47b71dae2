"""Programmatic dependent launch (PDL) for the decode step's Triton kernels, on sm_90 and newer GPUs.

A decode step is a chain of short kernels, each waiting for the one before it: without PDL a kernel's programs start
only once the kernel before it has drained and flushed its writes, about a microsecond per kernel boundary in a CUDA
graph. Launched as a programmatic dependent (Triton's `launch_pdl`), a kernel may start while the one before it is
still finishing; `wait_for_inputs` at its top waits, on the GPU, until that kernel has completed and its writes are
visible, and then lets the kernel after it start in turn. Kernels of other libraries (cuBLAS) before or after one
simply serialize as before.

What a kernel may read before the call: since every kernel waits before it lets the next one start, when a kernel
starts only the kernel right before it may still be running. So the weights, which no kernel of a step writes, and a
kernel's own recurrent state (the SSM state of the state update), which no other kernel writes, may be loaded before
the wait, and stream in while the kernel before drains; everything a step computes is read after it. The result is
the same with PDL or without.

`hymba.ops.PDL = False` (or `HYMBA_PDL=0` in the environment) launches every kernel without it. These kernels read
it at each launch, so a CUDA graph captured after the change has none of theirs; inductor's read it when the decode
step is first compiled in the process (`hymba.generate.inductor_options`).

Triton is optional: this module is imported only when it is importable.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

import hymba.ops

__all__ = ["pdl_launch", "wait_for_inputs"]


@triton.jit
def wait_for_inputs(USE_PDL: tl.constexpr):
    """With PDL: wait until the kernel before this one has finished and its writes are visible, then let the kernel
    after this one start launching. Nothing without it: the launch then already waited."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


# Triton has launched kernels as programmatic dependents since 3.4 (`launch_pdl`, with `tl.extra.cuda.gdc_wait`); an
# older one (PyTorch 2.7 and before bundle one) launches everything as before.
TRITON_HAS_PDL = hasattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_wait")


@functools.cache
def _supports_pdl(device_index: int) -> bool:
    """An NVIDIA GPU of compute capability 9 or more (ROCm reports its own capabilities through the same call, and
    has no `griddepcontrol`)."""
    return torch.version.hip is None and torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_launch(x: torch.Tensor, enabled: bool = True) -> dict:
    """Keywords for launching a kernel that calls `wait_for_inputs` on x's device: its USE_PDL, and Triton's
    `launch_pdl` where the kernel launches as a programmatic dependent (`enabled`, `hymba.ops.PDL`, a Triton that can,
    a CUDA device of compute capability 9 or more, not Triton's interpreter)."""
    use = (enabled and hymba.ops.PDL and TRITON_HAS_PDL and x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
           and _supports_pdl(x.device.index if x.device.index is not None else torch.cuda.current_device()))
    return {"USE_PDL": True, "launch_pdl": True} if use else {"USE_PDL": False}
