"""Hymba attention (`plan_attention` + `attention`) against HYMBA.md's rule written out as an explicit loop.

Rule: key j is visible to query i iff j holds a real token, j <= i and (the layer is global, or i - j <= window,
or j is a meta token); positions, not buffer order, decide. Both CPU backends are checked: "sdpa" (the dense
mask and SDPA) and "decode" (one query at a time, GQA as a grouped matmul). Compared in float64 to 1e-12.
"""

from __future__ import annotations

import math

import pytest
import torch

from hymba.ops.attention import FLEX_MIN_QUERIES, attention, key_index_offsets, plan_attention, visible_keys

HQ, HKV, D_QK, D_V = 6, 2, 8, 5


def loop_attention(q, k, v, q_pos, k_pos, k_valid, window, num_meta):
    """Dense softmax per (batch, head, query) over the keys the rule admits; GQA: query head h reads KV head
    h // (HQ / HKV), as the release's repeat_kv lays them out. Queries that see no key are left at NaN."""
    b, hq, tq, _ = q.shape
    out = torch.full((b, hq, tq, v.shape[-1]), float("nan"), dtype=q.dtype)
    for n in range(b):
        for i in range(tq):
            pi = int(q_pos[n, i])
            keys = [j for j in range(k.shape[2])
                    if k_valid[n, j] and int(k_pos[n, j]) <= pi
                    and (window is None or pi - int(k_pos[n, j]) <= window or int(k_pos[n, j]) < num_meta)]
            if not keys:
                continue
            for h in range(hq):
                kv = h // (hq // k.shape[1])
                scores = torch.stack([q[n, h, i] @ k[n, kv, j] for j in keys]) / math.sqrt(q.shape[-1])
                weights = torch.softmax(scores, dim=0)
                out[n, h, i] = sum(w * v[n, kv, j] for w, j in zip(weights, keys))
    return out


def random_qkv(batch: int, tq: int, tk: int):
    f64 = dict(dtype=torch.float64)
    return (torch.randn(batch, HQ, tq, D_QK, **f64), torch.randn(batch, HKV, tk, D_QK, **f64),
            torch.randn(batch, HKV, tk, D_V, **f64))


def model_attention(q, k, v, q_pos, k_pos, k_valid, window, num_meta, backend):
    """The model's attention; "decode" takes one query per call, so it is run query by query."""
    if backend == "sdpa":
        return attention(q, k, v, plan_attention(q_pos, k_pos, k_valid, window, num_meta, backend="sdpa"))
    outs = []
    for i in range(q.shape[2]):
        plan = plan_attention(q_pos[:, i:i + 1], k_pos, k_valid, window, num_meta)
        assert plan.backend == "decode"  # chosen automatically for a single query
        outs.append(attention(q[:, :, i:i + 1], k, v, plan))
    return torch.cat(outs, dim=2)


backends = pytest.mark.parametrize("backend", ["sdpa", "decode"])


LAYOUTS = {  # (window, meta tokens)
    "global": (None, 4),
    "window < meta": (2, 4),
    "window > meta": (7, 3),
    "window 1, no meta": (1, 0),
    "window 5, no meta": (5, 0),
}


