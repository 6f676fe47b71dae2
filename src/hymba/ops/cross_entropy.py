"""Next-token cross-entropy straight from the hidden states: the LM head and the loss in chunks of tokens.

The plain loss (`linear_cross_entropy_ref`) materialises logits for every token and upcasts them to float32: at
the 1.5B shape's training batch (16k tokens x 32,001 entries) that is 2 GiB of float32 logits, as much again
for their gradient, and several memory-bound passes over both. `linear_cross_entropy` runs the head on
`chunk_size` tokens at a time and, while that chunk's logits are in memory, also computes what backward needs
from them (as Liger-Kernel's fused linear cross-entropy does): the gradient with respect to the chunk's hidden
states and its share of the head's weight gradient. So memory is O(chunk_size x vocab), the head costs the
three matmuls it costs anyway (forward, and the two of backward; nothing is recomputed), and backward only
scales the stored gradients by the incoming one. Under autocast the matmuls run in the autocast dtype and
the softmax in float32, as autocast's own linear + float32 cross-entropy would. The head's rows are padded with
zeros to a multiple of `VOCAB_ALIGN` (the padded logits masked to -inf), because a row length of 32,001 sends
cuBLAS to its align-1 kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["linear_cross_entropy", "linear_cross_entropy_ref"]

IGNORE_INDEX = -100
# Tokens per chunk when none is given: a chunk's float32 logits take about this many bytes.
CHUNK_BYTES = 256 * 2**20
# Vocabulary rows are padded to a multiple of this for the matmuls: with the release's 32,001 (odd) the logits' row
# stride is unaligned and cuBLAS falls back to sm_75 align-1 kernels, 40 of a 1.5B training step's 746 ms on an
# H200 (16k tokens; the three matmuls' FLOPs take about 8 ms at the GEMMs' usual rate).
VOCAB_ALIGN = 64


def linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             reduction: str = "mean", ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """`F.cross_entropy` of the full float32 logits `hidden @ weight.T`. hidden (N, d), weight (V, d), targets (N,)."""
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=ignore_index, reduction=reduction)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         reduction: str = "mean", ignore_index: int = IGNORE_INDEX,
                         chunk_size: int | None = None) -> torch.Tensor:
    """Equals `linear_cross_entropy_ref` in value and gradients, holding only `chunk_size` tokens' logits at once.

    hidden (N, d), weight (V, d), targets (N,) with `ignore_index` where nothing is learnt. "mean" divides by the
    number of targets (NaN when there are none, as `F.cross_entropy`); "sum" does not. No host synchronisation.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)  # differentiable casts: gradients reach float32 masters
    chunk_size = chunk_size or max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    with torch.autocast(device_type, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            total = _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_size)
        else:
            total = _chunked_loss_and_grads(hidden, weight, targets, ignore_index, chunk_size, False, False)[0]
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum()


def _chunked_loss_and_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                            chunk_size: int, grad_hidden: bool, grad_weight: bool):
    """The summed loss, and the gradients of that sum with respect to `hidden` and `weight` where asked (else None).

    d loss_i / d logits_i = softmax(logits_i) - onehot(target_i), zero for ignored tokens; the hidden states'
    gradient is that times the weight, the weight's is its transpose times the hidden states (summed in float32)."""
    vocab = weight.shape[0]
    if vocab % VOCAB_ALIGN:
        weight = F.pad(weight, (0, 0, 0, -vocab % VOCAB_ALIGN))  # zero rows: (V', d), V' aligned
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    d_hidden = torch.empty_like(hidden) if grad_hidden else None
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight else None
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        logits = F.linear(h, weight).float()  # (n, V')
        logits[:, vocab:] = float("-inf")  # the padding (if any): no probability, zero gradient
        keep = t != ignore_index  # (n,)
        safe = torch.where(keep, t, 0)[:, None]  # (n, 1): any valid index where ignored; masked out below
        lse = torch.logsumexp(logits, dim=-1)  # (n,)
        loss += torch.where(keep, lse - logits.gather(1, safe)[:, 0], 0.0).sum()
        if not (grad_hidden or grad_weight):
            continue
        grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
        grad.scatter_add_(1, safe, torch.full_like(lse[:, None], -1.0))
        grad = grad.mul_(keep[:, None]).to(h.dtype)  # (n, V')
        if grad_hidden:
            torch.mm(grad, weight, out=d_hidden[start:start + chunk_size])
        if grad_weight:
            d_weight += grad.T @ h
    return loss, d_hidden, None if d_weight is None else d_weight[:vocab]


class _LinearCrossEntropy(torch.autograd.Function):
    """The summed loss; its gradients are computed in forward (see the module docstring) and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_size):
        loss, d_hidden, d_weight = _chunked_loss_and_grads(hidden, weight, targets, ignore_index, chunk_size,
                                                           *ctx.needs_input_grad[:2])
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(d_hidden, d_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        d_hidden, d_weight = ctx.saved_tensors
        if d_hidden is not None:
            d_hidden = d_hidden * grad_loss.to(d_hidden.dtype)
        if d_weight is not None:
            d_weight = (d_weight * grad_loss).to(ctx.weight_dtype)
        return d_hidden, d_weight, None, None, None
