"""Numerical building blocks of the Hymba layer, each with a plain reference beside its fast paths.

`scan` (the Mamba-1 selective scan), `conv` (the causal depthwise conv1d) and `attention` (masks and the
attention call) choose their implementation at run time: Triton kernels on CUDA when importable, the
pure-PyTorch parallel path otherwise, and the sequential reference when asked for explicitly.
"""

import importlib.util

import torch


def gpu_kernels_usable(x: torch.Tensor, module: str = "triton") -> bool:
    """Whether a fast path built on `module` can run on `x`: a CUDA tensor, and the module importable.

    The fast paths are optional; without them (or on a CPU) the plain PyTorch implementations run.
    """
    return x.is_cuda and importlib.util.find_spec(module) is not None
