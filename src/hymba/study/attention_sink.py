"""Attention sinks: how much attention each layer puts on the first token and on the meta tokens.

The paper's "forced-to-attend" argument: softmax attention must put its mass somewhere, and heads with nothing
useful to read park it on the first token (an attention sink). Meta tokens give them a learned place to park
it instead, one that sliding-window layers can always see. With and without meta tokens, the shares below show
where that mass goes.

The probabilities are recomputed explicitly (the model's attention kernels never materialise them): a forward
hook on each attention layer's `mamba.in_proj` captures the projections, and q, k get RoPE and the visibility
rule of `HymbaMixer.attention` (window, meta tokens, KV reuse from the group's producer) exactly as there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hymba.model import apply_rope, rope_cos_sin
from hymba.ops.attention import visible_keys


@dataclass
class AttentionMap:
    """One attention layer's probabilities (b, heads, S, S) over [meta tokens, text], and its values."""

    probs: torch.Tensor
    values: torch.Tensor  # (b, heads, S, d_v), the KV heads repeated per query head


@torch.no_grad()
def attention_maps(model, input_ids: torch.Tensor) -> dict[int, AttentionMap]:
    """Attention probabilities of every attention layer for unpadded `input_ids` (b, L), in float32.

    Sequence positions S = num_memory_tokens + L: the meta tokens come first, as in the model's forward.
    """
    config = model.config
    projections: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        if config.has_attention(i):
            hooks.append(layer.mamba.in_proj.register_forward_hook(
                lambda module, args, out, i=i: projections.__setitem__(i, out.float())))
    try:
        model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()

    b, L = input_ids.shape
    M = config.num_memory_tokens
    positions = torch.arange(M + L, device=input_ids.device).expand(b, -1)  # meta at 0..M-1, as in the forward
    cos, sin = rope_cos_sin(config, positions, torch.float32)
    produced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    maps = {}
    for i in sorted(projections):
        mixer = model.model.layers[i].mamba
        parts = torch.split(projections[i], mixer.split_sizes, dim=-1)
        q = parts[0].view(b, M + L, mixer.n_heads, mixer.d_qk)
        if config.rope:
            q = apply_rope(q, cos, sin)
        q = q.transpose(1, 2)  # (b, hq, S, dqk)
        if mixer.reuses_kv:
            k, v = produced[config.kv_producer(i)]
        else:
            k = parts[1].view(b, M + L, mixer.n_kv, mixer.d_qk)
            if config.rope:
                k = apply_rope(k, cos, sin)
            k = k.transpose(1, 2)  # (b, hkv, S, dqk)
            v = parts[2].view(b, M + L, mixer.n_kv, mixer.d_v).transpose(1, 2)  # (b, hkv, S, dv)
            produced[i] = (k, v)
        group = mixer.n_heads // mixer.n_kv
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # GQA: (b, hq, S, d)
        scores = q @ k.transpose(-1, -2) * mixer.d_qk**-0.5  # (b, hq, S, S)
        mask = visible_keys(positions, positions, None, mixer.window, M)  # (b, 1, S, S)
        maps[i] = AttentionMap(torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1), v)
    return maps


@torch.no_grad()
def sink_shares(model, input_ids: torch.Tensor) -> list[dict[str, float]]:
    """Per attention layer: the mean share of a text query's attention on the meta tokens, on the first text token,
    and on everything else (the three sum to 1), averaged over heads, text queries and rows.

    In sliding-window layers, queries further than the window from the first token cannot see it, so its share
    there is counted as 0; the meta tokens stay visible to every query.
    """
    M = model.config.num_memory_tokens
    shares = []
    for layer, amap in attention_maps(model, input_ids).items():
        text = amap.probs[:, :, M:, :]  # (b, hq, L, S): queries over the text tokens
        meta = text[..., :M].sum(-1).mean().item()
        first = text[..., M].mean().item()
        total = text.sum(-1).mean().item()
        shares.append({"layer": layer, "meta": meta, "first_token": first, "other": total - meta - first,
                       "total": total, "window": model.config.window(layer)})
    return shares
