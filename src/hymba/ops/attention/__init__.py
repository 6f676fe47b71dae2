"""Attention over Hymba's key layout: meta tokens visible to all, sliding windows, global layers, GQA.

Which keys a query sees is decided by positions, never by buffer order, so one rule serves the full
forward, chunked prefill and decoding over a ring buffer alike:

    key j is visible to query i  iff  key j holds a real token, pos_j <= pos_i, and
                                      (the layer is global, or pos_i - pos_j <= window, or pos_j < num_meta)

`plan_attention` turns that rule into what one backend needs, once per forward and key layout, and
`attention` runs it:
- "sdpa": a dense boolean mask and PyTorch's SDPA, the reference, on any device and dtype;
- "decode": one query per row over the cache, whose validity flags are the mask (nothing built per step): a split-K
  Triton kernel on CUDA, else each KV head's query group attending in one fused SDPA call (the reference);
- "flex": FlexAttention with a block-sparse mask on CUDA, so long prefills never build an L x L mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from hymba.ops import gpu_kernels_usable
from hymba.ops.attention.masks import visible_keys

__all__ = ["AttentionPlan", "attention", "key_index_offsets", "plan_attention", "visible_keys"]

# Below this many queries a dense mask is cheap and SDPA is as fast (on an H200, a 1.5B prefill of 1, 4 and 16 x 512
# tokens took 71.5, 67.2 and 93.0 ms with SDPA against 84.8, 118.8 and 92.9 ms with FlexAttention), and it needs no
# compilation: FlexAttention is compiled per (batch, queries, keys), about 5 s each, which the serving engine's
# prefill groups of every size would pay in their time to first token.
FLEX_MIN_QUERIES = 2048
# FlexAttention forward launch parameters by compute capability, where measured better than its defaults: on an H100
# at the 1.5B's 8K prefill shapes 1.58x faster on sliding-window and global layers alike (0.96 against 1.52 ms, 2.85
# against 4.50 ms; `benchmarks/bench_prefill_attention.py --kernel-options`).
FLEX_INFERENCE_OPTIONS = {(9, 0): dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)}
# With gradients: the same forward ("fwd_" options apply to one pass only) and 64 x 64 backward tiles. On an H200 at
# `hymba bench train`'s 1.5B shape (8 x 2,176 positions) forward + backward took 2.08 ms per windowed layer and 2.19
# per global one, against 2.25 and 2.31 with the default backward and 3.84-3.99 with 32 x 128 tiles
# (`benchmarks/bench_prefill_attention.py --backward`).
FLEX_TRAINING_OPTIONS = {(9, 0): {**{f"fwd_{k}": v for k, v in FLEX_INFERENCE_OPTIONS[(9, 0)].items()},
                                  **dict(bwd_BLOCK_M1=64, bwd_BLOCK_N1=64, bwd_BLOCK_M2=64, bwd_BLOCK_N2=64,
                                         bwd_num_warps=4, bwd_num_stages=3)}}


@dataclass
class AttentionPlan:
    backend: str
    mask: torch.Tensor | None = None  # (b, 1, Tq, Tk) bool, for "sdpa" and "decode"
    block_mask: object = None  # FlexAttention BlockMask, for "flex"


def plan_attention(q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor | None, window: int | None,
                   num_meta: int, backend: str | None = None, cache_decode: bool = False,
                   positions_are_indices: bool = False) -> AttentionPlan:
    """Choose a backend (unless given) and build its mask from positions (b, Tq), (b, Tk) and validity (b, Tk).

    `cache_decode` says the keys are a `HymbaCache`'s slots and the query is each row's newest token: then every
    valid slot is visible (a ring holds exactly the last window+1 positions, meta tokens are always visible), so
    the cache's validity flags are the mask and nothing is built per decode step. `positions_are_indices` says
    every key is real and queries and keys both hold positions 0, 1, ... (a whole unpadded forward): FlexAttention's
    mask then needs no check of the positions (`key_index_offsets` does one otherwise, with a host sync).
    """
    if backend is None:
        if q_pos.shape[1] == 1:
            backend = "decode"
        elif q_pos.shape[1] >= FLEX_MIN_QUERIES and gpu_kernels_usable(q_pos, "torch.nn.attention.flex_attention"):
            backend = "flex"
        else:
            backend = "sdpa"
    if backend == "flex":
        offset = 0 if positions_are_indices else key_index_offsets(q_pos, k_pos, k_valid)
        return AttentionPlan("flex", block_mask=_flex_block_mask(q_pos, k_pos, k_valid, window, num_meta, offset))
    if cache_decode:
        return AttentionPlan(backend, mask=k_valid[:, None, None, :])
    return AttentionPlan(backend, mask=visible_keys(q_pos, k_pos, k_valid, window, num_meta))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """q (b, hq, Tq, dqk); k (b, hkv, Tk, dqk); v (b, hkv, Tk, dv) -> (b, hq, Tq, dv). Scale 1/sqrt(dqk)."""
    if plan.backend == "decode":
        # The kernel has no backward: a (rare) one-token forward that needs gradients takes the reference.
        if gpu_kernels_usable(q) and not (q.requires_grad or k.requires_grad or v.requires_grad):
            from hymba.ops.attention.triton_decode import decode_attention_triton

            return decode_attention_triton(q, k, v, plan.mask)
        return decode_attention(q, k, v, plan.mask)
    if plan.backend == "flex":
        options = None
        if q.is_cuda:
            training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            options = (FLEX_TRAINING_OPTIONS if training else FLEX_INFERENCE_OPTIONS).get(
                torch.cuda.get_device_capability(q.device))
        return _compiled_flex()(q, k, v, block_mask=plan.block_mask, enable_gqa=q.shape[1] != k.shape[1],
                                kernel_options=options)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, enable_gqa=q.shape[1] != k.shape[1])


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per row. The query heads sharing a KV head become that head's queries, so one fused SDPA call
    (no GQA expansion, no per-head copies) reads each K and V once; the mask (b, 1, 1, Tk) covers them all."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d)  # (b, hkv, g, dqk): query heads sharing a KV head
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)  # (b, hkv, g, dv)
    return out.reshape(b, hq, 1, v.shape[-1])


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    allow_many_recompiles()
    return torch.compile(flex_attention, dynamic=False)


def allow_many_recompiles(limit: int = 512) -> None:
    """FlexAttention is compiled per (batch, queries, keys) shape; past dynamo's default limit of 8 shapes it
    silently falls back to eager flex attention, which materialises every score. Training, benchmarks and
    studies go through many shapes, so raise the limit."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))


