"""A parallel selective scan in pure PyTorch, for CPU and for GPUs without Triton.

The recurrence h_t = a_t * h_{t-1} + b_t is associative, so within a chunk of T positions it is solved in
log2(T) doubling steps (Hillis-Steele); chunks are chained by their carried state. Every step multiplies
decays in [0, 1], so unlike a log-space cumsum it cannot overflow however large dt*A grows.

The linear recurrence is wrapped in an autograd Function whose backward is the same recurrence run in
reverse, so training stores only a, b and h rather than every doubling step.
"""

from __future__ import annotations

import torch

from hymba.ops.scan.reference import discretize, finish_output

CHUNK = 128


def _doubling_scan(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan of (a, b) pairs along dim 2 with h_0 = 0: returns (cumulative a, h). Shapes (B, D, T, N)."""
    length = a.shape[2]
    offset = 1
    while offset < length:
        b = torch.cat([b[:, :, :offset], torch.addcmul(b[:, :, offset:], a[:, :, offset:], b[:, :, :-offset])], dim=2)
        a = torch.cat([a[:, :, :offset], a[:, :, offset:] * a[:, :, :-offset]], dim=2)
        offset *= 2
    return a, b


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t along dim 2 of (B, D, L, N) tensors, starting from h0 (B, D, N). Returns all h."""
    hs = []
    h = h0
    for start in range(0, a.shape[2], CHUNK):
        a_cum, h_local = _doubling_scan(a[:, :, start:start + CHUNK], b[:, :, start:start + CHUNK])
        h_chunk = torch.addcmul(h_local, a_cum, h.unsqueeze(2))
        hs.append(h_chunk)
        h = h_chunk[:, :, -1]
    return torch.cat(hs, dim=2)


class LinearScan(torch.autograd.Function):
    """Autograd wrapper: the gradient of a linear recurrence is the reverse recurrence with shifted decays."""

    @staticmethod
    def forward(ctx, a, b, h0):
        h = linear_scan(a, b, h0)
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, h, h0 = ctx.saved_tensors
        # g_t = grad_h_t + a_{t+1} g_{t+1}: the same scan, run backwards in time.
        a_next = torch.cat([a[:, :, 1:], torch.zeros_like(a[:, :, :1])], dim=2)
        g = linear_scan(a_next.flip(2), grad_h.flip(2), torch.zeros_like(h0)).flip(2)
        h_prev = torch.cat([h0.unsqueeze(2), h[:, :, :-1]], dim=2)
        return g * h_prev, g, a[:, :, 0] * g[:, :, 0]


def selective_scan_chunked(u, delta, A, B, C, D, z=None, delta_bias=None, delta_softplus=True, initial_state=None):
    """Parallel selective scan. Shapes and results as `selective_scan_ref` (see `hymba.ops.scan`)."""
    batch, d_inner, _ = u.shape
    _, dA, dBu = discretize(delta, A, B, u, delta_bias, delta_softplus)
    h0 = initial_state.float() if initial_state is not None else u.new_zeros(batch, d_inner, A.shape[1],
                                                                             dtype=torch.float32)
    h = LinearScan.apply(dA, dBu, h0)  # (b, d, L, n)
    y = torch.einsum("bdln,bnl->bdl", h, C.float())
    return finish_output(y, u, D, z, u.dtype), h[:, :, -1]
