"""Causal depthwise conv1d (Mamba's short convolution): `causal_conv1d` for a sequence, `causal_conv1d_update`
for one decode step. x: (batch, dim, L); weight: (dim, width); the state holds the last width-1 inputs."""

from __future__ import annotations

from hymba.ops import gpu_kernels_usable
from hymba.ops.conv.reference import causal_conv1d_ref, causal_conv1d_update_ref

__all__ = ["causal_conv1d", "causal_conv1d_ref", "causal_conv1d_update", "causal_conv1d_update_ref"]


def causal_conv1d(x, weight, bias=None, initial_state=None, activation: str | None = "silu"):
    """Returns (out (batch, dim, L) in x's dtype, final_state (batch, dim, width-1))."""
    if gpu_kernels_usable(x):
        from hymba.ops.conv.triton import causal_conv1d_triton

        return causal_conv1d_triton(x, weight, bias, initial_state, activation)
    return causal_conv1d_ref(x, weight, bias, initial_state, activation)


def causal_conv1d_update(state, x, weight, bias=None, activation: str | None = "silu"):
    """One step: x (batch, dim); `state` (batch, dim, width-1) is shifted in place. Returns (batch, dim)."""
    if gpu_kernels_usable(x):
        from hymba.ops.conv.triton import causal_conv1d_update_triton

        return causal_conv1d_update_triton(state, x, weight, bias, activation)
    return causal_conv1d_update_ref(state, x, weight, bias, activation)