def key_index_offsets(q_pos: torch.Tensor, k_pos: torch.Tensor,
                      k_valid: torch.Tensor | None) -> int | torch.Tensor | None:
    """Per-row offsets o such that every valid key j holds position j - o, exactly the keys j >= o are valid, and
    query i holds position i + (Tk - Tq) - o: the layout of a whole forward ([padding, meta, text]) and of a first
    prefill chunk after a fresh cache's empty slots. Then visibility follows from indices alone. Returns an int when
    every row has the same offset, a (b,) tensor when not, None for any other layout (a ring buffer, holes)."""
    tk, tq = k_pos.shape[1], q_pos.shape[1]
    if k_valid is None:
        k_valid = torch.ones_like(k_pos, dtype=torch.bool)
    index = torch.arange(tk, device=k_pos.device)
    offset = (~k_valid).sum(dim=1)  # the invalid keys must be exactly a prefix
    first_key = index - offset[:, None]
    # Padding queries (whose own key is invalid) hold position 0 whatever their index, and see only their own key.
    affine = ((first_key >= 0) == k_valid).all() & ((first_key == k_pos) | ~k_valid).all() & (
        (q_pos == first_key[:, tk - tq:]) | ~k_valid[:, tk - tq:]).all()
    # One host sync per plan for all three answers (prefill only, never inside the CUDA-graph decode step).
    affine, uniform, first = torch.stack([affine.long(), (offset == offset[0]).all().long(), offset[0]]).tolist()
    if not affine:
        return None
    return first if uniform else offset


def _flex_block_mask(q_pos, k_pos, k_valid, window, num_meta, offset=None):
    """FlexAttention's block mask for the rule; from indices when `offset` (see `key_index_offsets`) is given."""
    from torch.nn.attention.flex_attention import create_block_mask

    shift = k_pos.shape[1] - q_pos.shape[1]  # query i's own key is key i + shift
    if offset is not None:
        # The rule over indices: no per-element loads of positions, so masked and full blocks are cheap (8.9x faster
        # on a 1.5B sliding-window layer at 8K than the position lookups below, benchmarks/bench_prefill_attention.py).
        per_row = isinstance(offset, torch.Tensor)

        def visible_by_index(b, h, qi, ki):
            first = offset[b] if per_row else offset  # index of the row's first real key (position 0)
            seen = (ki >= first) & (ki <= qi + shift)
            if window is not None:
                seen = seen & ((qi + shift - ki <= window) | (ki < first + num_meta))
            return seen | (ki == qi + shift)  # a padding query sees its own key (its output is never used)

        return create_block_mask(visible_by_index, q_pos.shape[0] if per_row else None, None, q_pos.shape[1],
                                 k_pos.shape[1], device=q_pos.device)

    k_valid = torch.ones_like(k_pos, dtype=torch.bool) if k_valid is None else k_valid

    def visible(b, h, qi, ki):
        qp, kp = q_pos[b, qi], k_pos[b, ki]
        seen = k_valid[b, ki] & (kp <= qp)
        if window is not None:
            seen = seen & ((qp - kp <= window) | (kp < num_meta))
        # A padding query sees its own key so no row is empty (its output is never used).
        return seen | (ki == qi + shift)

    return create_block_mask(visible, q_pos.shape[0], None, q_pos.shape[1], k_pos.shape[1], device=q_pos.device)
