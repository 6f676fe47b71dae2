"""Numerical building blocks of the Hymba layer, each with a plain reference beside its fast paths.

`scan` (the Mamba-1 selective scan), `conv` (the causal depthwise conv1d) and `attention` (masks and the
attention call) choose their implementation at run time: Triton kernels on CUDA when importable, the
pure-PyTorch parallel path otherwise, and the sequential reference when asked for explicitly.
"""
