"""`hymba bench`: prefill and decode throughput of Hymba against a Llama-shaped baseline, on one device.

What one run measures, per model x context x batch (random weights, nothing downloaded):

- prefill tok/s: `context` tokens per row through the model into a fresh cache, after a warm-up of the same
  shapes (FlexAttention is compiled per shape), timed with CUDA events; on out-of-memory the prefill is
  retried in smaller chunks, then with half the batch;
- decode tok/s and ms per step: the step captured as a CUDA graph (`CudaGraphDecoder`) and replayed
  `--steps` times after `--warmup-steps`, feeding back the argmax token, from a cache sized for exactly
  `context` tokens and filled so that the last timed step writes its last slot. The cache is filled
  synthetically by default (random K/V, SSM and conv state; positions, validity and next position set as a
  prefill would set them, see `fill_cache_synthetic`), so decode at batch 128 x 8K needs no prefill that
  might not fit; `--fill prefill` fills it with a real (untimed) prefill instead;
- cache bytes per sequence, allocated (`HymbaCache.nbytes() / batch`) and analytic (`config.cache_bytes`);
- peak GPU memory (reset per phase);
- the fraction of the memory-bandwidth limit each decode step reaches: `decode_bytes_per_step` (weights, K/V
  read, SSM and conv state read + write) over a device-to-device copy's bandwidth measured in the same run.

Models: our engine in the Hymba-1.5B shape and in the Llama-3.2-3B shape (attention-only layers, all global,
no meta tokens, no KV sharing), and, when `transformers` is importable, its `LlamaForCausalLM` in the
Llama-3.2-3B shape (SDPA, DynamicCache, a plain loop of forward calls). Every case halves its batch on
out-of-memory and reports the batch that ran. On CPU (`--device cpu`, the default without CUDA) the same
code runs toy shapes on one thread without CUDA graphs, timed with `time.perf_counter`, so the command is
testable in CI.

Heavy imports (torch, the model, transformers) happen inside functions so that `hymba --help` stays fast.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from hymba import bench_serve, bench_train
from hymba.errors import HymbaError

if TYPE_CHECKING:
    import torch

    from hymba.cache import HymbaCache
    from hymba.config import HymbaConfig

T = TypeVar("T")

# The toy shapes of the CPU mode: the `tiny` preset, and the same widths as a Llama (attention-only, global,
# no meta tokens, no KV sharing; v head dim = q head dim as in Llama).
TINY_LLAMA = dict(layer_type=["a"] * 7, num_memory_tokens=0, sliding_window=None, global_attn_idx=[],
                  kv_reuse_group=None, v_head_dim=16)


@dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model: which engine runs it, its shape, and its role in the ratios."""

    name: str
    engine: str  # "hymba" (our engine) or "transformers"
    preset: str
    overrides: tuple = ()
    role: str = "hymba"  # "hymba", "llama" (our engine, Llama shape) or "transformers"
    scale: str = "full"  # ratios pair models of the same scale

    def config(self) -> HymbaConfig:
        from hymba.config import HymbaConfig

        return HymbaConfig.preset(self.preset, **dict(self.overrides))


_TINY_LLAMA_OVERRIDES = tuple(TINY_LLAMA.items())
MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in [
    ModelSpec("hymba-1.5b", "hymba", "hymba-1.5b", role="hymba"),
    ModelSpec("llama-3.2-3b", "hymba", "llama-3.2-3b", role="llama"),
    ModelSpec("transformers-llama", "transformers", "llama-3.2-3b", role="transformers"),
    ModelSpec("tiny", "hymba", "tiny", role="hymba", scale="tiny"),
    ModelSpec("tiny-llama", "hymba", "tiny", _TINY_LLAMA_OVERRIDES, role="llama", scale="tiny"),
    ModelSpec("transformers-tiny-llama", "transformers", "tiny", _TINY_LLAMA_OVERRIDES, role="transformers",
              scale="tiny"),
]}
GPU_DEFAULTS = dict(models="hymba-1.5b,llama-3.2-3b,transformers-llama", contexts="1024,8192", batches="1,32,128",
                    steps=32, dtype="bfloat16")
CPU_DEFAULTS = dict(models="tiny,tiny-llama,transformers-tiny-llama", contexts="64,128", batches="1,4", steps=8,
                    dtype="float32")
# Prefill chunk sizes tried in order on out-of-memory before the batch is halved (None: the prompt in one piece).
PREFILL_CHUNKS = (None, 2048, 512)
# The paper's figures (one A100, 8K context, batch 128 halved on OOM), printed beside our ratios.
PAPER = "paper (A100, 8K, batch 128 halved on OOM): Hymba-1.5B 664 tok/s vs Llama-3.2-3B 191 tok/s (3.49x); " \
        "cache 79 MB vs 918 MB (11.67x)"


