"""Shared set-up of the Triton kernel tests, imported first by each of them.

Without CUDA the kernels run on CPU tensors through Triton's interpreter, which must be switched on
(TRITON_INTERPRET=1) before the kernels are defined, i.e. before a test module imports them. Importing this module
skips the importing test module where Triton is not installed.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (realistic sizes, compiled kernels)")
