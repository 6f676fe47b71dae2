"""The selective scan written as the recurrence it is: one step per position, float32 state.

Slow and obviously right; every faster implementation is tested against these two functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def discretize(delta, A, B, u, delta_bias=None, delta_softplus=True):
    """Returns (dt, dA, dBu) in float32: dt (b, d, L), dA = exp(dt*A) and dBu = dt*B*u, both (b, d, L, n)."""
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    dA = torch.exp(dt.unsqueeze(-1) * A.float()[:, None, :])  # (b, d, L, n)
    dBu = (dt * u.float()).unsqueeze(-1) * B.float().transpose(1, 2).unsqueeze(1)  # (b, d, L, n)
    return dt, dA, dBu


def finish_output(y, u, D, z, out_dtype):
    """y + D*u, gated by silu(z), in float32, cast to the input dtype."""
    y = y + u.float() * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(out_dtype)


def selective_scan_ref(u, delta, A, B, C, D, z=None, delta_bias=None, delta_softplus=True, initial_state=None):
    """Sequential selective scan. Shapes as in `hymba.ops.scan`; returns (y, last_state)."""
    batch, d_inner, length = u.shape
    _, dA, dBu = discretize(delta, A, B, u, delta_bias, delta_softplus)
    h = u.new_zeros(batch, d_inner, A.shape[1], dtype=torch.float32) if initial_state is None else initial_state.float()
    Cf = C.float()
    ys = []
    for t in range(length):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, Cf[:, :, t]))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, d_inner, 0, dtype=torch.float32)
    return finish_output(y, u, D, z, u.dtype), h


def selective_state_update_ref(state, u, delta, A, B, C, D, z=None, delta_bias=None, delta_softplus=True):
    """One step of the recurrence. state (b, d, n) float32 is updated in place; u, delta, z (b, d); B, C (b, n)."""
    _, dA, dBu = discretize(delta.unsqueeze(-1), A, B.unsqueeze(-1), u.unsqueeze(-1), delta_bias, delta_softplus)
    state.mul_(dA[:, :, 0]).add_(dBu[:, :, 0])
    y = torch.einsum("bdn,bn->bd", state, C.float())
    return finish_output(y.unsqueeze(-1), u.unsqueeze(-1), D, None if z is None else z.unsqueeze(-1), u.dtype)[..., 0]
