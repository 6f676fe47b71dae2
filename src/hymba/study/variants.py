"""The study's architecture variants: one `ModelShape`, several `HymbaConfig`s of (nearly) equal size.

Every variant is configuration run by the same model code (DESIGN.md, principle 4):

| variant | layers | meta tokens | attention | KV sharing |
|---|---|---|---|---|
| llama | attention only ("a"), Llama-style v head dim | - | full | - |
| mamba | Mamba only ("m") | - | - | - |
| sequential | "a" and "m" layers alternating (Samba/Jamba-style) | - | full | - |
| hymba-base | parallel attention + Mamba heads ("h") | - | full | - |
| hymba | "h" (the released design) | yes | sliding window + global layers | yes |
| hymba-no-meta | "h" | - | sliding window + global layers | yes |
| hymba-full-attn | "h" | yes | full | yes |
| hymba-no-kv-share | "h" | yes | sliding window + global layers | - |

A comparison is only fair at equal size, so each variant's MLP width is solved for so that its non-embedding
parameter count matches hymba-base's at the shape's `intermediate_size` (the embedding is the same in every
variant, so matching without it is the stricter test). Rounding the width to a multiple of 8 leaves the
counts within a fraction of a percent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from hymba.config import HymbaConfig
from hymba.errors import HymbaError

# MLP widths are rounded to this multiple (tensor-core friendly shapes).
WIDTH_MULTIPLE = 8


@dataclass(frozen=True)
class ModelShape:
    """The shape every variant of a study shares; `intermediate_size` is the reference variant's MLP width."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    global_attn_idx: tuple[int, ...]  # the global layers of sliding-window variants (the release: first/middle/last)
    sliding_window: int
    num_memory_tokens: int
    mamba_d_state: int = 16
    mamba_dt_rank: int | str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Variant:
    """One design: which layers (`layers` repeats over depth), and the three Hymba switches."""

    name: str
    description: str
    layers: str  # "a", "m", "h", or a pattern repeated over depth ("am": attention, Mamba, attention, ...)
    meta: bool = False
    sliding_window: bool = False
    kv_sharing: bool = False


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("llama", "attention only (Llama-like)", "a"),
    Variant("mamba", "Mamba only", "m"),
    Variant("sequential", "attention and Mamba layers alternating (Samba/Jamba-style)", "am"),
    Variant("hymba-base", "parallel attention + Mamba heads, full attention", "h"),
    Variant("hymba", "parallel heads + meta tokens + sliding window/global + KV sharing (released design)", "h",
            meta=True, sliding_window=True, kv_sharing=True),
    Variant("hymba-no-meta", "hymba without meta tokens", "h", sliding_window=True, kv_sharing=True),
    Variant("hymba-full-attn", "hymba with full attention in every layer", "h", meta=True, kv_sharing=True),
    Variant("hymba-no-kv-share", "hymba without cross-layer KV sharing", "h", meta=True, sliding_window=True),
]}
REFERENCE = "hymba-base"


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise HymbaError(f"unknown study variant {name!r}; choose from {', '.join(VARIANTS)}")
    return VARIANTS[name]


def kv_groups(num_layers: int, global_layers: tuple[int, ...]) -> list[list[int]]:
    """Runs of consecutive sliding-window layers share K,V in pairs; an odd run starts with a group of three.

    This is the release's layout: [1,2] [3,4] ... [13,14] [16,17,18] [19,20] ... between global layers 0, 15, 31.
    """
    groups: list[list[int]] = []
    run: list[int] = []
    for layer in [*range(num_layers), None]:  # None closes the last run
        if layer is not None and layer not in global_layers:
            run.append(layer)
            continue
        if len(run) >= 2:
            first = 3 if len(run) % 2 else 2
            groups += [run[:first]] + [run[i:i + 2] for i in range(first, len(run), 2)]
        run = []
    return groups


def layer_types(variant: Variant, num_layers: int) -> list[str]:
    return [variant.layers[i % len(variant.layers)] for i in range(num_layers)]


def build_config(variant: Variant, shape: ModelShape, intermediate_size: int, vocab_size: int,
                 max_positions: int) -> HymbaConfig:
    """The variant's config at a given MLP width (see `variant_config` for the size-matched one)."""
    types = layer_types(variant, shape.num_hidden_layers)
    head_dim = shape.hidden_size // shape.num_attention_heads
    globals_ = sorted(set(shape.global_attn_idx))
    return HymbaConfig(
        vocab_size=vocab_size, hidden_size=shape.hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, layer_type=types,
        # Hybrid layers need values as wide as the SSM heads (the release); attention-only layers are Llama's.
        v_head_dim=-1 if "h" in types else head_dim,
        mamba_d_state=shape.mamba_d_state, mamba_dt_rank=shape.mamba_dt_rank,
        num_memory_tokens=shape.num_memory_tokens if variant.meta else 0,
        sliding_window=shape.sliding_window if variant.sliding_window else None,
        global_attn_idx=globals_ if variant.sliding_window else [],
        kv_reuse_group=kv_groups(shape.num_hidden_layers, tuple(globals_)) if variant.kv_sharing else None,
        rope_type="default", orig_max_position_embeddings=None, max_position_embeddings=max_positions,
        seq_length=max_positions, torch_dtype="float32",
    )


def body_parameters(config: HymbaConfig) -> int:
    """Parameters other than the token embedding (and untied LM head): what differs between variants."""
    embedding = config.vocab_size * config.hidden_size
    return config.num_parameters() - embedding * (1 if config.tie_word_embeddings else 2)


def reference_parameters(shape: ModelShape) -> int:
    """The non-embedding parameter count every variant of a study is matched to."""
    return body_parameters(build_config(VARIANTS[REFERENCE], shape, shape.intermediate_size, 1, 1))


def variant_config(name: str, shape: ModelShape, vocab_size: int, max_positions: int) -> HymbaConfig:
    """The variant's config with its MLP width solved so its size matches the reference variant's."""
    variant = get_variant(name)
    target = reference_parameters(shape)
    # The MLP adds exactly 3 * hidden weights per unit of width per layer (gate, up, down), so one probe suffices.
    probe = shape.intermediate_size
    per_unit = 3 * shape.hidden_size * shape.num_hidden_layers
    excess = body_parameters(build_config(variant, shape, probe, 1, 1)) - target
    width = round((probe - excess / per_unit) / WIDTH_MULTIPLE) * WIDTH_MULTIPLE
    if width <= 0:
        raise HymbaError(f"variant {name} is larger than {REFERENCE} even without an MLP at this shape; "
                         "raise the shape's intermediate_size")
    return build_config(variant, shape, width, vocab_size, max_positions)


def describe(config: HymbaConfig) -> dict:
    """The design switches of a config, for tables."""
    if not any(config.has_attention(i) for i in range(config.num_hidden_layers)):
        attention = "none"
    elif config.sliding_window is None:
        attention = "full"
    else:
        attention = f"SWA {config.sliding_window} + global {config.global_attn_idx}"
    return {
        "layers": "".join(config.layer_type),
        "meta_tokens": config.num_memory_tokens,
        "attention": attention,
        "kv_groups": config.kv_reuse_group or [],
        "intermediate_size": config.intermediate_size,
    }
