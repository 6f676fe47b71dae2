"""RMSNorm as the release computes it, and the average of the two branch norms that fuses a layer's heads."""

from __future__ import annotations

import torch

from hymba.ops import compiled_on_gpu

__all__ = ["average_of_norms", "normed_input", "rms_norm"]


def _scaled_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalised in float32, cast back to x's dtype before the scale (as the release does); the scale's product in
    the wider of the two dtypes."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


@compiled_on_gpu
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the release computes it, returned in x's dtype. Where the weight is x's dtype (inference, float32
    training) that is what the release returns; under autocast, with float32 weights and a bf16 x, it is the value the
    next layer's matmul would have cast a float32 result to, without the float32 tensor and the cast."""
    return _scaled_norm(x, weight, eps).to(x.dtype)


@compiled_on_gpu
def average_of_norms(a: torch.Tensor, weight_a: torch.Tensor, b: torch.Tensor, weight_b: torch.Tensor,
                     eps: float) -> torch.Tensor:
    """(norm_a(a) + norm_b(b)) / 2, the fusion of the two branches, in a's dtype (rounded once, after the average,
    as `rms_norm`); compiled on CUDA into one pass over a and b."""
    return ((_scaled_norm(a, weight_a, eps) + _scaled_norm(b, weight_b, eps)) / 2).to(a.dtype)


def normed_input(x: torch.Tensor, weight: torch.Tensor | None = None, x2: torch.Tensor | None = None,
                 weight2: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """What a projection reads: x as it is, rms_norm(x) with `weight`, or with `weight2` too the branch norms'
    average (rms_norm(x) + rms_norm(x2)) / 2."""
    if weight2 is not None:
        return average_of_norms(x, weight, x2, weight2, eps)
    return x if weight is None else rms_norm(x, weight, eps)
