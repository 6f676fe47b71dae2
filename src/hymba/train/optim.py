"""AdamW with decay on weight matrices only, and the learning-rate schedules (cosine, warmup-stable-decay).

The schedule is a pure function of the step, so resuming needs nothing but the step number: there is no
scheduler object whose state could drift from the optimizer's.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from hymba.errors import HymbaError

# 2-D parameters that are not weight matrices: learned vectors (meta tokens) and the SSM's log decay rates.
# Decaying them pulls meta tokens to zero and A toward -1, which is a prior nobody asked for.
NO_DECAY_NAMES = ("memory_tokens", "A_log")

SCHEDULES = ("cosine", "wsd", "constant")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight matrices (decayed) and everything else (norm scales, biases, D, A_log, meta tokens).

    A tied embedding appears once (named_parameters de-duplicates shared tensors).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        excluded = any(part in name.split(".") for part in NO_DECAY_NAMES)
        (decay if p.dim() >= 2 and not excluded else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def decayed_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters `param_groups` decays (for logs and tests)."""
    decayed = {id(p) for p in param_groups(model, 1.0)[0]["params"]}
    return [name for name, p in model.named_parameters() if id(p) in decayed]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   eps: float = 1e-8, device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused CUDA kernel when the parameters live on a GPU."""
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             **({"fused": True} if fused else {}))


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int, schedule: str = "cosine",
          decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based).

    All schedules warm up linearly from lr/warmup to `lr` over `warmup_steps`. Then:
    - "cosine": cosine from `lr` down to `min_lr` at `max_steps`;
    - "wsd" (warmup-stable-decay, Hymba's schedule): constant `lr`, then over the last `decay_fraction` of
      `max_steps` a linear decay to `min_lr`;
    - "constant": `lr` after warmup.
    """
    if schedule not in SCHEDULES:
        raise HymbaError(f"unknown lr schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant" or step >= max_steps:
        return lr if schedule == "constant" else min_lr
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
    decay_steps = max(1, round(decay_fraction * max_steps))
    decay_start = max(warmup_steps, max_steps - decay_steps)
    if step < decay_start:
        return lr
    progress = (step - decay_start + 1) / max(1, max_steps - decay_start)
    return lr + progress * (min_lr - lr)
