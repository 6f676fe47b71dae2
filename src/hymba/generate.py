"""Cached, batched generation as small pure functions: `prefill`, `decode_step`, `sample`, then `generate`.

Prompts of different lengths are left-padded into one batch. Padding never reaches attention, the SSM or the
conv state (see `HymbaModel._prepend_meta`), so every row decodes exactly as it would alone. Rows that hit an
EOS id or a stop string stop growing (they are padded) while the others go on.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import torch

import hymba.ops
from hymba.cache import HymbaCache
from hymba.errors import HymbaError
from hymba.ops import device_tensor, to_device

# Steps between checks of whether every row has finished (each check waits for the GPU).
SYNC_EVERY = 16


@dataclass
class SamplingParams:
    """How the next token is chosen. Greedy unless `do_sample`."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            if not _is_number(getattr(self, name)):
                raise HymbaError(f"{name} must be a number, got {getattr(self, name)!r}")
        # Each check is written so that NaN, which fails every comparison, fails it too.
        if not 0 <= self.temperature < math.inf:
            raise HymbaError(f"temperature must be >= 0 and finite (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise HymbaError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise HymbaError(f"min_p must be in [0, 1), got {self.min_p}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise HymbaError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0 < self.repetition_penalty < math.inf:
            raise HymbaError(f"repetition_penalty must be > 0 and finite, got {self.repetition_penalty}")
        if self.temperature == 0:
            self.do_sample = False


def _is_int(value) -> bool:
    """An integer (Python or NumPy), but not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A real number (Python or NumPy), but not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool)


def check_seed(seed) -> None:
    """A seed is None or an integer that torch.Generator.manual_seed takes."""
    if seed is not None and (not _is_int(seed) or not -2**63 <= seed < 2**64):
        raise HymbaError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")


def _is_integer_tensor(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.is_complex() or t.dtype == torch.bool)


def seen_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """(b, vocab) bool: which tokens each row's prompt holds. Padding does not count, so a padded row
    penalises exactly what it would alone."""
    real = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    counts = torch.zeros(input_ids.shape[0], vocab_size, dtype=torch.long, device=input_ids.device)
    return counts.scatter_add_(1, input_ids, real) > 0


@dataclass
class RowSampling:
    """Per-row sampling settings as tensors (b,), so one set of ops samples a batch whose rows ask for different
    things: `temperature` 0 is greedy, `top_k` 0, `top_p` 1, `min_p` 0 and `repetition_penalty` 1 are off. The
    host-side flags say which filters any row uses, so a batch that uses none skips them without reading the GPU."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    any_sample: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    any_penalty: bool

    @classmethod
    def of(cls, params: Sequence[SamplingParams], device=None) -> RowSampling:
        def column(values, dtype):
            return device_tensor(values, dtype, device)

        return cls(column([p.temperature if p.do_sample else 0.0 for p in params], torch.float32),
                   column([p.top_k for p in params], torch.long), column([p.top_p for p in params], torch.float32),
                   column([p.min_p for p in params], torch.float32),
                   column([p.repetition_penalty for p in params], torch.float32),
                   any_sample=any(p.do_sample for p in params),
                   any_top_k=any(p.do_sample and p.top_k > 0 for p in params),
                   any_top_p=any(p.do_sample and p.top_p < 1 for p in params),
                   any_min_p=any(p.do_sample and p.min_p > 0 for p in params),
                   any_penalty=any(p.repetition_penalty != 1 for p in params))


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (multiplications wrap; right shifts made logical by masking)."""
    def shift(v, k):
        return (v >> k) & ((1 << (64 - k)) - 1)

    x = x ^ shift(x, 30)
    x = x * -4658895280553007687  # 0xBF58476D1CE4E5B9 as a signed int64
    x = x ^ shift(x, 27)
    x = x * -7723592293110705685  # 0x94D049BB133111EB
    return x ^ shift(x, 31)


def sampling_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exponential(1) noise (b, vocab), a pure function of each row's seed and counter (the index of the token being
    sampled): a row draws the same noise whatever else is in the batch and whichever slot it sits in, so a seeded
    request samples the same tokens alone, in a batch, offline or served."""
    key = _mix64(seeds * -7046029254386353131 + counters)  # 0x9E3779B97F4A7C15, the golden-ratio increment
    bits = _mix64(key[:, None] + torch.arange(vocab, device=seeds.device) * -3372029247567499371)
    uniform = (((bits >> 40) & ((1 << 24) - 1)).float() + 0.5) * 2.0 ** -24  # in (0, 1)
    return -torch.log(uniform)


def sample(logits: torch.Tensor, rows: RowSampling, seeds: torch.Tensor, counters: torch.Tensor,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (b,) from last-position logits (b, vocab), each row with its own settings, without a host sync.

    In order, as transformers applies them: repetition penalty (over `seen` (b, vocab) bool), temperature, top-k,
    softmax, min-p, top-p. A sampled row takes argmax(probs / E) with E ~ Exponential(1) from `sampling_noise`,
    which draws exactly from `probs`; greedy rows take the argmax of the penalised logits.
    """
    logits = logits.float()
    if rows.any_penalty and seen is not None:
        penalty = rows.repetition_penalty[:, None]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    greedy = logits.argmax(dim=-1)
    if not rows.any_sample:
        return greedy
    sampled = rows.temperature > 0
    logits = logits / torch.where(sampled, rows.temperature, 1.0)[:, None]
    vocab = logits.shape[-1]
    if rows.any_top_k or rows.any_top_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
    if rows.any_top_k:
        k = torch.where(rows.top_k > 0, rows.top_k.clamp(max=vocab), vocab)
        kth = sorted_logits.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if rows.any_min_p:
        probs = probs.masked_fill(probs < rows.min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
    if rows.any_top_p:
        # The logits' order is the probabilities' order (filters only zero the tail), so one sort serves both.
        sorted_probs = probs.gather(1, order)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop = mass_before >= rows.top_p[:, None] * sorted_probs.sum(-1, keepdim=True)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs.masked_fill(drop, 0.0))
    chosen = (probs / sampling_noise(seeds, counters, vocab)).argmax(dim=-1)
    return torch.where(sampled, chosen, greedy)


def seed_as_int64(seed: int) -> int:
    """A seed in [-2**63, 2**64) as the int64 with the same low 64 bits (what `sampling_noise` computes with)."""
    return (seed + 2 ** 63) % 2 ** 64 - 2 ** 63


def random_seed() -> int:
    """A seed for a request that names none, from torch's global generator (so `torch.manual_seed` fixes it)."""
    return int(torch.randint(0, 2 ** 62, (1,)))


def pad_token_id(config) -> int:
    """The id that fills padding and finished rows (0 when the config names none)."""
    return config.pad_token_id if config.pad_token_id is not None else 0


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (b, max_len), with every row right-aligned."""
    rows = []
    for i, seq in enumerate(sequences):
        try:
            row = torch.as_tensor(list(seq))
        except (TypeError, ValueError, RuntimeError):
            row = None
        if row is not None and row.shape == (0,):
            raise HymbaError(f"prompt {i} is empty; every prompt needs at least one token")
        # Without this check float ids would be truncated to integers and bools read as ids 0 and 1.
        if row is None or row.dim() != 1 or not _is_integer_tensor(row):
            raise HymbaError(f"prompt {i} is not a list of integer token ids: {str(seq)[:60]}")
        rows.append(row)
    if not rows:
        raise HymbaError("no prompts given; pass at least one")
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return to_device(ids, device), to_device(mask, device)


def prefill(model, cache: HymbaCache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            chunk: int | None = None) -> torch.Tensor:
    """Run the prompt through the model into `cache`; returns last-position logits (b, vocab).

    With `chunk`, the prompt goes in pieces of `chunk` tokens (the first piece also takes all left padding,
    since padding may only precede a row's first meta token); the logits are the same as in one piece.
    """
    width = input_ids.shape[1]
    first = width
    if chunk is not None and attention_mask is not None:
        most_padding = int((attention_mask.long().cumsum(-1) == 0).sum(-1).max())
        first = min(width, most_padding + chunk)
    elif chunk is not None:
        first = min(width, chunk)
    mask = attention_mask
    logits = model(input_ids[:, :first], None if mask is None else mask[:, :first], cache=cache,
                   logits_to_keep=1).logits
    for start in range(first, width, chunk or width):
        logits = model(input_ids[:, start:start + chunk], cache=cache, logits_to_keep=1).logits
    return logits[:, -1]


def decode_step(model, cache: HymbaCache, tokens: torch.Tensor) -> torch.Tensor:
    """One token per row (b,) through the model, updating the cache in place; returns logits (b, vocab)."""
    return model(tokens[:, None], cache=cache).logits[:, -1]


class CudaGraphDecoder:
    """`decode_step` captured once as a CUDA graph for `batch` rows of `cache` and replayed for every token.

    Warming up runs the step on the live cache. `cache.step_state()` is restored after each run, so every run
    writes the K/V slot of the same next position, which the first real step rewrites, and evicts from a ring only
    the entry that step evicts anyway. (Several runs without restoring would leave later slots visible and evict
    ring entries still inside the window.) Recording the graph runs nothing.
    """

    def __init__(self, model, cache: HymbaCache, batch: int, compile: bool = False):
        self.tokens = torch.zeros(batch, dtype=torch.long, device=model.device)
        # torch.compile fuses the step's many small elementwise kernels (norms, RoPE, masks) before capture.
        step = compiled_decode_step() if compile else decode_step
        saved = [t.clone() for t in cache.step_state()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3 if compile else 2):
                step(model, cache, self.tokens)
                for live, copy in zip(cache.step_state(), saved):
                    live.copy_(copy)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(model, cache, self.tokens)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (len(tokens), vocab) for the first len(tokens) rows; rows past them compute what they held."""
        self.tokens[:len(tokens)].copy_(tokens)
        self.graph.replay()
        return self.logits[:len(tokens)]


_COMPILED_STEP = None


def compiled_decode_step():
    """`decode_step` under `torch.compile` (whole graph, static shapes: one compilation per batch bucket and cache
    size), shared by every runner so a shape compiled once in a process is never compiled again. Inductor keeps what
    it compiled on disk (TORCHINDUCTOR_CACHE_DIR, by default under the system's temporary directory), so a later
    process takes seconds where the first took about a minute."""
    global _COMPILED_STEP
    if _COMPILED_STEP is None:
        from hymba.ops.attention import allow_many_recompiles

        allow_many_recompiles()
        _COMPILED_STEP = torch.compile(decode_step, dynamic=False, fullgraph=True, options=inductor_options())
    return _COMPILED_STEP


def inductor_options() -> dict:
    """The compiled step's inductor options: its Triton kernels launched as programmatic dependents, like the step's
    own kernels (`hymba.ops.launch`), where this PyTorch can (`triton.enable_pdl`; it emits them only for sm_90+)."""
    import torch._inductor.config

    return {"triton.enable_pdl": True} if hymba.ops.PDL and hasattr(torch._inductor.config.triton, "enable_pdl") else {}


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes a decode step is captured for: powers of two below `max_batch`, and `max_batch`."""
    return sorted({1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch} | {max_batch})


class DecodeRunner:
    """A cache of `max_batch` rows x `max_len` tokens and the decode step over its first rows: what `generate` and the
    serving engine both decode with.

    On CUDA (unless `cuda_graph=False`) the step is captured as a CUDA graph for each of a few batch buckets, over
    the cache's first rows, and a step of n rows replays the smallest bucket that holds them, so a half-empty batch
    runs a half-size step. With `compile` (the default with graphs) the step is `torch.compile`d before capture.
    Buckets are captured when first used, or all at once by `capture()` (the engine does so at start-up); `progress`
    gets a line before each capture. Elsewhere the step runs eagerly over exactly the rows asked for.

    Rows marked `idle` (no sequence of the caller's) still compute inside a bucket: each step holds them at position
    0, so they write one key only they can see and never run past their buffer.
    """

    def __init__(self, model, max_batch: int, max_len: int, cuda_graph: bool | None = None,
                 compile: bool | None = None, buckets: Sequence[int] | None = None,
                 progress: Callable[[str], None] | None = None):
        self.model, self.max_batch, self.max_len = model, max_batch, max_len
        device = model.device
        self.cache = HymbaCache(model.config, max_batch, max_len, device=device, dtype=model.dtype)
        self.cache.started = True  # its rows only ever decode; prefills go through fresh views (`begin`)
        self.graphed = device.type == "cuda" and cuda_graph is not False
        self.compile = self.graphed and compile is not False
        self.buckets = sorted(set(buckets or batch_buckets(max_batch))) if self.graphed else []
        if self.buckets and (self.buckets[0] < 1 or self.buckets[-1] != max_batch):
            raise HymbaError(f"decode buckets must be positive and end at max_batch ({max_batch}), got {self.buckets}")
        self.idle = torch.ones(max_batch, dtype=torch.bool, device=device)
        self.progress = progress
        self._graphs: dict[int, CudaGraphDecoder] = {}
        self._views: dict[int, HymbaCache] = {}

    def view(self, n: int) -> HymbaCache:
        if n not in self._views:
            self._views[n] = self.cache.rows(n)
            self._views[n].started = True
        return self._views[n]

    def bucket(self, n: int) -> int:
        """The rows a step of `n` rows computes."""
        if not self.graphed:
            return n
        return next(b for b in self.buckets if b >= n)

    def capture(self, sizes: Sequence[int] | None = None) -> None:
        """Capture (and compile) the step for `sizes` (default: every bucket) now rather than when first used."""
        for size in sizes or self.buckets:
            self._graph(size)

    def _graph(self, bucket: int) -> CudaGraphDecoder:
        if bucket not in self._graphs:
            if self.progress is not None:
                what = "compiling and capturing" if self.compile else "capturing"
                self.progress(f"{what} the decode step for {bucket} row{'s' * (bucket > 1)}")
            with torch.inference_mode():
                self._graphs[bucket] = CudaGraphDecoder(self.model, self.view(bucket), bucket, self.compile)
        return self._graphs[bucket]

    def begin(self, batch: int) -> HymbaCache:
        """Empty the first `batch` rows for new sequences (all other rows idle) and return a fresh view of them for
        the prefill; decoding then continues in place through `step`."""
        rows = torch.arange(batch, device=self.cache.next_position.device)
        self.cache.reset_rows(rows)
        self.idle.fill_(True)
        self.idle[:batch] = False
        fresh = self.cache.rows(batch)
        fresh.started = False
        return fresh

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token for each of the first len(tokens) rows; returns their logits (len(tokens), vocab)."""
        n = tokens.shape[0]
        self.cache.next_position.masked_fill_(self.idle, 0)
        if not self.graphed:
            return decode_step(self.model, self.view(n), tokens)
        return self._graph(self.bucket(n))(tokens)


class PrefillGraphs:
    """A first prefill forward into a fresh cache, captured as CUDA graphs over the first rows of `cache`, one graph per
    (rows, width) bucket of `rows` x `widths` prompt tokens, for the small groups whose forward is launch-bound: on an
    H200 the 1.5B shape's forward of one 512-token prompt costs about 70 ms of host time for 16 ms of device time,
    and a replay costs its device time.

    A call with k prompts of width w runs the smallest bucket that holds both: the prompts left-padded to the
    bucket's width, the rows past k all padding (they fill rows of `cache` the caller gives no one). Padding changes
    no row's result, so this equals the forward on the prompts as they are (tests/test_generate.py). The caller
    empties the rows first (`HymbaCache.reset_rows`). All graphs share one memory pool: replays follow each other on
    one stream and each keeps its own output. Without graphs (a CPU, `cuda_graph=False`) the same padded forward
    runs eagerly, the reference the tests compare.

    Each forward is captured as `segments` graphs of consecutive layers, replayed in order (the order they were
    captured in, which a shared pool needs), with the call's `between` run between them: the serving engine launches
    a decode step there, so its running requests wait for part of a prefill instead of all of it.
    """

    def __init__(self, model, cache: HymbaCache, rows: Sequence[int] = (1, 2, 4, 8),
                 widths: Sequence[int] = (128, 256, 512, 1024), cuda_graph: bool | None = None,
                 progress: Callable[[str], None] | None = None, segments: int = 1):
        self.model, self.cache, self.progress = model, cache, progress
        layers = model.config.num_hidden_layers
        segments = max(1, min(segments, layers))
        # The layer counts after which a segment ends (the last segment ends with the forward).
        self.cuts = frozenset(layers * k // segments for k in range(1, segments))
        self.graphed = model.device.type == "cuda" and cuda_graph is not False
        # A fresh forward's width (meta tokens and padding included) must fit a global layer's buffer.
        room = min((layout.capacity for layout in cache.layouts.values() if layout.ring is None), default=math.inf)
        self.rows = sorted(r for r in set(rows) if r <= cache.batch)
        self.widths = sorted(w for w in set(widths) if model.config.num_memory_tokens + w <= room)
        self.pad_id = pad_token_id(model.config)
        self._buckets: dict[tuple[int, int], tuple] = {}  # (rows, width) -> (ids, mask, graph or None, logits)
        self._pool = torch.cuda.graph_pool_handle() if self.graphed else None

    def bucket(self, rows: int, width: int) -> tuple[int, int] | None:
        """The (rows, width) bucket a forward of `rows` prompts `width` tokens wide runs in, None if none holds it."""
        r = next((b for b in self.rows if b >= rows), None)
        w = next((b for b in self.widths if b >= width), None)
        return None if r is None or w is None else (r, w)

    def capture(self) -> None:
        """Capture every bucket now (at start-up) rather than when first used."""
        for r in self.rows:
            for w in self.widths:
                self._get((r, w))

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 between: Callable[[], None] | None = None) -> torch.Tensor | None:
        """Last-position logits (k, vocab) of k left-padded prompts (k, w) prefilled into the cache's first k rows,
        or None when no bucket holds them (the caller runs the forward itself). `between` runs between segments."""
        k, w = input_ids.shape
        bucket = self.bucket(k, w)
        if bucket is None:
            return None
        ids, mask, graphs, logits = self._get(bucket)
        ids.fill_(self.pad_id)
        mask.zero_()
        ids[:k, bucket[1] - w:].copy_(input_ids)
        mask[:k, bucket[1] - w:].copy_(attention_mask)
        if graphs is None:
            logits = self._forward(bucket[0], ids, mask, self._at_cuts(between))
        else:
            for i, graph in enumerate(graphs):
                if i and between is not None:
                    between()
                graph.replay()
        return logits[:k]

    def _at_cuts(self, fn: Callable[[], None] | None) -> Callable[[], None] | None:
        """A `between_layers` callback that calls `fn` after the layers where a segment ends."""
        if fn is None:
            return None
        done = itertools.count(1)

        def after_layer() -> None:
            if next(done) in self.cuts:
                fn()

        return after_layer

    def _forward(self, rows: int, ids: torch.Tensor, mask: torch.Tensor,
                 between_layers: Callable[[], None] | None = None) -> torch.Tensor:
        view = self.cache.rows(rows)
        view.started = False
        return self.model(ids, mask, cache=view, logits_to_keep=1, between_layers=between_layers).logits[:, -1]

    def _get(self, bucket: tuple[int, int]) -> tuple:
        if bucket not in self._buckets:
            rows, width = bucket
            device = self.model.device
            ids = torch.full((rows, width), self.pad_id, dtype=torch.long, device=device)
            mask = torch.ones((rows, width), dtype=torch.long, device=device)
            mask[:, 0] = 0  # the warm-up compiles what the captured forward runs: the padded path
            graphs = logits = None
            if self.graphed:
                if self.progress is not None:
                    self.progress(f"capturing the prefill of {rows} prompt{'s' * (rows > 1)} of up to {width} tokens")
                with torch.inference_mode():
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):  # compiles what it needs and settles the allocator
                        for _ in range(2):
                            self._forward(rows, ids, mask)
                    torch.cuda.current_stream().wait_stream(side)
                    graphs = [torch.cuda.CUDAGraph() for _ in range(len(self.cuts) + 1)]
                    capturing = 0

                    def cut() -> None:  # tensors made in one segment and read in a later one stay in the pool
                        nonlocal capturing
                        graphs[capturing].capture_end()
                        capturing += 1
                        graphs[capturing].capture_begin(pool=self._pool)

                    torch.cuda.synchronize()
                    with torch.cuda.stream(side):
                        graphs[0].capture_begin(pool=self._pool)
                        logits = self._forward(rows, ids, mask, self._at_cuts(cut))
                        graphs[-1].capture_end()
                    torch.cuda.current_stream().wait_stream(side)
            self._buckets[bucket] = (ids, mask, graphs, logits)
        return self._buckets[bucket]


def _parameters_key(model) -> tuple:
    # Captured graphs read the parameters' memory: a model whose parameters moved or changed (`.to()`, an adapter
    # wrapped in) needs new graphs.
    return (model.dtype, tuple(p.data_ptr() for p in model.parameters()))


def decode_runner(model, batch: int, max_len: int, cuda_graph: bool | None = None,
                  compile: bool | None = None) -> DecodeRunner:
    """The runner `generate` decodes with. On CUDA with graphs it is kept on the model and reused by later calls
    (its graphs are captured and compiled once) while it holds the batch and its cache size fits the request: sizes
    are rounded up to powers of two, so a few runners serve every call. Elsewhere a fresh one per call."""
    if model.device.type != "cuda" or cuda_graph is False:
        return DecodeRunner(model, batch, max_len, cuda_graph=False)
    limit = model.config.max_position_embeddings - model.config.num_memory_tokens
    max_len = min(max(256, 1 << (max_len - 1).bit_length()), max(limit, max_len))
    batch = 1 << (batch - 1).bit_length()
    key = (max_len, compile is not False, _parameters_key(model))
    runner = model.__dict__.get("_hymba_decode_runner")
    if runner is None or runner.key != key or runner.max_batch < batch:
        model.__dict__.pop("_hymba_decode_runner", None)  # free its cache and graphs before allocating new ones
        runner = DecodeRunner(model, batch, max_len, compile=compile, progress=_log_progress)
        runner.key = key
        model.__dict__["_hymba_decode_runner"] = runner
    return runner


def _log_progress(line: str) -> None:
    import logging

    logging.getLogger("hymba").info(line)


def _eos_ids(model, eos_token_id) -> list[int]:
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
        side = getattr(model, "checkpoint_dir", None)
        if side is not None and (side / "generation_config.json").is_file():
            import json

            eos_token_id = json.loads((side / "generation_config.json").read_text()).get("eos_token_id", eos_token_id)
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def generate_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                    params: SamplingParams, seed: int | None = None, eos_token_id=None, prefill_chunk=None,
                    stop: Callable[[int, torch.Tensor], bool] | None = None,
                    cuda_graph: bool | None = None, compile: bool | None = None) -> Iterator[torch.Tensor]:
    """Yields the next token of every row (b,) per step; finished rows yield the pad id.

    `stop(row, new_tokens)` may end a row early (stop strings); EOS ids end it after being emitted. Row i samples
    with seed `seed + i` (a random seed when None). On CUDA the decode step is compiled and captured as CUDA graphs
    kept for later calls (`decode_runner`; `cuda_graph=False` or `compile=False` turn either off), and whether every
    row has finished is read back only every few steps, so the GPU never waits on the host between tokens.
    """
    config = model.config
    batch, width = input_ids.shape
    max_len = width + max_new_tokens
    if config.max_position_embeddings and max_len + config.num_memory_tokens > config.max_position_embeddings:
        raise HymbaError(f"prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) + "
                         f"{config.num_memory_tokens} meta tokens exceed the model's "
                         f"{config.max_position_embeddings} positions; shorten the prompt or max_new_tokens")
    device = model.device
    first_seed = random_seed() if seed is None else seed
    seeds = torch.tensor([seed_as_int64(first_seed + row) for row in range(batch)], device=device)
    counters = torch.zeros(batch, dtype=torch.long, device=device)  # tokens sampled so far, per row
    rows = RowSampling.of([params] * batch, device)
    pad_id = pad_token_id(config)
    eos = torch.tensor(_eos_ids(model, eos_token_id), dtype=torch.long, device=device)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = seen_tokens(input_ids, attention_mask, config.vocab_size)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)  # filled step by step

    runner = decode_runner(model, batch, max_len, cuda_graph, compile)
    logits = prefill(model, runner.begin(batch), input_ids, attention_mask, prefill_chunk)
    for step in range(max_new_tokens):
        token = sample(logits, rows, seeds, counters, seen).masked_fill(finished, pad_id)
        counters += 1
        yield token
        new_tokens[:, step] = token
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        finished |= torch.isin(token, eos)
        if stop is not None:
            for row in range(batch):
                if not finished[row] and stop(row, new_tokens[row, :step + 1]):
                    finished[row] = True
        if step == max_new_tokens - 1 or ((stop is not None or step % SYNC_EVERY == 0) and bool(finished.all())):
            return
        logits = runner.step(token)


def _as_batch(model, inputs, attention_mask, tokenizer):
    """Accept a tensor (+ left-padding mask), token-id lists, or strings (with a tokenizer); check the ids."""
    if isinstance(inputs, torch.Tensor):
        ids, mask = _checked_tensor(inputs, attention_mask)
    else:
        if attention_mask is not None:
            raise HymbaError("attention_mask goes with a tensor of input ids; lists of prompts are left-padded here")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, Sequence) or not inputs:
            raise HymbaError(f"inputs must be a tensor, a list of token-id lists or a list of strings, got "
                             f"{type(inputs).__name__ if inputs is not None else None}")
        if all(_is_int(t) for t in inputs):  # one prompt's ids, as a 1-D tensor is
            inputs = [inputs]
        if any(isinstance(p, str) for p in inputs):
            if not all(isinstance(p, str) for p in inputs):
                raise HymbaError("inputs mix strings and token ids; pass one kind")
            if tokenizer is None:
                raise HymbaError("text prompts need a tokenizer; pass tokenizer=HymbaTokenizer.from_pretrained(...)")
            inputs = tokenizer.encode_batch(list(inputs))
        ids, mask = left_pad(inputs, pad_token_id(model.config), model.device)
    vocab = model.config.vocab_size
    bad = ids[(ids < 0) | (ids >= vocab)]
    if bad.numel():
        raise HymbaError(f"token id {int(bad[0])} is outside this model's vocabulary of {vocab} (0..{vocab - 1}); "
                         "the tokenizer does not match the checkpoint")
    return ids.to(model.device), None if mask is None else mask.to(model.device)


