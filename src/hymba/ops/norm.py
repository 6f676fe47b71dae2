"""RMSNorm as the release computes it, shared by the model and the fused SSM decode step's reference."""

from __future__ import annotations

import torch

from hymba.ops import compiled_on_gpu

__all__ = ["rms_norm"]


@compiled_on_gpu
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalised in float32, cast back to x's dtype before the scale (as the release does)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)