# ---------------------------------------------------------------------------------------------- bytes moved
def decode_bytes_breakdown(config: HymbaConfig, context: int, batch: int, dtype: torch.dtype | None = None,
                           ssm_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Bytes one decode step must move at least, by kind, when each row already holds `context` tokens.

    The step decodes token `context + 1`, so a global layer reads meta + context + 1 keys and a windowed one
    meta + min(context + 1, window + 1): exactly the keys its query may see, whatever buffer holds them. A
    KV-reusing layer reads its producer's entries again (nothing keeps them on chip between layers). Weights
    are read once per step (a tied embedding once, by the LM head; an untied input embedding only for the
    batch's rows). SSM state (float32 by default) and conv state are read and written. Activations, logits
    and the one new K/V entry per layer are left out: at most a few MB.
    """
    import torch

    dtype = dtype or torch.bfloat16
    ssm_dtype = ssm_dtype or torch.float32
    elem = torch.empty(0, dtype=dtype).element_size()
    ssm_elem = torch.empty(0, dtype=ssm_dtype).element_size()
    weights = _num_parameters(config) * elem
    if not config.tie_word_embeddings:
        weights -= (config.vocab_size - batch) * config.hidden_size * elem
    per_entry = config.num_key_value_heads * (config.qk_head_dim + config.value_head_dim) * elem
    out = dict(weights=weights, kv_global=0, kv_window=0, kv_reuse=0, ssm_state=0, conv_state=0)
    for layer in range(config.num_hidden_layers):
        if config.has_attention(layer):
            window = config.window(layer)
            keys = config.num_memory_tokens + (context + 1 if window is None else min(context + 1, window + 1))
            kind = "kv_reuse" if not config.produces_kv(layer) else "kv_global" if window is None else "kv_window"
            out[kind] += keys * per_entry * batch
        if config.has_ssm(layer):
            out["ssm_state"] += 2 * config.d_inner * config.mamba_d_state * ssm_elem * batch
            out["conv_state"] += 2 * config.d_inner * (config.mamba_d_conv - 1) * elem * batch
    return out


_PARAMETERS: dict[str, int] = {}


def _num_parameters(config: HymbaConfig) -> int:
    """`config.num_parameters()` (it builds the model on the meta device), once per distinct config."""
    key = json.dumps(config.to_dict(), sort_keys=True, default=str)
    if key not in _PARAMETERS:
        _PARAMETERS[key] = config.num_parameters()
    return _PARAMETERS[key]


def decode_bytes_per_step(config: HymbaConfig, context: int, batch: int, dtype: torch.dtype | None = None,
                          ssm_dtype: torch.dtype | None = None) -> int:
    """Total of `decode_bytes_breakdown`: divided by the memory bandwidth, the shortest possible step time."""
    return sum(decode_bytes_breakdown(config, context, batch, dtype, ssm_dtype).values())


# ---------------------------------------------------------------------------------------------- device helpers
def _oom_error() -> type[BaseException]:
    import torch

    return getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def is_oom(exc: BaseException | None) -> bool:
    """Out of memory anywhere in the exception chain (a failed CUDA-graph capture re-raises as another error;
    cuBLAS reports its own allocation failures)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc).lower()
        if isinstance(exc, _oom_error()) or "out of memory" in text or "alloc_failed" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_memory(device: torch.device) -> None:
    """Return dropped tensors' memory to the device (on CPU there is nothing to measure, so nothing to do)."""
    import torch

    if device.type == "cuda":
        gc.collect()  # tensors held in reference cycles (exception frames, graphs) only go here
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    import torch

    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@contextmanager
def timed(device: torch.device) -> Iterator[list[float]]:
    """Yields a list that holds the elapsed seconds after the block: CUDA events on a GPU (the work queued in
    the block, not the host's queuing time), `time.perf_counter` on CPU."""
    import torch

    result: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield result
        end.record()
        end.synchronize()
        result.append(start.elapsed_time(end) / 1e3)
    else:
        t0 = time.perf_counter()
        yield result
        result.append(time.perf_counter() - t0)


def run_halving(fn: Callable[[int], T], batch: int, device: torch.device,
                note: Callable[[str], None] | None = None, label: str = "") -> tuple[int | None, T | None]:
    """`fn(batch)`, halving the batch on out-of-memory until it runs: (batch that ran, result), or (None, None)."""
    while batch >= 1:
        try:
            return batch, fn(batch)
        except Exception as exc:  # noqa: BLE001 - anything but OOM is re-raised
            if not is_oom(exc):
                raise
        # Freed outside the except block, once the traceback (and the tensors its frames hold) is gone.
        free_memory(device)
        if note:
            note(f"{label}: out of memory at batch {batch}" + (f", trying {batch // 2}" if batch > 1 else ""))
        batch //= 2
    return None, None


def measure_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 10) -> float:
    """Device memory bandwidth in GB/s (1e9), from a copy of one large buffer into another, counting read + write."""
    import torch

    nbytes = nbytes or (2 * 2**30 if device.type == "cuda" else 64 * 2**20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    with timed(device) as seconds:
        for _ in range(reps):
            dst.copy_(src)
    del src, dst
    free_memory(device)
    return 2 * nbytes * reps / seconds[0] / 1e9


def device_name(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, run on 1 thread)"


# ---------------------------------------------------------------------------------------------- our engine
def build_engine_model(config: HymbaConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A `HymbaForCausalLM` with random weights, allocated once directly on `device` in `dtype`."""
    import torch

    from hymba.model import HymbaForCausalLM

    with torch.device("meta"):
        model = HymbaForCausalLM(config)
    model = model.to(dtype).to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty gives each parameter its own storage, which unties them
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_weights(torch.Generator(device=device).manual_seed(seed))
    return model.eval()


def fill_cache_synthetic(cache: HymbaCache, length: int) -> None:
    """Make `cache` hold `length` tokens per row (no padding) as a prefill would leave it, with random contents.

    Positions and validity of every slot, the next position and `started` are set exactly as `prefill` sets
    them (tests check this against a real prefill); keys, values, SSM and conv state are random. Only the
    timing of what follows is meaningful.
    """
    import torch

    M = cache.config.num_memory_tokens
    for layout in cache.layouts.values():
        device = layout.positions.device
        pos = torch.arange(M + length, device=device)
        if layout.ring is not None:  # a ring keeps the meta tokens and the last `ring` positions
            pos = pos[(pos < M) | (pos >= M + length - layout.ring)]
        slots = layout.slots(pos)
        layout.positions.zero_()
        layout.valid.zero_()
        layout.positions[:, slots] = pos
        layout.valid[:, slots] = True
    for buf in [*cache.keys.values(), *cache.values.values()]:
        buf.normal_()
    for state in cache.ssm.values():
        state.ssm.normal_().mul_(0.1)
        state.conv.normal_()
    cache.next_position.fill_(M + length)
    cache.started = True


def engine_prefill(model, context: int, batch: int, chunk: int | None, device: torch.device) -> dict[str, Any]:
    """Time a prefill of `context` random tokens per row into a fresh cache sized for `context`."""
    import torch

    from hymba.cache import HymbaCache
    from hymba.generate import prefill

    config = model.config
    ids = torch.randint(0, config.vocab_size, (batch, context), device=device)
    # The warm-up must see every shape the timed run sees: compiled FlexAttention is specialised on (batch,
    # queries, keys), and keys = the first chunk's own (with meta tokens), then cache capacity + chunk, so it uses a
    # cache of the same size and covers the first chunk, a continuation chunk and a shorter last chunk.
    warm = context if chunk is None else min(context, 2 * chunk + (context - chunk) % chunk)
    cache = HymbaCache(config, batch, context, device=device, dtype=model.dtype)
    prefill(model, cache, ids[:, :warm], None, chunk)
    del cache
    reset_peak(device)
    cache = HymbaCache(config, batch, context, device=device, dtype=model.dtype)
    with timed(device) as seconds:
        prefill(model, cache, ids, None, chunk)
    return dict(seconds=seconds[0], peak_gib=peak_gib(device), chunk=chunk)


def engine_prefill_any_chunk(model, context: int, batch: int, chunks: tuple, device: torch.device) -> dict[str, Any]:
    """`engine_prefill` with the first chunk size (of `chunks`, largest first) that fits in memory."""
    chunks = tuple(c for c in chunks if c is None or c < context) or (None,)
    for i, chunk in enumerate(chunks):
        try:
            return engine_prefill(model, context, batch, chunk, device)
        except Exception as exc:  # noqa: BLE001 - anything but OOM is re-raised
            if not is_oom(exc) or i == len(chunks) - 1:
                raise
        free_memory(device)
    raise AssertionError("unreachable")


def engine_decode(model, context: int, batch: int, steps: int, warmup: int, fill: str, device: torch.device,
                  cuda_graph: bool = True, compile: bool = False) -> dict[str, Any]:
    """Time `steps` decode steps whose last one fills a cache sized for exactly `context` tokens."""
    import torch

    from hymba.cache import HymbaCache
    from hymba.generate import CudaGraphDecoder, decode_step, prefill

    config = model.config
    start = context - warmup - steps
    reset_peak(device)
    cache = HymbaCache(config, batch, context, device=device, dtype=model.dtype)
    if fill == "synthetic":
        fill_cache_synthetic(cache, start)
    else:
        ids = torch.randint(0, config.vocab_size, (batch, start), device=device)
        prefill(model, cache, ids, None, min(start, 512))  # small chunks: the fill is untimed, memory matters
        del ids
    if device.type == "cuda" and cuda_graph:
        step = CudaGraphDecoder(model, cache, batch, compile=compile)
    else:
        step = lambda tokens: decode_step(model, cache, tokens)  # noqa: E731
    tokens = torch.randint(0, config.vocab_size, (batch,), device=device)
    for _ in range(warmup):
        tokens = step(tokens).argmax(-1)
    with timed(device) as seconds:
        for _ in range(steps):
            tokens = step(tokens).argmax(-1)
    if int(cache.next_position.max()) != config.num_memory_tokens + context:
        raise AssertionError("decode did not end at the cache's last slot")  # one sync, after timing
    return dict(seconds=seconds[0], peak_gib=peak_gib(device), cache_bytes=cache.nbytes() // batch)


# ---------------------------------------------------------------------------------------------- transformers
def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_transformers_llama(config: HymbaConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """transformers' `LlamaForCausalLM` with our Llama-shaped config's widths, random weights, SDPA attention."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if config.layer_type != ["a"] * config.num_hidden_layers or config.num_memory_tokens or config.groups \
            or config.sliding_window is not None or config.qk_head_dim != config.value_head_dim:
        raise HymbaError("transformers' Llama needs a Llama-shaped config (attention-only global layers, no meta "
                         "tokens, no KV sharing, equal q/v head dims)")
    llama_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.qk_head_dim,
        max_position_embeddings=max(config.max_position_embeddings, 131072), rope_theta=config.rope_theta,
        rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_word_embeddings,
        attn_implementation="sdpa")
    llama_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    # Built directly on the device in the dtype: a 3B model initialised on the host would take minutes.
    with torch.device(device), _default_dtype(dtype):
        model = LlamaForCausalLM(llama_config)
    if model.lm_head.weight.dtype != dtype:  # only if this transformers version ignored the default dtype
        model = model.to(dtype)
    return model.eval()


def _dynamic_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers 4.x
        return DynamicCache()


def _dynamic_cache_bytes(cache) -> int:
    if hasattr(cache, "layers"):
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    else:  # transformers 4.x
        tensors = [*cache.key_cache, *cache.value_cache]
    return sum(t.numel() * t.element_size() for t in tensors)


def transformers_prefill(model, context: int, batch: int, device: torch.device) -> dict[str, Any]:
    """Time one forward over `context` random tokens per row with `use_cache=True` (its DynamicCache)."""
    import torch

    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    out = model(ids[:, :min(context, 256)], use_cache=True, logits_to_keep=1)  # warm-up (nothing is compiled)
    del out
    reset_peak(device)
    with timed(device) as seconds:
        out = model(ids, use_cache=True, logits_to_keep=1)
    del out
    return dict(seconds=seconds[0], peak_gib=peak_gib(device), chunk=None)


def transformers_decode(model, context: int, batch: int, steps: int, warmup: int, fill: str,
                        device: torch.device) -> dict[str, Any]:
    """Time `steps` forward calls of one token with `past_key_values`, ending at `context` cached tokens."""
    import torch

    config = model.config
    start = context - warmup - steps
    reset_peak(device)
    cache = _dynamic_cache(model)
    if fill == "synthetic":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (batch, config.num_key_value_heads, start, head_dim)
        for layer in range(config.num_hidden_layers):
            cache.update(torch.randn(shape, device=device, dtype=model.dtype),
                         torch.randn(shape, device=device, dtype=model.dtype), layer)
    else:
        ids = torch.randint(0, config.vocab_size, (batch, start), device=device)
        model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        del ids
    tokens = torch.randint(0, config.vocab_size, (batch,), device=device)

    def step(tokens):
        return model(tokens[:, None], past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)

    for _ in range(warmup):
        tokens = step(tokens)
    with timed(device) as seconds:
        for _ in range(steps):
            tokens = step(tokens)
    if cache.get_seq_length() != context:
        raise AssertionError("transformers decode did not end at `context` cached tokens")
    return dict(seconds=seconds[0], peak_gib=peak_gib(device), cache_bytes=_dynamic_cache_bytes(cache) // batch)


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class Row:
    """One model x context x requested batch. Figures are None where the phase was skipped or never fit."""

    model: str
    engine: str
    context: int
    batch: int  # requested
    prefill_batch: int | None = None  # the batch that ran (halved on out-of-memory)
    prefill_chunk: int | None = None  # tokens per prefill forward; None: the prompt in one piece
    prefill_s: float | None = None
    prefill_tok_s: float | None = None
    prefill_peak_gib: float | None = None
    decode_batch: int | None = None
    decode_steps: int | None = None
    decode_tok_s: float | None = None
    ms_per_step: float | None = None
    decode_context: int | None = None  # mean tokens already cached over the timed steps
    decode_bytes_per_step: int | None = None
    decode_bytes: dict[str, int] = field(default_factory=dict)  # the same, by kind
    min_ms_per_step: float | None = None  # decode_bytes_per_step / measured bandwidth
    bandwidth_fraction: float | None = None  # min_ms_per_step / ms_per_step
    decode_peak_gib: float | None = None
    cache_bytes_per_seq_alloc: int | None = None
    cache_bytes_per_seq_analytic: int | None = None  # config.cache_bytes(context, 1, dtype, ssm float32)
    cuda_graph: bool = False


@dataclass
class BenchOptions:
    models: list[str]
    contexts: list[int]
    batches: list[int]
    steps: int
    warmup_steps: int
    device: torch.device
    dtype: torch.dtype
    fill: str = "synthetic"
    prefill_chunks: tuple = PREFILL_CHUNKS
    prefill: bool = True
    cuda_graph: bool = True
    compile: bool = False
    seed: int = 0


class Bench:
    """Runs the cases model by model (one model in memory at a time) and collects rows and notes."""

    def __init__(self, options: BenchOptions, note: Callable[[str], None] | None = None):
        self.o = options
        self.notes: list[str] = []
        # Notes go to stderr through tqdm, so they do not break the progress bar.
        self._print = note or (lambda text: __import__("tqdm").tqdm.write(text, file=sys.stderr))
        # (model, context, phase, batch) -> result, so a batch halved onto one already measured is not rerun.
        self._memo: dict[tuple, dict[str, Any]] = {}
        self.bandwidth_gb_s: float | None = None

    def note(self, text: str) -> None:
        self.notes.append(text)
        self._print(f"note: {text}")

    def runnable_models(self) -> list[ModelSpec]:
        specs = []
        for name in self.o.models:
            spec = MODELS[name]
            if spec.engine == "transformers" and not transformers_available():
                self.note(f"transformers is not importable: skipping {name} (pip install transformers)")
                continue
            specs.append(spec)
        return specs

    def run(self, on_row: Callable[[list[Row]], None] | None = None) -> list[Row]:
        """Every case; `on_row(rows so far)` after each, so a run cut short keeps what it measured."""
        import torch
        from tqdm import tqdm

        o = self.o
        torch.manual_seed(o.seed)
        if o.device.type == "cuda":
            from hymba.ops.attention import allow_many_recompiles

            allow_many_recompiles()
        threads = torch.get_num_threads()
        if o.device.type == "cpu":
            # The toy shapes are far too small for intra-op threads, and on a shared CI machine waiting at
            # each op's thread barrier costs more than the op (10-30 ms per matmul measured on a busy host).
            torch.set_num_threads(1)
        self.bandwidth_gb_s = measure_bandwidth(o.device)
        specs = self.runnable_models()
        cases = [(spec, c, b) for spec in specs for c in o.contexts for b in o.batches]
        rows: list[Row] = []
        model, loaded = None, None
        bar = tqdm(cases, desc="bench", unit="case", file=sys.stderr, dynamic_ncols=True)
        try:
            with torch.inference_mode():
                for spec, context, batch in bar:
                    bar.set_postfix_str(f"{spec.name} ctx={context} batch={batch}")
                    if loaded != spec.name:
                        model = None
                        free_memory(o.device)
                        model = self._build(spec)
                        loaded = spec.name
                    rows.append(self._case(spec, model, context, batch))
                    self._print(row_summary(rows[-1]))
                    if on_row is not None:
                        on_row(rows)
        finally:
            bar.close()
            model = None
            free_memory(o.device)
            torch.set_num_threads(threads)
        return rows

    def _build(self, spec: ModelSpec):
        config = spec.config()
        if spec.engine == "transformers":
            return build_transformers_llama(config, self.o.device, self.o.dtype, self.o.seed)
        return build_engine_model(config, self.o.device, self.o.dtype, self.o.seed)

    def _measure(self, spec: ModelSpec, context: int, batch: int, phase: str, fn: Callable[[int], dict]):
        label = f"{spec.name} {phase} at context {context}"
        known_oom = [b for (m, c, p, b), r in self._memo.items() if (m, c, p) == (spec.name, context, phase)
                     and r is None]
        while known_oom and batch >= min(known_oom):  # no need to run out of memory again
            batch //= 2

        def attempt(b: int) -> dict:
            key = (spec.name, context, phase, b)
            if key not in self._memo:
                try:
                    self._memo[key] = fn(b)
                except Exception as exc:  # noqa: BLE001 - remembered only when it is OOM, then re-raised
                    if is_oom(exc):
                        self._memo[key] = None
                    raise
            if self._memo[key] is None:
                raise _oom_error()(f"{label}: batch {b} ran out of memory before")
            return self._memo[key]

        ran, result = run_halving(attempt, batch, self.o.device, self.note, label)
        if ran is None:
            self.note(f"{label}: out of memory even at batch 1")
        return ran, result

    def _case(self, spec: ModelSpec, model, context: int, batch: int) -> Row:
        import torch

        o = self.o
        config = spec.config()
        row = Row(model=spec.name, engine=spec.engine, context=context, batch=batch)
        row.cache_bytes_per_seq_analytic = config.cache_bytes(context, 1, o.dtype, ssm_dtype=torch.float32)
        if o.prefill:
            if spec.engine == "transformers":
                fn = lambda b: transformers_prefill(model, context, b, o.device)  # noqa: E731
            else:
                fn = lambda b: engine_prefill_any_chunk(model, context, b, o.prefill_chunks, o.device)  # noqa: E731
            ran, result = self._measure(spec, context, batch, "prefill", fn)
            if ran is not None:
                row.prefill_batch, row.prefill_chunk = ran, result["chunk"]
                row.prefill_s, row.prefill_peak_gib = result["seconds"], result["peak_gib"]
                row.prefill_tok_s = ran * context / result["seconds"]

        if spec.engine == "transformers":
            fn = lambda b: transformers_decode(model, context, b, o.steps, o.warmup_steps, o.fill,  # noqa: E731
                                               o.device)
        else:
            fn = lambda b: engine_decode(model, context, b, o.steps, o.warmup_steps, o.fill, o.device,  # noqa: E731
                                         o.cuda_graph, o.compile)
        ran, result = self._measure(spec, context, batch, "decode", fn)
        if ran is not None:
            step_s = result["seconds"] / o.steps
            row.decode_batch, row.decode_steps = ran, o.steps
            row.ms_per_step, row.decode_tok_s = step_s * 1e3, ran / step_s
            row.decode_peak_gib, row.cache_bytes_per_seq_alloc = result["peak_gib"], result["cache_bytes"]
            row.cuda_graph = spec.engine == "hymba" and o.device.type == "cuda" and o.cuda_graph
            # Mean number of cached tokens over the timed steps (the cache ends full at `context`).
            row.decode_context = context - (o.steps + 1) // 2
            row.decode_bytes = decode_bytes_breakdown(config, row.decode_context, ran, o.dtype, torch.float32)
            row.decode_bytes_per_step = sum(row.decode_bytes.values())
            row.min_ms_per_step = row.decode_bytes_per_step / (self.bandwidth_gb_s * 1e9) * 1e3
            row.bandwidth_fraction = row.min_ms_per_step / row.ms_per_step
        return row


# ---------------------------------------------------------------------------------------------- ratios, table
def _largest_batch_row(rows: list[Row], model: str, context: int, figure: str) -> Row | None:
    batch_key = "decode_batch" if figure == "decode_tok_s" else "prefill_batch"
    ran = [r for r in rows if r.model == model and r.context == context and getattr(r, figure) is not None]
    return max(ran, key=lambda r: (getattr(r, batch_key), getattr(r, figure)), default=None)


def compute_ratios(rows: list[Row]) -> list[dict[str, Any]]:
    """Hymba vs each baseline of the same scale, per context, each at the largest batch that ran for it."""
    import torch

    ratios = []
    models = list(dict.fromkeys(r.model for r in rows))
    for hymba in (m for m in models if MODELS[m].role == "hymba"):
        for base in (m for m in models if MODELS[m].role != "hymba" and MODELS[m].scale == MODELS[hymba].scale):
            for context in sorted({r.context for r in rows}):
                entry: dict[str, Any] = dict(context=context, hymba=hymba, baseline=base)
                for figure in ("decode_tok_s", "prefill_tok_s"):
                    h, b = (_largest_batch_row(rows, m, context, figure) for m in (hymba, base))
                    phase = figure.split("_")[0]
                    entry[f"{phase}_hymba_batch"] = h and getattr(h, f"{phase}_batch")
                    entry[f"{phase}_baseline_batch"] = b and getattr(b, f"{phase}_batch")
                    entry[f"{phase}_hymba_tok_s"] = h and getattr(h, figure)
                    entry[f"{phase}_baseline_tok_s"] = b and getattr(b, figure)
                    entry[f"{phase}_speedup"] = getattr(h, figure) / getattr(b, figure) if h and b else None
                # Cache per sequence as we allocate it (float32 SSM state), and as the paper counts it (all bf16).
                h_config, b_config = MODELS[hymba].config(), MODELS[base].config()
                entry["cache_ratio"] = b_config.cache_bytes(context, ssm_dtype=torch.float32) / \
                    h_config.cache_bytes(context, ssm_dtype=torch.float32)
                entry["cache_ratio_bf16_state"] = b_config.cache_bytes(context) / h_config.cache_bytes(context)
                ratios.append(entry)
    return ratios


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _batch_cell(row: Row) -> str:
    ran = {b for b in (row.prefill_batch, row.decode_batch) if b is not None}
    if ran == {row.batch}:
        return str(row.batch)
    if not ran:
        return f"{row.batch} OOM"
    p = "-" if row.prefill_batch is None else row.prefill_batch
    d = "OOM" if row.decode_batch is None else row.decode_batch
    return f"{row.batch}→{p}/{d}"


TABLE_COLUMNS = ["model", "context", "batch", "prefill tok/s", "decode tok/s", "ms/step", "% of BW limit",
                 "cache MB/seq (alloc / analytic)", "peak GiB"]


def table_cells(rows: list[Row]) -> list[list[str]]:
    cells = []
    for r in rows:
        peaks = [p for p in (r.prefill_peak_gib, r.decode_peak_gib) if p is not None]
        alloc = "-" if r.cache_bytes_per_seq_alloc is None else f"{r.cache_bytes_per_seq_alloc / 1e6:.2f}"
        cells.append([
            r.model, str(r.context), _batch_cell(r), _num(r.prefill_tok_s, ",.0f"), _num(r.decode_tok_s, ",.0f"),
            _num(r.ms_per_step, ".2f"), _num(r.bandwidth_fraction and 100 * r.bandwidth_fraction, ".1f"),
            f"{alloc} / {r.cache_bytes_per_seq_analytic / 1e6:.2f}", _num(max(peaks) if peaks else None, ".1f"),
        ])
    return cells


def format_plain_table(rows: list[Row]) -> str:
    """The table as aligned text (numbers right-aligned), for when rich is not installed."""
    cells = table_cells(rows)
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(TABLE_COLUMNS)]
    lines = ["  ".join(h.ljust(w) if i < 1 else h.rjust(w) for i, (h, w) in enumerate(zip(TABLE_COLUMNS, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for c in cells:
        lines.append("  ".join(v.ljust(w) if i < 1 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))))
    return "\n".join(lines)


def format_ratios(ratios: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in ratios:
        parts = [f"context {r['context']}: {r['hymba']} vs {r['baseline']}:"]
        if r.get("decode_speedup") is not None:
            parts.append(f"decode {r['decode_speedup']:.2f}x ({r['decode_hymba_tok_s']:,.0f} tok/s at batch "
                         f"{r['decode_hymba_batch']} vs {r['decode_baseline_tok_s']:,.0f} at batch "
                         f"{r['decode_baseline_batch']})")
        if r.get("prefill_speedup") is not None:
            parts.append(f"prefill {r['prefill_speedup']:.2f}x")
        if r.get("cache_ratio") is not None:
            parts.append(f"cache per sequence {r['cache_ratio']:.2f}x smaller ({r['cache_ratio_bf16_state']:.2f}x "
                         "with bf16 SSM state, as the paper counts)")
        lines.append(" ".join(parts[:1]) + " " + ", ".join(parts[1:]))
    return lines


def print_report(rows: list[Row], ratios: list[dict[str, Any]], header: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(header)
        print(format_plain_table(rows))
    else:
        table = Table(title=header)
        for i, name in enumerate(TABLE_COLUMNS):
            table.add_column(name, justify="left" if i == 0 else "right")
        for cells in table_cells(rows):
            table.add_row(*cells)
        Console(width=max(160, Console().width)).print(table)
    if any("→" in _batch_cell(r) for r in rows):
        print("batch: requested→ran for prefill/decode where out of memory halved it")
    for line in format_ratios(ratios):
        print(line)
    if any(MODELS[r.model].scale == "full" for r in rows):
        print(PAPER)


# ---------------------------------------------------------------------------------------------- CLI
def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise HymbaError(f"--{what} takes comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise HymbaError(f"--{what} needs positive integers, got {text!r}")
    return values


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """Validate the command line and fill the device-dependent defaults (GPU shapes on CUDA, toy shapes on CPU)."""
    import torch

    from hymba.checkpoint import resolve_dtype

    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise HymbaError(f"--device {args.device} asked for, but PyTorch sees no CUDA device; use --device cpu")
        if device.type not in ("cuda", "cpu"):
            raise HymbaError(f"--device {args.device}: only cuda and cpu are supported")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    models = [m.strip() for m in (args.models or defaults["models"]).split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise HymbaError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    contexts = _int_list(args.contexts or defaults["contexts"], "contexts")
    batches = _int_list(args.batches or defaults["batches"], "batches")
    steps = args.steps or defaults["steps"]
    if steps < 1 or args.warmup_steps < 0:
        raise HymbaError("--steps must be >= 1 and --warmup-steps >= 0")
    too_short = [c for c in contexts if c - steps - args.warmup_steps < 1]
    if too_short:
        raise HymbaError(f"context {too_short[0]} leaves no prompt before {args.warmup_steps} warm-up + {steps} "
                         "timed decode steps; use longer contexts or fewer --steps")
    if args.prefill_chunk == "auto":
        chunks = PREFILL_CHUNKS
    else:
        try:
            chunk = int(args.prefill_chunk)
        except ValueError:
            raise HymbaError(f"--prefill-chunk takes 'auto' or an integer, got {args.prefill_chunk!r}") from None
        chunks = (None if chunk <= 0 else chunk,)
    return BenchOptions(models=models, contexts=contexts, batches=batches, steps=steps,
                        warmup_steps=args.warmup_steps, device=device,
                        dtype=resolve_dtype(args.dtype or defaults["dtype"]), fill=args.fill, prefill_chunks=chunks,
                        prefill=not args.no_prefill, cuda_graph=not args.no_cuda_graph,
                        compile=args.compile, seed=args.seed)


def bench_report(rows: list[Row], bench: Bench) -> dict[str, Any]:
    """Everything the run measured, as the JSON that `--json` writes."""
    import torch

    import hymba.ops

    o = bench.o
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    return dict(
        device=device_name(o.device), device_type=o.device.type, torch_version=torch.__version__,
        transformers_version=transformers_version, dtype=str(o.dtype).removeprefix("torch."), fill=o.fill,
        steps=o.steps, warmup_steps=o.warmup_steps, cuda_graph=o.cuda_graph and o.device.type == "cuda",
        pdl=hymba.ops.PDL and o.device.type == "cuda",
        bandwidth_gb_s=bench.bandwidth_gb_s, notes=bench.notes, rows=[asdict(r) for r in rows],
        ratios=compute_ratios(rows),
    )


def row_summary(row: Row) -> str:
    """One line per finished case, printed as the run goes (the table comes at the end)."""
    return (f"{row.model} ctx={row.context} batch={row.batch}: prefill {_num(row.prefill_tok_s, ',.0f')} tok/s, "
            f"decode {_num(row.decode_tok_s, ',.0f')} tok/s ({_num(row.ms_per_step, '.2f')} ms/step)")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def run_bench(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    bench = Bench(options)
    # With --json, the file is rewritten after every case: a long run that is stopped keeps its finished rows.
    save = (lambda rows: write_json_atomic(Path(args.json), bench_report(rows, bench))) if args.json else None
    rows = bench.run(save)
    report = bench_report(rows, bench)
    header = (f"hymba bench on {report['device']}, torch {report['torch_version']}, {report['dtype']}, "
              f"copy bandwidth {report['bandwidth_gb_s']:,.0f} GB/s, decode: {options.steps} steps"
              f"{' (CUDA graph' + (', PDL' if report['pdl'] else '') + ')' if report['cuda_graph'] else ''} from a "
              f"{options.fill} cache")
    print_report(rows, report["ratios"], header)
    if args.json:
        write_json_atomic(Path(args.json), report)
        print(f"wrote {args.json}")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="prefill/decode throughput of Hymba vs a Llama-shaped baseline (random weights)",
        description="Measure prefill and decode throughput, cache size and peak memory of Hymba-1.5B against "
                    "Llama-3.2-3B's shape (in our engine and, if installed, in transformers), with random weights, "
                    "halving the batch on out-of-memory. Without CUDA it runs toy shapes on the CPU.")
    parser.add_argument("--models", help="comma-separated, from: " + ", ".join(MODELS)
                        + f" (default on GPU: {GPU_DEFAULTS['models']}; on CPU: {CPU_DEFAULTS['models']})")
    parser.add_argument("--contexts", help="tokens per row (default 1024,8192 on GPU, 64,128 on CPU)")
    parser.add_argument("--batches", help="rows, each halved on out-of-memory (default 1,32,128 on GPU, 1,4 on CPU)")
    parser.add_argument("--steps", type=int, help="timed decode steps (default 32 on GPU, 8 on CPU)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="decode steps before timing (default 3)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="weights and K/V dtype (default bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--fill", choices=["synthetic", "prefill"], default="synthetic",
                        help="how the decode cache is filled to the context: random K/V and state written "
                             "directly (default), or a real untimed prefill")
    parser.add_argument("--prefill-chunk", default="auto",
                        help="tokens per prefill forward; 'auto' tries one piece, then 2048, then 512 on "
                             "out-of-memory before halving the batch; 0 = one piece")
    parser.add_argument("--no-prefill", action="store_true", help="measure decode only")
    parser.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA too (for comparison)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step before capturing it (fuses small kernels; slow to start)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens")
    parser.add_argument("--json", metavar="PATH", help="write rows, ratios, device and versions as JSON")
    parser.set_defaults(func=run_bench)
    # Other benchmarks are subcommands (`hymba bench serve`, `hymba bench train`); without one, `hymba bench`
    # measures inference.
    benchmarks = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    bench_serve.add_parser(benchmarks)
    bench_train.add_parser(benchmarks)
