"""The visibility rule of Hymba attention as a boolean mask (see `hymba.ops.attention`)."""

from __future__ import annotations

import torch


def visible_keys(q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor | None, window: int | None,
                 num_meta: int) -> torch.Tensor:
    """(b, 1, Tq, Tk) bool mask from query positions (b, Tq), key positions (b, Tk) and key validity (b, Tk).

    A query that would see no key at all (a padding query) is let see every key instead: its output is
    never used, and this keeps softmax free of NaN.
    """
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = kp <= qp
    if window is not None:
        mask &= (qp - kp <= window) | (kp < num_meta)
    if k_valid is not None:
        mask &= k_valid[:, None, :]
    mask |= ~mask.any(dim=-1, keepdim=True)
    return mask.unsqueeze(1)
