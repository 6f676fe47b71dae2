"""Attention over Hymba's key layout: meta tokens visible to all, sliding windows, global layers, GQA.

Which keys a query sees is decided by positions, never by buffer order, so one rule serves the full
forward, chunked prefill and decoding over a ring buffer alike:

    key j is visible to query i  iff  key j holds a real token, pos_j <= pos_i, and
                                      (the layer is global, or pos_i - pos_j <= window, or pos_j < num_meta)

`attention` is the reference path (a boolean mask and PyTorch's SDPA); it runs on any device and dtype.
"""

from __future__ import annotations

import torch.nn.functional as F

from hymba.ops.attention.masks import visible_keys

__all__ = ["attention", "visible_keys"]


def attention(q, k, v, mask):
    """q (b, hq, Tq, dqk); k (b, hkv, Tk, dqk); v (b, hkv, Tk, dv); mask (b, 1, Tq, Tk) bool -> (b, hq, Tq, dv).

    GQA is handled by SDPA itself (`enable_gqa`) so K and V are never copied per query head.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