def _checked_tensor(inputs: torch.Tensor, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids, mask) of a (L,) or (b, L) id tensor, whose mask must be left padding (generate's contract)."""
    if not _is_integer_tensor(inputs):
        raise HymbaError(f"input ids must be an integer tensor, got {inputs.dtype}")
    if inputs.dim() not in (1, 2) or inputs.shape[-1] == 0:
        raise HymbaError(f"input ids must be (length,) or (batch, length) with length >= 1, got {tuple(inputs.shape)}")
    ids = inputs if inputs.dim() == 2 else inputs[None]
    if attention_mask is None:
        return ids, None
    if not isinstance(attention_mask, torch.Tensor):
        raise HymbaError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
    mask = attention_mask if attention_mask.dim() == 2 else attention_mask[None]
    if mask.shape != ids.shape:
        raise HymbaError(f"attention_mask is {tuple(attention_mask.shape)} but the input ids are {tuple(inputs.shape)}")
    if not ((mask == 0) | (mask == 1)).all():
        raise HymbaError("attention_mask may hold only 0 (padding) and 1 (token)")
    mask = mask.long()
    # Left padding: in every row the 0s come first and the last position is a token. Other masks (right padding,
    # holes) would be read as left padding and silently change the text.
    if (mask.diff(dim=1) < 0).any() or not mask[:, -1].all():
        raise HymbaError("attention_mask must be left padding (each row's 0s before its 1s, ending in a 1); "
                         "left-pad the prompts (hymba.generate.left_pad) or pass lists of token ids")
    return ids, mask


@torch.inference_mode()
def generate(model, inputs=None, attention_mask: torch.Tensor | None = None, *, input_ids=None,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
             eos_token_id: int | list[int] | None = None, stop_strings: Sequence[str] | None = None,
             tokenizer=None, prefill_chunk: int | None = None, cuda_graph: bool | None = None,
             compile: bool | None = None) -> torch.Tensor:
    """Prompt + new token ids (b, width + new), as transformers' `generate`.

    `inputs` (or `input_ids`) is a (b, L) tensor with an optional left-padded `attention_mask`, a list of
    token-id lists, or a list of strings (needs `tokenizer`). Rows that stop early are padded with the pad id.
    Row i samples with seed `seed + i`. On CUDA the decode step is compiled and captured as CUDA graphs, kept on
    the model for later calls; `compile=False` captures the eager step, `cuda_graph=False` runs it eagerly.
    """
    inputs = input_ids if inputs is None else inputs
    _check_lengths_and_seed(max_new_tokens, prefill_chunk, seed)
    params = SamplingParams(do_sample, temperature, top_k, top_p, min_p, repetition_penalty)
    ids, mask = _as_batch(model, inputs, attention_mask, tokenizer)
    stop = _stop_string_check(tokenizer, stop_strings)
    steps = list(generate_tokens(model, ids, mask, max_new_tokens, params, seed, eos_token_id, prefill_chunk, stop,
                                 cuda_graph, compile))
    return torch.cat([ids, torch.stack(steps, dim=1)], dim=1)


def _check_lengths_and_seed(max_new_tokens, prefill_chunk, seed) -> None:
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise HymbaError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if prefill_chunk is not None and (not _is_int(prefill_chunk) or prefill_chunk < 1):
        raise HymbaError(f"prefill_chunk must be an integer >= 1 (or None: the prompt in one piece), "
                         f"got {prefill_chunk!r}")
    check_seed(seed)


def stop_string_list(stop_strings: str | Sequence[str] | None) -> list[str]:
    """The stop strings as a list: one string is one stop string (not one per character); each must be non-empty,
    since "" would match at once and stop every row."""
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    stop_strings = list(stop_strings or ())
    if not all(isinstance(s, str) and s for s in stop_strings):
        raise HymbaError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
    return stop_strings


def _stop_string_check(tokenizer, stop_strings):
    stop_strings = stop_string_list(stop_strings)
    if not stop_strings:
        return None
    if tokenizer is None:
        raise HymbaError("stop strings need a tokenizer to read the generated text")
    longest = max(len(s) for s in stop_strings)

    def stop(row: int, new_tokens: torch.Tensor) -> bool:
        # Decoding only the last few tokens is enough to see a stop string that just completed.
        tail = tokenizer.decode(new_tokens[-(longest + 4):].tolist())
        return any(s in tail for s in stop_strings)

    return stop


def trim_completion(text: str, stop_strings: Sequence[str] | None) -> str:
    """Cut a completion at the first stop string (the string itself is not returned)."""
    for s in stop_strings or ():
        if s in text:
            text = text[:text.index(s)]
    return text


@torch.inference_mode()
def complete(model, tokenizer, prompts: Sequence[str], stop_strings: Sequence[str] | None = None,
             **kwargs) -> list[str]:
    """Text in, completions out: the generated continuation of each prompt, cut at EOS and stop strings."""
    stop_strings = stop_string_list(stop_strings)
    pad_id = pad_token_id(model.config)
    ids, mask = _as_batch(model, list(prompts), None, tokenizer)
    out = generate(model, ids, mask, tokenizer=tokenizer, stop_strings=stop_strings, **kwargs)
    eos = set(_eos_ids(model, kwargs.get("eos_token_id")))
    completions = []
    for prompt_ids, prompt_mask, row in zip(ids.tolist(), mask.tolist(), out[:, ids.shape[1]:].tolist()):
        kept = []
        for token in row:
            if token in eos or token == pad_id:
                break
            kept.append(token)
        # Decode after the prompt so the first new word keeps its leading space.
        prompt_ids = [t for t, m in zip(prompt_ids, prompt_mask) if m]
        text = tokenizer.decode(prompt_ids + kept)[len(tokenizer.decode(prompt_ids)):]
        completions.append(trim_completion(text, stop_strings))
    return completions


def stream(model, tokenizer, prompt: str | Sequence[int], stop_strings: Sequence[str] | None = None,
           max_new_tokens: int = 256, seed: int | None = None, prefill_chunk: int | None = None,
           compile: bool | None = None, **sampling) -> Iterator[str]:
    """Text increments of one completion as they are generated; never splits a character or a word's space.

    Text that could be the start of a stop string is held back until it is clear it is not one.
    """
    from hymba.tokenizer import StreamDecoder

    _check_lengths_and_seed(max_new_tokens, prefill_chunk, seed)
    stop_strings = stop_string_list(stop_strings)
    params = SamplingParams(**sampling)
    ids, mask = _as_batch(model, [prompt], None, tokenizer)
    decoder = StreamDecoder(tokenizer)
    # Seen after the prompt, the first new word keeps its leading space (alone, SentencePiece would drop it).
    decoder.push_many(ids[0].tolist())
    decoder.flush()  # the prompt's own pending text (e.g. a template's trailing newline) is not part of the reply
    eos = set(_eos_ids(model, None))
    text, shown = "", 0
    with torch.inference_mode():
        for token in generate_tokens(model, ids, mask, max_new_tokens, params, seed, None, prefill_chunk,
                                     compile=compile):
            token = int(token[0])
            if token in eos:
                break
            text += decoder.push(token)
            if stop_strings and any(s in text for s in stop_strings):
                yield trim_completion(text, stop_strings)[shown:]
                return
            safe = len(text) - _partial_stop_suffix(text, stop_strings)
            if safe > shown:
                yield text[shown:safe]
                shown = safe
    rest = trim_completion(text + decoder.flush(), stop_strings)[shown:]
    if rest:
        yield rest


def _partial_stop_suffix(text: str, stop_strings: Sequence[str] | None) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stop_strings or ():
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best
