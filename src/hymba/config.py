"""`HymbaConfig`: the released `config.json`, field for field, plus the switches that make variants config.

Field names are the released keys verbatim, so a released config loads and saves unchanged (unknown keys
are kept in `extra` and written back). Three things go beyond the release, all expressible in its format:

- `layer_type[i]` is "h" (hybrid: attention and SSM heads in parallel, the release), "a" (attention heads
  only, a Llama-style layer) or "m" (SSM heads only, a Mamba layer);
- `sliding_window: null` makes every attention layer global;
- `num_memory_tokens: 0` and `kv_reuse_group: null` switch meta tokens and cross-layer KV sharing off.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hymba.errors import HymbaError, did_you_mean

LAYER_TYPES = {"h": "hybrid (attention + SSM heads)", "a": "attention only", "m": "SSM (Mamba) only"}


def _list_of(value: Any, kind: type) -> bool:
    """A list (or tuple) whose items are all exactly `kind` (so True is no layer index)."""
    return isinstance(value, (list, tuple)) and all(type(item) is kind for item in value)


@dataclass
class HymbaConfig:
    # Shape.
    vocab_size: int = 32001
    hidden_size: int = 1600
    intermediate_size: int = 5504
    num_hidden_layers: int = 32
    num_attention_heads: int = 25
    num_key_value_heads: int = 5
    attn_hidden_size: int = -1
    kq_head_dim: int = -1
    v_head_dim: int = 128
    layer_type: list[str] | None = None
    # SSM heads.
    mamba_expand: int = 2
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_dt_rank: int | str = 100
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_inner_layernorms: bool = True
    conv_dim: dict[str, int] | None = None
    num_mamba: int = 1
    use_mamba_kernels: bool = True
    # Attention layout.
    num_memory_tokens: int = 128
    memory_tokens_interspersed_every: int = 0
    sliding_window: int | None = 1024
    global_attn_idx: list[int] = field(default_factory=lambda: [0, 15, 31])
    kv_reuse_group: list[list[int]] | None = field(
        default_factory=lambda: [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14], [16, 17, 18],
                                 [19, 20], [21, 22], [23, 24], [25, 26], [27, 28], [29, 30]])
    kv_reuse_every_i_layer: int = -1
    kv_weight_reuse: bool = False
    kq_norm: str = "none"
    attention_dropout: float = 0.0
    attn_implementation: str = "flex"
    attn_implementation_new: str = "flex"
    # Positions.
    rope: bool = True
    rope_theta: float = 10000.0
    rope_type: str | None = "ntk"
    max_position_embeddings: int = 8192
    orig_max_position_embeddings: int | None = 2048
    seq_length: int = 8192
    # MLP, norms, embeddings.
    hidden_act: str = "silu"
    mlp_hidden_act: str = "silu"
    num_experts: int = 1
    num_experts_per_tok: int = 1
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    # Tokens and bookkeeping.
    bos_token_id: int = 1
    eos_token_id: int | list[int] = 2
    pad_token_id: int | None = 0
    calc_logits_for_entire_prompt: bool = False
    use_cache: bool = False
    model_type: str = "hymba"
    architectures: list[str] = field(default_factory=lambda: ["HymbaForCausalLM"])
    torch_dtype: str | None = "bfloat16"
    transformers_version: str | None = None
    auto_map: dict[str, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.layer_type is None:
            self.layer_type = ["h"] * self.num_hidden_layers
        if self.kv_reuse_every_i_layer > 0 and not self.kv_reuse_group:
            # The release's other spelling of KV sharing: layer i produces when i % n == 0, the rest reuse.
            n = self.kv_reuse_every_i_layer
            self.kv_reuse_group = [list(range(i, min(i + n, self.num_hidden_layers)))
                                   for i in range(0, self.num_hidden_layers, n) if n > 1]
        self.validate()

    # ------------------------------------------------------------------ derived shape
    @property
    def qk_head_dim(self) -> int:
        return self.kq_head_dim if self.kq_head_dim > 0 else self.hidden_size // self.num_attention_heads

    @property
    def d_inner(self) -> int:
        """Channels of the SSM heads (and of the hybrid layer's fused output)."""
        return self.mamba_expand * self.hidden_size

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.v_head_dim > 0 else self.d_inner // self.num_attention_heads

    @property
    def attn_out_dim(self) -> int:
        return self.num_attention_heads * self.value_head_dim

    @property
    def dt_rank(self) -> int:
        return math.ceil(self.hidden_size / 16) if self.mamba_dt_rank == "auto" else int(self.mamba_dt_rank)

    @property
    def groups(self) -> list[list[int]]:
        return [list(g) for g in (self.kv_reuse_group or [])]

    def has_attention(self, layer: int) -> bool:
        return self.layer_type[layer] in ("h", "a")

    def has_ssm(self, layer: int) -> bool:
        return self.layer_type[layer] in ("h", "m")

    def is_global(self, layer: int) -> bool:
        return self.sliding_window is None or layer in self.global_attn_idx

    def kv_producer(self, layer: int) -> int:
        """The layer whose K,V this layer attends over (itself unless it reuses a group's first layer)."""
        for group in self.groups:
            if layer in group[1:]:
                return group[0]
        return layer

    def groups_of(self, producer: int) -> list[int]:
        """The layers attending over `producer`'s K,V: itself first, then its reusers."""
        return next((g for g in self.groups if g[0] == producer), [producer])

    def produces_kv(self, layer: int) -> bool:
        return self.has_attention(layer) and self.kv_producer(layer) == layer

    def window(self, layer: int) -> int | None:
        return None if self.is_global(layer) else self.sliding_window

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise HymbaError naming the key and the fix for anything the model cannot run."""

        def fail(key: str, problem: str, fix: str) -> None:
            raise HymbaError(f"config `{key}`: {problem}; {fix}")

        n = self.num_hidden_layers
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "mamba_expand", "mamba_d_state", "mamba_d_conv", "max_position_embeddings"):
            if type(getattr(self, key)) is not int or getattr(self, key) <= 0:  # bool is an int subclass: refuse it
                fail(key, f"must be a positive integer, got {getattr(self, key)!r}", "set a positive integer")
        for key in ("intermediate_size", "num_memory_tokens"):
            if type(getattr(self, key)) is not int:
                fail(key, f"must be an integer, got {getattr(self, key)!r}", "set an integer")
        # The per-layer lists are checked for type first, so the checks below can index and compare them.
        if not _list_of(self.layer_type, str):
            fail("layer_type", f"must be a list of layer kinds, got {self.layer_type!r}",
                 f"give one of {sorted(LAYER_TYPES)} per layer")
        if not _list_of(self.global_attn_idx, int):
            fail("global_attn_idx", f"must be a list of layer indices, got {self.global_attn_idx!r}",
                 "e.g. [0, 15, 31]")
        if self.kv_reuse_group is not None and not (
                _list_of(self.kv_reuse_group, list) and all(_list_of(g, int) for g in self.kv_reuse_group)):
            fail("kv_reuse_group", f"must be a list of lists of layer indices, got {self.kv_reuse_group!r}",
                 "e.g. [[1, 2], [3, 4]], or null for no KV sharing")
        if self.hidden_size % self.num_attention_heads:
            fail("num_attention_heads", f"{self.num_attention_heads} heads do not divide hidden_size "
                 f"{self.hidden_size}", "pick a head count that divides hidden_size")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"{self.num_key_value_heads} KV heads do not divide "
                 f"{self.num_attention_heads} attention heads", "pick a divisor of num_attention_heads")
        if self.attn_hidden_size not in (-1, self.hidden_size):
            fail("attn_hidden_size", f"{self.attn_hidden_size} is not supported (queries are hidden_size wide)",
                 "set it to -1")
        if self.kq_head_dim not in (-1, self.hidden_size // self.num_attention_heads):
            fail("kq_head_dim", f"{self.kq_head_dim} does not match hidden_size / num_attention_heads", "set it to -1")
        if (self.mamba_dt_rank != "auto" and type(self.mamba_dt_rank) is not int) or self.dt_rank <= 0:
            fail("mamba_dt_rank", f"must be positive or 'auto', got {self.mamba_dt_rank!r}", "use e.g. 'auto'")
        if self.intermediate_size < 0:
            fail("intermediate_size", "must be >= 0 (0 means no MLP)", "set the MLP width")
        if self.num_memory_tokens < 0:
            fail("num_memory_tokens", "must be >= 0", "use 0 to switch meta tokens off")
        if len(self.layer_type) != n:
            fail("layer_type", f"has {len(self.layer_type)} entries for {n} layers", "give one entry per layer")
        for i, kind in enumerate(self.layer_type):
            if kind not in LAYER_TYPES:
                fail("layer_type", f"entry {i} is {kind!r}", f"use one of {sorted(LAYER_TYPES)}")
        if any(self.layer_type[i] == "h" for i in range(n)) and self.attn_out_dim != self.d_inner:
            fail("v_head_dim", f"hybrid layers need num_attention_heads * v_head_dim == mamba_expand * hidden_size "
                 f"({self.attn_out_dim} != {self.d_inner})",
                 f"set v_head_dim to {self.d_inner // self.num_attention_heads} or -1")
        if self.sliding_window is not None and (type(self.sliding_window) is not int or self.sliding_window <= 0):
            fail("sliding_window", f"must be a positive integer, got {self.sliding_window!r}",
                 "use null for global attention everywhere")
        if len(set(self.global_attn_idx)) != len(self.global_attn_idx):
            fail("global_attn_idx", "names a layer twice", "list each global layer once")
        for i in self.global_attn_idx:
            if not 0 <= i < n:
                fail("global_attn_idx", f"layer {i} is out of range for {n} layers", f"use indices 0..{n - 1}")
        seen: set[int] = set()
        for group in self.groups:
            if len(group) < 2:
                fail("kv_reuse_group", f"group {group} has fewer than 2 layers", "give a producer and its reusers")
            for i in group:
                if not 0 <= i < n:
                    fail("kv_reuse_group", f"layer {i} is out of range for {n} layers", f"use indices 0..{n - 1}")
                if i in seen:
                    fail("kv_reuse_group", f"layer {i} appears twice", "put each layer in at most one group")
                if self.sliding_window is not None and i in self.global_attn_idx:
                    fail("kv_reuse_group", f"layer {i} is a global layer", "group sliding-window layers only")
                if not self.has_attention(i):
                    fail("kv_reuse_group", f"layer {i} has no attention heads", "group attention layers only")
                seen.add(i)
            if group != list(range(group[0], group[0] + len(group))):
                fail("kv_reuse_group", f"group {group} is not a run of consecutive layers",
                     "reusing layers must directly follow their producer")
        if self.rope and self.rope_type not in (None, "default", "ntk"):
            fail("rope_type", f"{self.rope_type!r} is not supported", "use 'default' or 'ntk'")
        if self.rope and self.rope_type == "ntk" and not self.orig_max_position_embeddings:
            fail("orig_max_position_embeddings", "NTK RoPE needs it", "set the pre-training context length")
        unsupported = {"num_experts": (self.num_experts, 1), "kq_norm": (self.kq_norm, "none"),
                       "memory_tokens_interspersed_every": (self.memory_tokens_interspersed_every, 0),
                       "kv_weight_reuse": (self.kv_weight_reuse, False), "num_mamba": (self.num_mamba, 1),
                       "hidden_act": (self.hidden_act, "silu"), "mlp_hidden_act": (self.mlp_hidden_act, "silu")}
        for key, (value, released) in unsupported.items():
            if value != released:
                fail(key, f"{value!r} is not supported (the released models use {released!r})",
                     f"set it to {released!r}")

    # ------------------------------------------------------------------ cache accounting
    def cache_bytes(self, seq_len: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16,
                    ssm_dtype: torch.dtype | None = None) -> int:
        """Bytes of generation state for `batch` sequences of `seq_len` tokens, as `HymbaCache` allocates it.

        Global KV producers hold meta + all tokens; windowed producers meta + a ring of window+1 tokens;
        reusing layers nothing. Every SSM layer holds its state (d_inner x d_state, `ssm_dtype`, float32 in
        our cache) and conv state (d_inner x (d_conv - 1)). With ssm_dtype=dtype this is the paper's count.
        """
        ssm_dtype = ssm_dtype or dtype
        elem, ssm_elem = torch.tensor([], dtype=dtype).element_size(), torch.tensor([], dtype=ssm_dtype).element_size()
        per_entry = self.num_key_value_heads * (self.qk_head_dim + self.value_head_dim) * elem
        total = 0
        for layer in range(self.num_hidden_layers):
            if self.produces_kv(layer):
                window = self.window(layer)
                tokens = seq_len if window is None else min(seq_len, window + 1)
                total += (self.num_memory_tokens + tokens) * per_entry
            if self.has_ssm(layer):
                total += self.d_inner * self.mamba_d_state * ssm_elem + self.d_inner * (self.mamba_d_conv - 1) * elem
        return total * batch

    def num_parameters(self) -> int:
        """Parameter count with a tied embedding counted once."""
        from hymba.model import HymbaForCausalLM

        with torch.device("meta"):
            model = HymbaForCausalLM(self)
        return sum(p.numel() for p in model.parameters())

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        for key in ("auto_map", "transformers_version"):  # bookkeeping the release has; null breaks transformers
            if out[key] is None:
                del out[key]
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HymbaConfig:
        """A config from released keys; other keys are kept in `extra`, with a warning when one looks misspelt."""
        if not isinstance(data, dict):
            raise HymbaError(f"a config is a JSON object of keys and values, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        for key in extra:
            if hint := did_you_mean(key, known):
                warnings.warn(f"config key {key!r} is not one this model reads, kept as is{hint}", stacklevel=2)
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as exc:  # a value of a type the checks in validate() do not reach, e.g. in __post_init__
            raise HymbaError(f"a config value has the wrong type ({exc})") from None

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> HymbaConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise HymbaError(f"no config at {path}; pass a checkpoint directory that holds config.json")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HymbaError(f"{path} is not valid JSON ({exc}); fix or re-download it") from None
        try:
            return cls.from_dict(data)
        except HymbaError as exc:
            raise HymbaError(f"{path}: {exc}") from None

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> HymbaConfig:
        """Named shapes: 'hymba-1.5b' (the release), 'tiny' (tests), 'llama-3.2-3b' (the benchmark baseline)."""
        if name not in PRESETS:
            raise HymbaError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    "hymba-1.5b": {},
    # The release's design at toy size: meta tokens, 3 global layers, groups of 2 and 3, window < meta count.
    "tiny": dict(
        vocab_size=32001, hidden_size=64, intermediate_size=128, num_hidden_layers=7, num_attention_heads=4,
        num_key_value_heads=2, v_head_dim=32, mamba_d_state=8, mamba_dt_rank=8, num_memory_tokens=8,
        sliding_window=6, global_attn_idx=[0, 3, 6], kv_reuse_group=[[1, 2], [4, 5]],
        max_position_embeddings=256, orig_max_position_embeddings=64, seq_length=256, torch_dtype="float32",
    ),
    # Llama-3.2-3B's shape run by our engine: attention-only layers, all global, no meta tokens, no KV sharing.
    "llama-3.2-3b": dict(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, v_head_dim=128, layer_type=["a"] * 28, num_memory_tokens=0, sliding_window=None,
        global_attn_idx=[], kv_reuse_group=None, rope_type="default", rope_theta=500000.0,
        max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
        pad_token_id=None,
    ),
}
