"""Causal depthwise conv1d in plain PyTorch: the definition every kernel is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return x
    if activation in ("silu", "swish"):
        return F.silu(x)
    raise ValueError(f"unsupported conv activation {activation!r}; use 'silu' or None")


def causal_conv1d_ref(x, weight, bias=None, initial_state=None, activation="silu"):
    """out_t = act(bias + sum_k weight[:, k] * x_{t-width+1+k}), with x_{<0} read from `initial_state` (or 0)."""
    batch, dim, _ = x.shape
    width = weight.shape[1]
    if initial_state is None:
        initial_state = x.new_zeros(batch, dim, width - 1)
    padded = torch.cat([initial_state.to(x.dtype), x], dim=-1)  # (b, d, width-1+L)
    out = F.conv1d(padded, weight.unsqueeze(1).to(x.dtype), None if bias is None else bias.to(x.dtype), groups=dim)
    return _activate(out, activation), padded[:, :, padded.shape[-1] - (width - 1):]


def causal_conv1d_update_ref(state, x, weight, bias=None, activation="silu"):
    """One step of `causal_conv1d_ref`; `state` (b, d, width-1) is shifted in place to end with x."""
    window = torch.cat([state, x.unsqueeze(-1).to(state.dtype)], dim=-1)  # (b, d, width)
    out = (window * weight.to(state.dtype)).sum(-1)
    if bias is not None:
        out = out + bias.to(state.dtype)
    state.copy_(window[:, :, 1:])
    return _activate(out, activation).to(x.dtype)
