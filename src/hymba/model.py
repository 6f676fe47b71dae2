"""The Hymba model, readable top to bottom as the steps of HYMBA.md.

One layer: normalise, project once into queries, keys, values, SSM input and gate; run attention heads and
SSM heads side by side on that same input; fuse `out_proj((norm_attn(attn) + norm_ssm(ssm)) / 2)`; add the
residual; then a SwiGLU MLP with its own residual. Learnable meta tokens are prepended to every sequence,
pass through all layers and are dropped before the LM head.

Module paths equal the released checkpoint's tensor names (`model.layers.3.mamba.in_proj.weight`, ...), so
loading a checkpoint is a plain `load_state_dict`. Every forward - training, scoring, prefill, decoding -
goes through the same modules; an optional `HymbaCache` is the only difference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from hymba.config import HymbaConfig
from hymba.ops import capturing_cuda_graph, compiled_on_gpu
from hymba.ops.attention import attention, plan_attention
from hymba.ops.conv import causal_conv1d
from hymba.ops.cross_entropy import linear_cross_entropy
from hymba.ops.linear import fused_linear, project
from hymba.ops.mlp import swiglu
from hymba.ops.norm import normed_input, rms_norm
from hymba.ops.scan import selective_scan, ssm_projections, ssm_step

if TYPE_CHECKING:
    from hymba.cache import HymbaCache


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back before the scale (as the release does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(config: HymbaConfig, device: torch.device) -> torch.Tensor:
    """Inverse frequencies of RoPE; "ntk" stretches the base to the extended context (the release's formula)."""
    dim, base = config.qk_head_dim, config.rope_theta
    if config.rope_type == "ntk":
        factor = 2
        stretch = factor * config.max_position_embeddings / config.orig_max_position_embeddings - (factor - 1)
        base = base * stretch ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def rope_cos_sin(config: HymbaConfig, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (b, T, 1, head_dim) for integer positions (b, T), to rotate heads laid out token-major
    (b, T, heads, head_dim) as the projections write them; angles in float32."""
    freqs = positions.float()[..., None] * rope_inv_freq(config, positions.device)  # (b, T, dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype).unsqueeze(2), emb.sin().to(dtype).unsqueeze(2)


@compiled_on_gpu
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def runs_as_itself(module: nn.Module) -> bool:
    """Whether `module` must be called rather than read: an adapter wraps it (LoRA), or a hook watches it."""
    return type(module) is not nn.Linear or bool(module._forward_hooks or module._forward_pre_hooks)


def fused_projection(linear: nn.Linear, x: torch.Tensor, norm: RMSNorm | None = None, *, x2: torch.Tensor | None = None,
                     norm2: RMSNorm | None = None, up: nn.Linear | None = None,
                     residual: torch.Tensor | None = None) -> torch.Tensor:
    """residual + linear(norm(x)); with x2, of the branch norms' average (norm(x) + norm2(x2)) / 2; with `up`, of
    swiglu(linear(h), up(h)). At a decode step's few rows this is one kernel (`hymba.ops.linear.fused_linear`),
    where the norm, the projection, SwiGLU and the residual add are otherwise five."""
    norm_weight, norm2_weight = (None if n is None else n.weight for n in (norm, norm2))
    eps = 1e-6 if norm is None else norm.eps
    if runs_as_itself(linear) or (up is not None and runs_as_itself(up)):
        h = normed_input(x, norm_weight, x2, norm2_weight, eps)
        out = linear(h) if up is None else swiglu(linear(h), up(h))
        return out if residual is None else residual + out
    return fused_linear(x, linear.weight, norm_weight, x2, norm2_weight, eps, linear.bias,
                        None if up is None else up.weight, residual)


# What a layer's attention heads attend over: keys (b, hkv, S, dqk), values (b, hkv, S, dv), the keys' positions
# (b, S) and which keys are real (b, S), None when none is padding. A KV producer passes it to its group's reusers.
KeysValues = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


@dataclass
class ForwardContext:
    """What every layer of one forward reads: positions, which tokens are real, the cache, RoPE's cos and sin.

    Nothing a layer computes for a later one goes in here (the producers' K,V are layer arguments and return values):
    FSDP may hand each layer unit a copy of its arguments, and activation checkpointing re-runs a layer from them.
    `plans` is only a memo, so a copy costs time, not correctness.
    """

    positions: torch.Tensor  # (b, T) position of each input row, meta tokens at 0..M-1
    valid: torch.Tensor | None  # (b, T) bool, False at padding; None when nothing is padded
    cache: HymbaCache | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    plans: dict[tuple, object] = field(default_factory=dict)  # see `plan`

    def plan(self, window: int | None, k_pos: torch.Tensor, k_valid: torch.Tensor | None, num_meta: int):
        """The attention plan for keys at `k_pos` under `window`, made once per forward for all the layers that
        share it. Keyed by the key positions' identity, or by None for this forward's own positions (every layer
        without a cache): a key that stays the same from forward to forward keeps a compiled layer's guards true."""
        key = (window, None if k_pos is self.positions else id(k_pos))
        if key not in self.plans:
            self.plans[key] = plan_attention(self.positions, k_pos, k_valid, window, num_meta,
                                             cache_decode=self.cache is not None and self.cache.decoding,
                                             positions_are_indices=self.valid is None and (
                                                 self.cache is None or not self.cache.started))
        return self.plans[key]


class HymbaMixer(nn.Module):
    """Attention heads and SSM heads in parallel on one input, fused by two norms and `out_proj`.

    Named `mamba` in the layer (and so in checkpoints) after the release, which holds both kinds of heads here.
    """

    def __init__(self, config: HymbaConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.use_attention, self.use_ssm = config.has_attention(layer_idx), config.has_ssm(layer_idx)
        self.reuses_kv = self.use_attention and not config.produces_kv(layer_idx)
        self.shares_kv = config.produces_kv(layer_idx) and len(config.groups_of(layer_idx)) > 1
        self.window = config.window(layer_idx)
        c = config
        self.n_heads, self.n_kv, self.d_qk, self.d_v = c.num_attention_heads, c.num_key_value_heads, c.qk_head_dim, \
            c.value_head_dim
        # in_proj rows, in the release's order: q, k, v (producers only), SSM input u, gate z.
        self.split_sizes = []
        if self.use_attention:
            self.split_sizes.append(c.hidden_size)
            if not self.reuses_kv:
                self.split_sizes += [self.n_kv * self.d_qk, self.n_kv * self.d_v]
        if self.use_ssm:
            self.split_sizes += [c.d_inner, c.d_inner]
        self.in_proj = nn.Linear(c.hidden_size, sum(self.split_sizes), bias=c.mamba_proj_bias)
        fused_dim = c.d_inner if self.use_ssm else c.attn_out_dim
        self.out_proj = nn.Linear(fused_dim, c.hidden_size, bias=c.mamba_proj_bias)
        if self.use_attention:
            self.pre_avg_layernorm1 = RMSNorm(c.attn_out_dim, c.rms_norm_eps)  # beta1: attention side
        if self.use_ssm:
            self.pre_avg_layernorm2 = RMSNorm(c.d_inner, c.rms_norm_eps)  # beta2: SSM side
            self.conv1d = nn.Conv1d(c.d_inner, c.d_inner, c.mamba_d_conv, groups=c.d_inner, bias=c.mamba_conv_bias,
                                    padding=c.mamba_d_conv - 1)
            # Lists of one, as in the release, so tensor names read `x_proj.0.weight`, `A_log.0`, ...
            self.x_proj = nn.ModuleList([nn.Linear(c.d_inner, c.dt_rank + 2 * c.mamba_d_state, bias=False)])
            self.dt_proj = nn.ModuleList([nn.Linear(c.dt_rank, c.d_inner, bias=True)])
            A = torch.arange(1, c.mamba_d_state + 1, dtype=torch.float32).expand(c.d_inner, -1)
            self.A_log = nn.ParameterList([nn.Parameter(torch.log(A))])
            self.D = nn.ParameterList([nn.Parameter(torch.ones(c.d_inner))])
            if c.mamba_inner_layernorms:
                self.dt_layernorm = RMSNorm(c.dt_rank, c.rms_norm_eps)
                self.B_layernorm = RMSNorm(c.mamba_d_state, c.rms_norm_eps)
                self.C_layernorm = RMSNorm(c.mamba_d_state, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, shared_kv: KeysValues | None = None,
                norm: RMSNorm | None = None) -> tuple[torch.Tensor, KeysValues | None]:
        """x (b, T, hidden) -> (x + the heads' fused output on norm(x), the K,V this layer shares with its group's
        reusers or None). The layer's input norm and residual add are applied here, in the projections next to them
        (`fused_projection`).

        A reusing layer attends over `shared_kv`, its producer's."""
        parts = list(torch.split(fused_projection(self.in_proj, x, norm), self.split_sizes, dim=-1))
        attn = ssm = keys = None
        if self.use_attention:
            q = parts.pop(0)
            keys = shared_kv if self.reuses_kv else self.keys_values(parts.pop(0), parts.pop(0), ctx)
            attn = self.attention(q, keys, ctx)
        if self.use_ssm:
            u, z = parts
            ssm = self.ssm(u, z, ctx)
        if ssm is None:
            out = fused_projection(self.out_proj, attn, self.pre_avg_layernorm1, residual=x)
        elif attn is None:
            out = fused_projection(self.out_proj, ssm, self.pre_avg_layernorm2, residual=x)
        else:  # (norm_attn(attn) + norm_ssm(ssm)) / 2
            out = fused_projection(self.out_proj, attn, self.pre_avg_layernorm1, x2=ssm, norm2=self.pre_avg_layernorm2,
                                   residual=x)
        return out, keys if self.shares_kv else None

    # ------------------------------------------------------------------ attention heads
    def keys_values(self, k, v, ctx: ForwardContext) -> KeysValues:
        """A producer's k, v (b, T, kv*d) -> what its attention attends over: these tokens, or the cache's."""
        b, T, _ = k.shape
        k = k.view(b, T, self.n_kv, self.d_qk)
        if self.config.rope:
            k = apply_rope(k, *ctx.rope)  # token-major, as projected: a head-major view made it a strided gather
        k = k.transpose(1, 2)  # (b, hkv, T, dqk)
        v = v.view(b, T, self.n_kv, self.d_v).transpose(1, 2)  # (b, hkv, T, dv)
        if ctx.cache is None:
            return k, v, ctx.positions, ctx.valid
        return ctx.cache.update_kv(self.layer_idx, k, v)

    def attention(self, q, keys: KeysValues, ctx: ForwardContext) -> torch.Tensor:
        """q (b, T, hidden) over `keys` (this layer's, or its producer's) -> (b, T, heads * d_v)."""
        b, T, _ = q.shape
        q = q.view(b, T, self.n_heads, self.d_qk)
        if self.config.rope:
            q = apply_rope(q, *ctx.rope)
        q = q.transpose(1, 2)  # (b, hq, T, dqk)
        k_all, v_all, k_pos, k_valid = keys
        plan = ctx.plan(self.window, k_pos, k_valid, self.config.num_memory_tokens)
        out = attention(q, k_all, v_all, plan)  # (b, hq, T, dv)
        return out.transpose(1, 2).reshape(b, T, self.n_heads * self.d_v)

    # ------------------------------------------------------------------ SSM heads
    def ssm(self, u, z, ctx: ForwardContext) -> torch.Tensor:
        """Mamba-1 heads: causal conv + SiLU, input-dependent dt/B/C (each RMS-normed), selective scan, gate.
        u, z (b, T, d_inner) -> (b, T, d_inner).

        x_proj, dt_proj and the dt/B/C norms are applied through their weights (`ssm_projections`): dt_proj's bias
        goes inside softplus, and a decode step runs as one fused op (`ssm_step`)."""
        keep = None if ctx.valid is None else ctx.valid.to(u.dtype)  # (b, T): 0 at padding
        conv_weight = self.conv1d.weight[:, 0, :]  # (d_inner, d_conv)
        projections = (self.x_proj[0].weight, self.dt_proj[0].weight,
                       (self.dt_layernorm.weight, self.B_layernorm.weight, self.C_layernorm.weight)
                       if self.config.mamba_inner_layernorms else None, self.config.rms_norm_eps)
        state = None if ctx.cache is None else ctx.cache.ssm_layer(self.layer_idx)
        if ctx.cache is not None and u.shape[1] == 1 and ctx.cache.started:  # one decode step
            # A = -exp(A_log) is taken inside the update, and D and dt_proj's bias go in as stored (the kernels read
            # them as float32), sparing the decode step three elementwise kernels per layer (-exp, two casts).
            return ssm_step(state.conv, state.ssm, u[:, 0], z[:, 0], conv_weight, self.conv1d.bias, *projections[:2],
                            self.dt_proj[0].bias, self.A_log[0], self.D[0], *projections[2:],
                            keep=None if keep is None else keep[:, 0]).unsqueeze(1)
        D, dt_bias = self.D[0].float(), self.dt_proj[0].bias.float()
        A = -torch.exp(self.A_log[0].float())  # (d_inner, d_state)

        u = u.transpose(1, 2)  # (b, d_inner, T)
        if keep is not None:
            u = u * keep[:, None]  # padding must not enter the conv window of the tokens after it
        u, conv_state = causal_conv1d(u, conv_weight, self.conv1d.bias, None if state is None else state.conv)
        if state is not None:
            state.conv.copy_(conv_state)
        if keep is not None:
            u = u * keep[:, None]  # with u = 0 the SSM state stays exactly zero through left padding
        delta, B, C = ssm_projections(u.transpose(1, 2), *projections)  # (b, T, d_inner), (b, T, d_state) x 2
        y, last = selective_scan(u, delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D,
                                 z.transpose(1, 2), dt_bias, True, None if state is None else state.ssm)
        if state is not None:
            state.ssm.copy_(last)
        return y.transpose(1, 2)  # (b, T, d_inner)


class HymbaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, config: HymbaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor:
        """x + the MLP's output on norm(x) (the layer's norm and residual add, applied in the projections)."""
        h = fused_projection(self.gate_proj, x, norm, up=self.up_proj)
        return fused_projection(self.down_proj, h, residual=x)


class SingleExpert(nn.Module):
    """Holds the MLP at `moe.experts.0`, the path the released checkpoints store it under."""

    def __init__(self, config: HymbaConfig):
        super().__init__()
        self.experts = nn.ModuleList([HymbaMLP(config)])

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor:
        return self.experts[0](x, norm)


class HymbaDecoderLayer(nn.Module):
    def __init__(self, config: HymbaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mamba = HymbaMixer(config, layer_idx)
        self.has_mlp = config.intermediate_size > 0
        if self.has_mlp:
            self.pre_moe_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.moe = SingleExpert(config)

    def forward(self, x: torch.Tensor, ctx: ForwardContext,
                shared_kv: KeysValues | None = None) -> tuple[torch.Tensor, KeysValues | None]:
        """x (b, T, hidden) -> (x, the K,V this layer shares with its group's reusers or None); a reuser gets its
        producer's as `shared_kv`."""
        x, produced = self.mamba(x, ctx, shared_kv, norm=self.input_layernorm)  # x + mixer(input_layernorm(x))
        if self.has_mlp:
            x = self.moe(x, norm=self.pre_moe_layernorm)  # x + mlp(pre_moe_layernorm(x))
        return x, produced


class HymbaModel(nn.Module):
    def __init__(self, config: HymbaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.num_memory_tokens > 0:
            self.memory_tokens = nn.Parameter(torch.randn(config.num_memory_tokens, config.hidden_size))
        self.layers = nn.ModuleList([HymbaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        # Under autocast, hold the residual stream in autocast's dtype (Megatron's and torchtitan's default) rather
        # than in the float32 of the embedding: bf16 adds between layers, and no casts into each projection and back.
        self.residual_in_autocast_dtype = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: HymbaCache | None = None, between_layers: Callable[[], None] | None = None) -> torch.Tensor:
        """Hidden states (b, L, hidden) for the L input tokens; meta tokens are added and removed here.

        `between_layers` is called after each layer has been launched: the serving engine launches its decode steps
        there while a prefill forward is being launched (see `hymba.engine`)."""
        x = self.embed_tokens(input_ids)
        if self.residual_in_autocast_dtype and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))  # the meta tokens follow x's dtype
        valid = None
        if attention_mask is not None and (capturing_cuda_graph(x) or not bool(attention_mask.all())):
            valid = attention_mask.bool()  # a captured forward keeps its mask: the check would read the device
        continuing = cache is not None and cache.started
        if continuing:
            if valid is not None:
                raise ValueError("padding is only allowed in the first chunk of a cached sequence")
            positions = cache.next_position[:, None] + torch.arange(x.shape[1], device=x.device)
            num_meta, left_pad = 0, None
        else:
            x, positions, valid, left_pad = self._prepend_meta(x, valid)
            num_meta = self.config.num_memory_tokens
        ctx = ForwardContext(positions=positions, valid=valid, cache=cache,
                             rope=rope_cos_sin(self.config, positions, x.dtype))
        if cache is not None:
            cache.begin(positions, valid)
        else:
            # Without a cache every layer attends over these positions: the plans are made here, before the layers,
            # so that a compiled layer (`hymba train --compile`) only looks its plan up and never traces its making.
            for window in dict.fromkeys(self.config.window(i) for i in range(len(self.layers))
                                        if self.config.has_attention(i)):
                ctx.plan(window, positions, valid, self.config.num_memory_tokens)
        # Producer layer -> its K,V, passed to the later layers of its group as an argument: per-layer FSDP units
        # and activation checkpointing see (and re-run with) what crosses the layer boundary.
        shared: dict[int, KeysValues] = {}
        for i, layer in enumerate(self.layers):
            producer = self.config.kv_producer(i)
            shared_kv = shared.get(producer)
            if i == self.config.groups_of(producer)[-1]:
                shared.pop(producer, None)  # the group's last layer: a long prefill holds one group's K,V at a time
            if self.gradient_checkpointing and self.training:
                x, produced = torch.utils.checkpoint.checkpoint(layer, x, ctx, shared_kv, use_reentrant=False)
            else:
                x, produced = layer(x, ctx, shared_kv)
            if produced is not None:
                shared[i] = produced
            if between_layers is not None:
                between_layers()
        if cache is not None:
            cache.advance(positions, valid)
        x = self.final_layernorm(x)
        return self._drop_meta(x, num_meta, left_pad)

    def _prepend_meta(self, x: torch.Tensor, valid: torch.Tensor | None):
        """Lay each row out as [its left padding, meta tokens, its tokens]; positions count from the first meta.

        Meta tokens must follow the padding so the SSM sees them directly before the text, as it would unpadded.
        Returns (x, positions, valid, left_pad) where left_pad (b,) counts each row's leading padding.
        """
        b, L, _ = x.shape
        M = self.config.num_memory_tokens
        if M:
            x = torch.cat([self.memory_tokens.to(x.dtype).expand(b, M, -1), x], dim=1)  # [meta, row]
        if valid is None:
            positions = torch.arange(M + L, device=x.device).expand(b, -1)
            return x, positions, None, None
        left_pad = (valid.long().cumsum(-1) == 0).sum(-1)  # (b,)
        idx = torch.arange(M + L, device=x.device).expand(b, -1)
        pad = left_pad[:, None]
        # Destination k takes: a pad (source M + k) if k < pad, a meta token (k - pad) if k < pad + M, else itself.
        source = torch.where(idx < pad, idx + M, torch.where(idx < pad + M, idx - pad, idx))
        x = x.gather(1, source[..., None].expand(-1, -1, x.shape[-1]))
        valid = torch.cat([torch.ones(b, M, dtype=torch.bool, device=x.device), valid], dim=1).gather(1, source)
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        return x, positions, valid, left_pad

    @staticmethod
    def _drop_meta(x: torch.Tensor, num_meta: int, left_pad: torch.Tensor | None) -> torch.Tensor:
        if not num_meta:
            return x
        if left_pad is None:
            return x[:, num_meta:]
        L = x.shape[1] - num_meta
        t = torch.arange(L, device=x.device).expand(x.shape[0], -1)
        source = t + num_meta * (t >= left_pad[:, None])
        return x.gather(1, source[..., None].expand(-1, -1, x.shape[-1]))


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None


def lm_head_loss(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"):
    """Cross-entropy of the head's logits for `hidden` (N, hidden) against `targets` (N,), ignore index -100.

    A plain linear head goes through `linear_cross_entropy`, which never holds more than one chunk of tokens'
    logits. A head replaced by a wrapper (a LoRA adapter, peft's modules_to_save) must run as the module it is,
    so it gets full logits and the plain loss: reading its weight would silently skip the adapter.
    """
    if type(lm_head) is nn.Linear and lm_head.bias is None:
        return linear_cross_entropy(hidden, lm_head.weight, targets, reduction)
    return F.cross_entropy(lm_head(hidden).float(), targets, ignore_index=-100, reduction=reduction)


class HymbaForCausalLM(nn.Module):
    """Hymba language model. `forward(input_ids, attention_mask=None, labels=None)` as in transformers."""

    def __init__(self, config: HymbaConfig):
        super().__init__()
        self.config = config
        self.model = HymbaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: HymbaCache | None = None,
                logits_to_keep: int | None = None, *, shift_labels: torch.Tensor | None = None,
                loss_reduction: str = "mean", return_logits: bool = True,
                between_layers: Callable[[], None] | None = None) -> CausalLMOutput:
        """Logits (b, L, vocab) for each input token; with `labels`, also the mean next-token cross-entropy.

        `labels` are aligned with `input_ids` (shifted inside, ignore index -100); `shift_labels` are the next-token
        targets themselves, one per input token (the trainer's layout; transformers' name). `loss_reduction="sum"`
        sums over targets instead of averaging. The loss is computed from the hidden states chunk by chunk
        (`lm_head_loss`), never from the returned logits, so it costs no float32 copy of them; `return_logits=False`
        skips the logits altogether (training, where only the loss is wanted; `logits` is then None).
        `logits_to_keep=n` computes logits for the last n positions only (generation needs just the last).
        `between_layers`: see `HymbaModel.forward`.
        """
        if labels is not None and shift_labels is not None:
            raise ValueError("pass labels (aligned with input_ids) or shift_labels (already shifted), not both")
        hidden = self.model(input_ids, attention_mask, cache, between_layers)
        loss = None
        if labels is not None:
            loss = lm_head_loss(self.lm_head, hidden[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), loss_reduction)
        elif shift_labels is not None:
            loss = lm_head_loss(self.lm_head, hidden.flatten(0, 1), shift_labels.flatten(), loss_reduction)
        logits = None
        if return_logits:
            logits = project(self.lm_head, hidden if logits_to_keep is None else hidden[:, -logits_to_keep:])
        return CausalLMOutput(logits=logits, loss=loss)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Fresh initialisation as the release's `_init_weights`: normal(0, 0.02) linears/embeddings, zero biases."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, HymbaMixer) and module.use_ssm:
                d_state = self.config.mamba_d_state
                module.A_log[0].copy_(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).expand_as(
                    module.A_log[0]))
                module.D[0].fill_(1.0)
        if self.config.num_memory_tokens:
            self.model.memory_tokens.normal_(0.0, 1.0, generator=generator)

    # Checkpoint I/O lives in hymba.checkpoint; these are the transformers-style entry points.
    @classmethod
    def from_pretrained(cls, path_or_id: str, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, **kwargs) -> HymbaForCausalLM:
        from hymba.checkpoint import load_pretrained

        return load_pretrained(path_or_id, dtype=dtype, device=device, **kwargs)

    def save_pretrained(self, directory: str, **kwargs) -> None:
        from hymba.checkpoint import save_pretrained

        save_pretrained(self, directory, **kwargs)

    def generate(self, *args, **kwargs):
        from hymba.generate import generate

        return generate(self, *args, **kwargs)
