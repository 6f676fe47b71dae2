"""Triton kernels compiled for an H100 / H200 (sm_90) on a machine without a GPU.

Triton's interpreter runs a kernel as Python, so it accepts code that the compiler rejects (an early `return` under
a constexpr `if` that the compiler still types, say); the tests compile the decode kernels here, on CPU-only CI, to
catch that before GPU time is spent, and `benchmarks/scan_sass.py` reads the scan's SASS from the same cubins.

The arguments are specialised as Triton's JIT specialises them (an integer equal to 1 becomes a constant, multiples of
16 are marked divisible). This uses Triton internals (`ASTSource`, `native_specialize_impl`) as Triton 3.9 has them;
`compile_sm90` raises ImportError where this Triton has other ones.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import warnings
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

__all__ = ["TARGET", "compile_sm90", "cuobjdump", "resource_usage"]

# Triton 3.9 warns that its default (fused multiply-adds on, as the GPU machine's Triton compiles) will change.
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.backends.nvidia.__path__[0]) / "bin" / "cuobjdump"


def compile_sm90(kernel, args: list, constexprs: dict, num_warps: int, num_stages: int = 3,
                 maxnreg: int | None = None) -> bytes:
    """The cubin `kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)`
    would launch on an sm_90 GPU."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
        from triton.compiler import ASTSource, make_backend
    except ImportError as e:
        raise ImportError(f"this Triton ({triton.__version__}) has other internals than hymba.ops.offline uses") from e
    runtime_names = [name for name in kernel.arg_names if name not in constexprs]
    backend = make_backend(TARGET)
    signature, constants, attrs = {}, {}, {}
    for name, value in [*zip(runtime_names, args), *constexprs.items()]:
        index = (kernel.arg_names.index(name),)
        if name in constexprs or value is None:
            signature[name], constants[index] = "constexpr", value
            continue
        kind, key = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constants[index] = key
        elif key:
            attrs[index] = backend.parse_attr(key)
    source = ASTSource(fn=kernel, signature={name: signature[name] for name in kernel.arg_names},
                       constexprs=constants, attrs=attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(source, target=TARGET, options=options).asm["cubin"]


def cuobjdump(cubin: bytes, *flags: str) -> str:
    """cuobjdump's output (the one bundled in Triton's wheel) for `cubin`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([CUOBJDUMP, *flags, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers a thread, bytes of stack a thread (where ptxas spills registers), and bytes of local and shared
    memory, as cuobjdump -res-usage reads them."""
    usage = cuobjdump(cubin, "-res-usage")
    return {name: int(re.search(rf"{key}:(\d+)", usage).group(1))
            for name, key in (("registers", "REG"), ("stack", "STACK"), ("local", "LOCAL"), ("shared", "SHARED"))}
