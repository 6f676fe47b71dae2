"""The chunked LM head + cross-entropy against `F.cross_entropy` on full float32 logits: value and gradients.

Shapes are awkward on purpose (61 tokens in chunks of 8, so the last chunk is short; vocabulary 97; width 24).
float32 tolerance: both sides compute the same products and sums, only in a different order (per chunk, and
the weight gradient summed over chunks), so they agree to a few float32 ulps of each result's norm (1e-6).
bf16 autocast: both sides round the matmul inputs and outputs to bf16 at the same places, except the weight
gradient, which ours sums over chunks in float32; 1e-2 relative covers bf16's 8-bit mantissa.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from hymba.ops.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref

N, D, V, CHUNK = 61, 24, 97, 8


def inputs(ignored: str = "some", seed: int = 0, vocab: int = V):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).requires_grad_()
    weight = (0.3 * torch.randn(vocab, D, generator=g)).requires_grad_()
    targets = torch.randint(0, vocab, (N,), generator=g)
    if ignored == "some":
        targets[::5] = -100  # scattered ignored tokens
        targets[16:32] = -100  # and whole chunks of them, as an all-ignored row of a batch gives
    elif ignored == "all":
        targets[:] = -100
    return hidden, weight, targets


def value_and_grads(fn, hidden, weight, targets, **kw):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, targets, **kw)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [CHUNK, 1, N, 1000])
def test_equals_reference_in_value_and_gradients(reduction, chunk):
    hidden, weight, targets = inputs()
    ours = value_and_grads(linear_cross_entropy, hidden, weight, targets, reduction=reduction, chunk_size=chunk)
    ref = value_and_grads(linear_cross_entropy_ref, hidden, weight, targets, reduction=reduction)
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-6
    assert (ours[1][targets == -100] == 0).all()  # ignored tokens get no gradient


@pytest.mark.parametrize("vocab", [64, 65, 1])  # aligned (no padding), one past it (63 padded rows), a single row
def test_padding_the_vocabulary_changes_nothing(vocab):
    hidden, weight, targets = inputs(vocab=vocab)
    ours = value_and_grads(linear_cross_entropy, hidden, weight, targets, chunk_size=CHUNK)
    ref = value_and_grads(linear_cross_entropy_ref, hidden, weight, targets)
    assert ours[2].shape == weight.shape
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-6


def test_all_ignored():
    hidden, weight, targets = inputs("all")
    loss, d_hidden, d_weight = value_and_grads(linear_cross_entropy, hidden, weight, targets, reduction="sum",
                                               chunk_size=CHUNK)
    assert loss == 0 and (d_hidden == 0).all() and (d_weight == 0).all()
    with torch.no_grad():  # 0 / 0, as F.cross_entropy gives
        assert linear_cross_entropy(hidden, weight, targets, chunk_size=CHUNK).isnan()
        assert linear_cross_entropy_ref(hidden, weight, targets).isnan()


def test_gradient_scales_with_the_incoming_gradient_when_only_one_input_needs_it():
    hidden, weight, targets = inputs()
    for frozen in ("weight", "hidden"):
        pair = (hidden, weight.detach()) if frozen == "weight" else (hidden.detach(), weight)
        trained = pair[0] if frozen == "weight" else pair[1]
        (3.0 * linear_cross_entropy(*pair, targets, chunk_size=CHUNK)).backward()
        ours, trained.grad = trained.grad, None
        (3.0 * linear_cross_entropy_ref(*pair, targets)).backward()
        assert rel_err(ours, trained.grad) < 1e-6


def test_no_grad_gives_the_same_value():
    hidden, weight, targets = inputs()
    with torch.no_grad():
        assert rel_err(linear_cross_entropy(hidden, weight, targets, chunk_size=CHUNK),
                       linear_cross_entropy_ref(hidden, weight, targets)) < 1e-6


def test_keeps_nothing_of_vocabulary_size_per_token_for_backward():
    """Backward keeps the gradients of the inputs (N x d and V x d) and nothing N x V."""
    hidden, weight, targets = inputs()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        linear_cross_entropy(hidden, weight, targets, chunk_size=CHUNK)
    assert saved and all(shape.numel() <= max(N, V) * D for shape in saved), saved


def test_bf16_autocast_matches_autocast_reference():
    hidden, weight, targets = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = value_and_grads(linear_cross_entropy, hidden, weight, targets, chunk_size=CHUNK)
        ref = value_and_grads(linear_cross_entropy_ref, hidden, weight, targets)
    assert ours[1].dtype == ours[2].dtype == torch.float32  # the float32 leaves get float32 gradients
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-2
