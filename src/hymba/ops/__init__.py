"""Numerical building blocks of the Hymba layer, each with a plain reference beside its fast paths.

`scan` (the Mamba-1 selective scan), `conv` (the causal depthwise conv1d) and `attention` (masks and the
attention call) choose their implementation at run time: Triton kernels on CUDA when importable, the
pure-PyTorch parallel path otherwise, and the sequential reference when asked for explicitly.
"""

import functools
import importlib.util
import os

import torch

# Looked up once, here: `torch.compile` cannot trace `find_spec`, and the compiled decode step asks on every layer.
_IMPORTABLE = {module: importlib.util.find_spec(module) is not None
               for module in ("triton", "torch.nn.attention.flex_attention")}


# Programmatic dependent launch (`hymba.ops.launch`) for the decode step's Triton kernels and, in the compiled step,
# inductor's: on sm_90+ a kernel may start while the one before it drains. False (or HYMBA_PDL=0 in the environment)
# launches them as ordinary kernels.
PDL = os.environ.get("HYMBA_PDL", "1") != "0"

# The decode-rows GEMV kernels (hymba.ops.mlp.triton, hymba.ops.linear.triton) size their tiles for 2-byte weights:
# float32 tiles of that size overflow a GPU's shared memory, so a float32 model keeps cuBLAS there.
HALF_DTYPES = (torch.bfloat16, torch.float16)


def gpu_kernels_usable(x: torch.Tensor, module: str = "triton") -> bool:
    """Whether a fast path built on `module` ("triton" or "torch.nn.attention.flex_attention") can run on `x`: a CUDA
    tensor, and the module importable.

    The fast paths are optional; without them (or on a CPU) the plain PyTorch implementations run.
    """
    return x.is_cuda and _IMPORTABLE[module]


def to_device(host: torch.Tensor, device) -> torch.Tensor:
    """`host.to(device)` without waiting for the device. A plain copy from pageable host memory synchronizes the CUDA
    stream, draining whatever work is queued (the serving engine keeps the next decode step queued while it handles
    the last one); on CUDA the tensor goes through pinned memory in a copy queued on the stream instead. PyTorch's
    caching host allocator does not reuse the pinned buffer before that copy has run."""
    device = torch.device("cpu" if device is None else device)
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def device_tensor(values, dtype: torch.dtype, device) -> torch.Tensor:
    """`torch.tensor(values, dtype=dtype, device=device)` without waiting for the device (`to_device`)."""
    return to_device(torch.tensor(values, dtype=dtype), device)


def capturing_cuda_graph(x: torch.Tensor) -> bool:
    """Whether `x`'s work is being captured into a CUDA graph, where a host read of a device value cannot happen."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def compiled_on_gpu(fn):
    """`fn` as written (the reference: CPUs, and inside an outer `torch.compile`, which traces it inline) and, for
    CUDA tensors, a `torch.compile`d copy with dynamic shapes: eager PyTorch runs a chain like RMSNorm's cast, square,
    mean, rsqrt, scale as one kernel and one pass over memory each, the compiled copy as one kernel.
    `fn.reference` is the uncompiled function, for tests."""
    compiled = None

    @functools.wraps(fn)
    def dispatch(x, *args):
        nonlocal compiled
        if torch.compiler.is_compiling() or not gpu_kernels_usable(x):
            return fn(x, *args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        return compiled(x, *args)

    dispatch.reference = fn
    return dispatch
