"""RMSNorm as the release computes it, and the average of the two branch norms that fuses a layer's heads."""

from __future__ import annotations

import torch

from hymba.ops import compiled_on_gpu

__all__ = ["average_of_norms", "normed_input", "rms_norm"]


@compiled_on_gpu
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalised in float32, cast back to x's dtype before the scale (as the release does)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


@compiled_on_gpu
def average_of_norms(a: torch.Tensor, weight_a: torch.Tensor, b: torch.Tensor, weight_b: torch.Tensor,
                     eps: float) -> torch.Tensor:
    """(norm_a(a) + norm_b(b)) / 2, the fusion of the two branches; compiled on CUDA into one pass over a and b."""
    return (rms_norm.reference(a, weight_a, eps) + rms_norm.reference(b, weight_b, eps)) / 2


def normed_input(x: torch.Tensor, weight: torch.Tensor | None = None, x2: torch.Tensor | None = None,
                 weight2: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """What a projection reads: x as it is, rms_norm(x) with `weight`, or with `weight2` too the branch norms'
    average (rms_norm(x) + rms_norm(x2)) / 2."""
    if weight2 is not None:
        return average_of_norms(x, weight, x2, weight2, eps)
    return x if weight is None else rms_norm(x, weight, eps)
