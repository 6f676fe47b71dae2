"""Causal depthwise conv1d: the definition, chaining through its state, and the one-token update."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hymba.ops.conv import causal_conv1d, causal_conv1d_ref, causal_conv1d_update, causal_conv1d_update_ref

BATCH, DIM, WIDTH = 2, 37, 4


def conv_inputs(length: int, dtype: torch.dtype = torch.float64):
    x = torch.randn(BATCH, DIM, length, dtype=dtype)
    weight, bias = torch.randn(DIM, WIDTH, dtype=dtype), torch.randn(DIM, dtype=dtype)
    state = torch.randn(BATCH, DIM, WIDTH - 1, dtype=dtype)
    return x, weight, bias, state


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("with_state", [True, False])
def test_reference_is_the_definition(activation, with_state):
    """out_t = act(bias + sum_k w_k x_{t-W+1+k}), earlier inputs read from the state (zeros without one)."""
    x, weight, bias, state = conv_inputs(9)
    history = torch.cat([state if with_state else torch.zeros_like(state), x], dim=-1)
    expected = torch.stack([bias + (history[:, :, t:t + WIDTH] * weight).sum(-1) for t in range(9)], dim=-1)
    if activation:
        expected = F.silu(expected)
    out, final = causal_conv1d_ref(x, weight, bias, state if with_state else None, activation)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, history[:, :, -(WIDTH - 1):], rtol=0, atol=0)


@pytest.mark.parametrize("split", [1, 2, 5, 11])  # parts shorter and longer than the state
def test_initial_state_chains_two_parts(split):
    x, weight, bias, state = conv_inputs(12)
    whole, final = causal_conv1d_ref(x, weight, bias, state)
    first, mid = causal_conv1d_ref(x[..., :split], weight, bias, state)
    second, end = causal_conv1d_ref(x[..., split:], weight, bias, mid)
    torch.testing.assert_close(torch.cat([first, second], dim=-1), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(end, final, rtol=0, atol=0)


@pytest.mark.parametrize("update", [causal_conv1d_update_ref, causal_conv1d_update], ids=["ref", "dispatch"])
def test_update_stepped_equals_the_sequence(update):
    x, weight, bias, state = conv_inputs(10)
    whole, final = causal_conv1d_ref(x, weight, bias, state)
    stepped_state = state.clone()
    steps = [update(stepped_state, x[..., t], weight, bias) for t in range(10)]
    torch.testing.assert_close(torch.stack(steps, dim=-1), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stepped_state, final, rtol=0, atol=0)


def test_dispatcher_and_dtypes():
    x, weight, bias, state = conv_inputs(10, torch.float32)
    out, final = causal_conv1d(x, weight, bias, state)
    ref, ref_final = causal_conv1d_ref(x, weight, bias, state)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(final, ref_final, rtol=0, atol=0)
    low, _ = causal_conv1d_ref(x.bfloat16(), weight, bias)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()


def test_unknown_activation_is_an_error():
    x, weight, bias, _ = conv_inputs(3)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_ref(x, weight, bias, activation="relu")