@backends
@pytest.mark.parametrize("window, num_meta", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_full_sequence_matches_the_rule(window, num_meta, backend):
    length = 16
    q, k, v = random_qkv(2, length, length)
    pos = torch.arange(length).expand(2, -1)
    valid = torch.ones(2, length, dtype=torch.bool)
    expected = loop_attention(q, k, v, pos, pos, valid, window, num_meta)
    torch.testing.assert_close(model_attention(q, k, v, pos, pos, None, window, num_meta, backend), expected,
                               rtol=1e-12, atol=1e-12)


@backends
@pytest.mark.parametrize("window, num_meta", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_left_padded_rows_match_the_rule(window, num_meta, backend):
    """The model's layout [padding, meta, text]: padding is invalid and positions count from the first meta."""
    length, pads = 16, [0, 3, 9]
    valid = torch.ones(len(pads), length, dtype=torch.bool)
    for row, p in enumerate(pads):
        valid[row, :p] = False
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    q, k, v = random_qkv(len(pads), length, length)
    expected = loop_attention(q, k, v, pos, pos, valid, window, num_meta)
    got = model_attention(q, k, v, pos, pos, valid, window, num_meta, backend)
    assert torch.isfinite(got).all()  # padding queries see something rather than produce NaN
    for row, p in enumerate(pads):
        torch.testing.assert_close(got[row, :, p:], expected[row, :, p:], rtol=1e-12, atol=1e-12)


@backends
@pytest.mark.parametrize("window, num_meta", [(3, 2), (None, 2)])
def test_key_order_does_not_matter(window, num_meta, backend):
    """Decoding over a ring buffer stores keys out of order; visibility follows positions, so the output is the
    same for any permutation of the keys (with invalid slots mixed in)."""
    tk, tq = 14, 4
    q, k, v = random_qkv(1, tq, tk)
    k_pos = torch.arange(tk)[None]
    q_pos = torch.arange(tk - tq, tk)[None]  # the last four tokens query everything before them
    valid = torch.ones(1, tk, dtype=torch.bool)
    valid[0, 5] = False
    perm = torch.randperm(tk)
    expected = loop_attention(q, k, v, q_pos, k_pos, valid, window, num_meta)
    got = model_attention(q, k[:, :, perm], v[:, :, perm], q_pos, k_pos[:, perm], valid[:, perm], window, num_meta,
                          backend)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_mask_shape_and_the_no_visible_key_rule():
    """(b, 1, Tq, Tk); a query with no visible key (padding) is let see every key instead of an all-False row."""
    pos = torch.tensor([[0, 0, 0, 1, 2]])
    valid = torch.tensor([[False, False, True, True, True]])
    mask = visible_keys(pos[:, 1:], pos, valid, window=1, num_meta=0)
    assert mask.shape == (1, 1, 4, 5)
    expected = torch.tensor([[False, False, True, False, False],
                             [False, False, True, False, False],
                             [False, False, True, True, False],
                             [False, False, False, True, True]])  # position 0 is 2 > window back
    assert torch.equal(mask[0, 0], expected)
    alone = visible_keys(torch.tensor([[0]]), torch.tensor([[0]]), torch.tensor([[False]]), window=None, num_meta=0)
    assert alone.all()


def _prefill_layout(pads: list[int], length: int, empty_slots: int = 0):
    """Query and key positions/validity of a prefill: [padding, meta, text] per row, after `empty_slots` invalid
    cache slots on the key side (a fresh cache's buffer, as `HymbaCache.update_kv` returns it)."""
    valid = torch.ones(len(pads), length, dtype=torch.bool)
    for row, p in enumerate(pads):
        valid[row, :p] = False
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    k_pos = torch.cat([torch.zeros(len(pads), empty_slots, dtype=torch.long), pos], dim=1)
    k_valid = torch.cat([torch.zeros(len(pads), empty_slots, dtype=torch.bool), valid], dim=1)
    return pos, k_pos, k_valid


FLEX_CASES = {  # name -> (pads, empty cache slots, the offsets key_index_offsets finds)
    "left-padded rows": ([0, 3, 140], 0, [0, 3, 140]),
    "after a fresh cache's empty slots": ([2, 2, 2], 130, 132),
}


@pytest.mark.parametrize("case", FLEX_CASES.values(), ids=FLEX_CASES.keys())
def test_flex_block_masks_from_indices_match_the_rule(case):
    """FlexAttention (compiled, on CPU here) decides visibility from key indices when positions are indices minus a
    per-row offset: the dense rule's output on every real query. At least FLEX_MIN_QUERIES queries, as the model
    uses it (CPU FlexAttention gives wrong results below 128)."""
    pads, empty_slots, offsets = case
    window, num_meta, length = 37, 5, FLEX_MIN_QUERIES + 4
    q_pos, k_pos, k_valid = _prefill_layout(pads, length, empty_slots)
    q, k, v = (t.float() for t in random_qkv(len(pads), length, length + empty_slots))
    found = key_index_offsets(q_pos, k_pos, k_valid)
    assert (found.tolist() if isinstance(found, torch.Tensor) else found) == offsets
    expected = attention(q, k, v, plan_attention(q_pos, k_pos, k_valid, window, num_meta, backend="sdpa"))
    got = attention(q, k, v, plan_attention(q_pos, k_pos, k_valid, window, num_meta, backend="flex"))
    for row, p in enumerate(pads):
        torch.testing.assert_close(got[row, :, p:], expected[row, :, p:], rtol=1e-5, atol=1e-5)


def test_flex_block_mask_from_positions_after_a_ring():
    """A later prefill chunk after a ring buffer (cached keys out of order): no index offset describes it, so the
    mask reads the positions, and still gives the dense rule's output."""
    window, num_meta, ring, length = 37, 5, 64, FLEX_MIN_QUERIES + 4
    cached = torch.arange(200 - ring, 200).roll(17)[None]  # positions 136..199 as a ring holds them
    q_pos = torch.arange(200, 200 + length)[None]
    k_pos = torch.cat([torch.arange(num_meta)[None], cached, q_pos], dim=1)
    q, k, v = (t.float() for t in random_qkv(1, length, k_pos.shape[1]))
    assert key_index_offsets(q_pos, k_pos, None) is None
    expected = attention(q, k, v, plan_attention(q_pos, k_pos, None, window, num_meta, backend="sdpa"))
    got = attention(q, k, v, plan_attention(q_pos, k_pos, None, window, num_meta, backend="flex"))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_flex_unpadded_forward_needs_no_position_check():
    """A whole unpadded forward: positions 0, 1, ... on both sides, so the model skips the check (no host sync)."""
    length, window, num_meta = FLEX_MIN_QUERIES + 4, 37, 5
    pos = torch.arange(length).expand(2, -1)
    assert key_index_offsets(pos, pos, None) == 0
    q, k, v = (t.float() for t in random_qkv(2, length, length))
    expected = attention(q, k, v, plan_attention(pos, pos, None, window, num_meta, backend="sdpa"))
    plan = plan_attention(pos, pos, None, window, num_meta, backend="flex", positions_are_indices=True)
    torch.testing.assert_close(attention(q, k, v, plan), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: FlexAttention's training kernel options")
def test_flex_training_gradients_equal_sdpa():
    """With gradients FlexAttention runs `FLEX_TRAINING_OPTIONS`' tiles: its output and the gradients of q, k and v
    equal float32 SDPA's over the dense mask, at the 1.5B's heads, a window and meta tokens (bf16 tolerance)."""
    batch, length, window, num_meta = 2, FLEX_MIN_QUERIES + 128, 1024, 128
    pos = torch.arange(length, device="cuda").expand(batch, -1)
    leaves = [torch.randn(batch, h, length, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
              for h, d in ((25, 128), (5, 128), (5, 128))]
    grad = torch.randn(batch, 25, length, 128, device="cuda", dtype=torch.bfloat16)

    def run(backend, dtype):
        plan = plan_attention(pos, pos, None, window, num_meta, backend=backend, positions_are_indices=True)
        inputs = [leaf.detach().to(dtype).requires_grad_() for leaf in leaves]
        out = attention(*inputs, plan)
        out.backward(grad.to(dtype))
        return [out.detach().float()] + [t.grad.float() for t in inputs]

    for got, want in zip(run("flex", torch.bfloat16), run("sdpa", torch.float32)):
        assert ((got - want).norm() / want.norm()).item() < 1e-2
