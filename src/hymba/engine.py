"""Continuous batching: a scheduler over the rows of one `DecodeRunner`'s cache, each row a request's slot.

The engine is three parts, as vLLM and SGLang build theirs:
1. **Scheduler** (`Scheduler`, plain Python): which waiting requests start prefilling together. Several prompts
   prefill in one forward (left-padded, in pieces of `prefill_chunk` tokens, one piece per step) under a budget of
   `max_batch_tokens` prompt tokens per step, so a burst of arrivals is a few batched forwards, not one forward each
   with every running request stalled behind it; decoding rows keep producing a token every step meanwhile.
2. **Model runner**: each step one decode step for the rows in use (compiled and captured as CUDA graphs per batch
   bucket on CUDA, so a half-empty engine runs a half-size step) and, when a group is prefilling, its next piece
   into a scratch cache; a finished group's rows are copied into their slots in one indexed copy per tensor. A
   prefill forward of a few short prompts is launch-bound on a GPU, so the decode steps that fall due while it is
   being launched go between its layers (`decode_during_prefill`).
   Sampling runs for all rows at once on the device from per-slot tensors (temperature, top-k, top-p, min-p,
   repetition penalty, seed), and the sampled tokens feed the next step without leaving the device.
3. **Output processor**: detokenizing, stop strings, log-probabilities and callbacks for step N run on the host
   while the device computes step N+1 (step N+1 is launched first), and each step's tokens come back in one copy.

A request that finishes (EOS, stop string, max_tokens) frees its slot once its last token is processed (one step
after it was sampled, since its EOS is only seen then); the step launched meanwhile computed one extra token for it,
which is dropped.

Rows never mix: attention, the SSM and the conv state are per row, and every other op is per token, so a request
decodes exactly as it would alone and greedy output equals offline `generate` whatever else is in the batch; a
seeded request samples what `generate` samples with that seed (`hymba.generate.sampling_noise`). An idle slot
inside the step's bucket still computes a (garbage) row: it is held at position 0, so it writes one key that only it
can see and never runs past its buffer, and even a NaN there stays in that row (tests/test_engine.py poisons free
slots to check). Admission overwrites the whole row, so nothing of an earlier request survives.

`Engine.start()` runs the scheduler in a thread; `submit` and `cancel` are safe from any thread, and outputs go
to each request's callback from the scheduler thread (`hymba.serve` forwards them to asyncio queues).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from hymba.cache import HymbaCache
from hymba.errors import HymbaError
from hymba.generate import (
    DecodeRunner,
    PrefillGraphs,
    RowSampling,
    SamplingParams,
    _eos_ids,
    _partial_stop_suffix,
    left_pad,
    pad_token_id,
    random_seed,
    sample,
    seed_as_int64,
    trim_completion,
)
from hymba.ops import device_tensor
from hymba.tokenizer import HymbaTokenizer, StreamDecoder

# Most alternatives a request may ask log-probabilities for (OpenAI's chat limit).
MAX_TOP_LOGPROBS = 20
# Prompt tokens shown to a request's detokenizer before its completion (see `_start_decoding`).
PROMPT_TAIL = 32
# Seconds of history behind `EngineStats.tokens_per_second`.
RATE_WINDOW_S = 10.0


class RequestError(HymbaError):
    """A request the engine cannot run; `param` names the offending field (the HTTP API reports it)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFullError(HymbaError):
    """More requests are waiting than the engine accepts (`max_queue`); retry later."""


@dataclass
class GenerationParams:
    """One request's settings. `logprobs=k` reports the chosen token's log-probability and the k most likely
    alternatives (k = 0: the chosen one only), from the model's distribution before sampling filters.
    `ignore_eos` generates past EOS up to `max_tokens` (fixed-length outputs, as load tests want)."""

    max_tokens: int = 16
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: Sequence[str] = ()
    logprobs: int | None = None
    ignore_eos: bool = False


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-probability), most likely first


@dataclass
class Output:
    """What one step produced for one request. `text` is safe to show: never half a character, never text
    that may turn out to start a stop string. A finished request's last output has `finish_reason` set:
    "stop" (EOS or a stop string), "length" (max_tokens), "cancelled" or "error" (with `error`)."""

    request_id: int
    token_id: int | None
    text: str
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Completion:
    """A finished request, as `Engine.complete` returns it."""

    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob]


@dataclass
class EngineStats:
    running: int
    waiting: int
    max_batch: int
    requests_total: int
    finished_total: dict[str, int]
    prompt_tokens_total: int
    generated_tokens_total: int
    tokens_per_second: float


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: GenerationParams
    on_output: Callable[[Output], None]
    seed: int
    arrived: float = field(default_factory=time.monotonic)
    done: bool = False  # its final output was sent


@dataclass
class _Running:
    """A request in a slot: what has been sampled for it, and the text shown so far."""

    request: _Request
    row: int
    decoder: StreamDecoder
    launched: int = 0  # tokens sampled on the device (the output processor may not have seen the last ones yet)
    generated: int = 0  # tokens the output processor has handled
    text: str = ""
    shown: int = 0


@dataclass
class _Group:
    """Requests prefilling together in rows 0..k-1 of the scratch cache, one piece a step: prompts of one length
    continue from the meta tokens' state (computed once per engine); others are left-padded to one width in a fresh
    cache, whose first piece computes the meta tokens after each row's padding and takes all of it."""

    requests: list[_Request]
    slots: list[int]  # where each row goes when its prefill is done
    ids: torch.Tensor  # (k, width)
    mask: torch.Tensor  # (k, width)
    pieces: list[tuple[int, int]]  # column ranges, one forward each
    from_meta: bool  # the rows start from the meta tokens' state (no padding)
    done_pieces: int = 0
    cancelled: set[int] = field(default_factory=set)

    @property
    def fresh(self) -> bool:
        """Whether the next piece is the first forward into emptied rows (it computes the meta tokens too)."""
        return not self.from_meta and self.done_pieces == 0


@dataclass
class _Launched:
    """What one step put on the device: the sampled tokens (and log-probabilities) for these requests, copied back to
    the host; `event` marks when the copy is done."""

    entries: list[tuple[_Running, int]]  # (request, its index in the tensors below)
    tokens: torch.Tensor
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # chosen (n,), top values / ids (n, k)
    event: torch.cuda.Event | None

    def finished(self) -> bool:
        return self.event is None or self.event.query()


class Scheduler:
    """Which waiting requests start prefilling as one group; no tensors, so it is tested without a model.

    A group is formed from the head of the queue (first come, first served) when there are free slots and no group
    is prefilling. It takes requests while they fit: free slots, `max_rows` (the scratch cache), and the budget of
    `max_batch_tokens` tokens for the group's widest forward (rows x (meta tokens + the padded first piece), pieces
    being at most `chunk` tokens past the padding). The step's first group always takes the head request, however
    long; a further group in the same step (`budget`: what the step has left) only takes what fits. With
    `pad=False` a group holds prompts of the head's length only, which continue from the meta tokens' state
    unpadded. While other requests are decoding, a group that is not full yet waits up to `prefill_wait_s` for
    more arrivals, since each prefill forward costs the running requests a stall whatever its size.
    """

    def __init__(self, max_batch_tokens: int, max_rows: int, chunk: int, num_meta: int, prefill_wait_s: float = 0.0,
                 pad: bool = True):
        self.max_batch_tokens, self.max_rows, self.chunk = max_batch_tokens, max_rows, chunk
        self.num_meta, self.prefill_wait_s, self.pad = num_meta, prefill_wait_s, pad

    def group_size(self, prompt_lengths: Sequence[int], free_slots: int, decoding: bool,
                   oldest_wait_s: float = 0.0, budget: int | None = None) -> int:
        """How many of the waiting requests (their prompt lengths, in queue order) to start prefilling now."""
        limit = min(free_slots, self.max_rows, len(prompt_lengths))
        if not self.pad:
            limit = next((i for i in range(limit) if prompt_lengths[i] != prompt_lengths[0]), limit)
        k, longest, shortest = 0, 0, None
        while k < limit:
            length = prompt_lengths[k]
            wide, narrow = max(longest, length), length if shortest is None else min(shortest, length)
            first_piece = min(wide, wide - narrow + self.chunk)  # all padding of the shortest row, plus a chunk
            if (k or budget is not None) and (k + 1) * (self.num_meta + first_piece) > (
                    self.max_batch_tokens if budget is None else budget):
                break
            k, longest, shortest = k + 1, wide, narrow
        full = k == free_slots or k == self.max_rows or k < len(prompt_lengths)
        if k and decoding and not full and oldest_wait_s < self.prefill_wait_s:
            return 0
        return k


class Engine:
    """Continuous batching over `max_batch` cache slots of `max_len` tokens each (prompt + generated).

    `max_len` defaults to the model's context (max_position_embeddings minus meta tokens). `max_queue` bounds
    the waiting requests (`submit` raises `QueueFullError` beyond it). Prefill: up to `max_prefill_rows` prompts
    together (default `max_batch`: they prefill in a scratch cache of that many rows of `max_len` tokens),
    `prefill_chunk` tokens per piece, `max_batch_tokens` tokens per forward, waiting up to
    `prefill_wait_s` to fill a group while others decode (see `Scheduler`). On CUDA the decode step is compiled
    (`compile`) and captured as CUDA graphs (`cuda_graph`) for each batch bucket at start-up, reporting each to
    `progress`; with `prefill_graphs` (the default where decode steps are captured) so is a small group's first
    prefill (`PrefillGraphs`), as `prefill_graph_segments` graphs of consecutive layers with a decode step launched
    between them. With
    `decode_during_prefill` (the default on CUDA) the decode steps that fall due while a prefill forward is being
    launched are launched between its layers. `max_prefill_rows=1`, `cuda_graph=False`, `prefill_graphs=False` and
    `decode_during_prefill=False` are the reference paths the tests compare against.
    """

    def __init__(self, model, tokenizer: HymbaTokenizer, max_batch: int = 8, max_len: int | None = None,
                 max_queue: int | None = None, prefill_chunk: int = 2048, max_batch_tokens: int = 65536,
                 max_prefill_rows: int | None = None, prefill_wait_s: float = 0.0, cuda_graph: bool | None = None,
                 compile: bool | None = None, prefill_graphs: bool | None = None, prefill_graph_segments: int = 1,
                 decode_during_prefill: bool | None = None,
                 eos_token_id: int | list[int] | None = None, progress: Callable[[str], None] | None = None):
        config = model.config
        limit = config.max_position_embeddings - config.num_memory_tokens
        max_len = max_len or limit
        if max_batch < 1:
            raise HymbaError(f"max_batch must be >= 1, got {max_batch}")
        if not 1 <= max_len <= limit:
            raise HymbaError(f"max_len must be in 1..{limit} (the model's context without meta tokens), got {max_len}")
        for name, value in (("prefill_chunk", prefill_chunk), ("max_batch_tokens", max_batch_tokens),
                            ("max_prefill_rows", max_prefill_rows or 1)):
            if value < 1:
                raise HymbaError(f"{name} must be >= 1, got {value}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_len, self.max_queue = max_batch, max_len, max_queue
        self.device = model.device
        self.eos = frozenset(_eos_ids(model, eos_token_id))
        self.pad_id = pad_token_id(config)
        # A wave of arrivals as large as the free slots prefills as one group and then decodes in step, as static
        # generate's batches do: the 1.5B shape on an H200, 512-token prompts through 64 slots all at once, 0.90 of
        # static generate with groups of up to 64 rows and 65,536 tokens against 0.85 with 32 and 32,768 (two groups
        # a wave, whose rows then finish steps apart; `benchmarks/serve_settings.py`, session 18).
        max_prefill_rows = min(max_prefill_rows or max_batch, max_batch)
        # On a GPU a short prefill forward costs its launches whatever its size, so prompts of different lengths go
        # in one padded forward (each row computing the meta tokens again); on a CPU the arithmetic is the cost, so
        # groups hold one prompt length and continue from the meta tokens' state, several groups a step.
        self.scheduler = Scheduler(max_batch_tokens, max_prefill_rows, prefill_chunk, config.num_memory_tokens,
                                   prefill_wait_s, pad=model.device.type == "cuda")
        self.runner = DecodeRunner(model, max_batch, max_len, cuda_graph=cuda_graph, compile=compile,
                                   progress=progress)
        self.runner.capture()  # at start-up, not in the first request's time to first token
        self.cache = self.runner.cache
        # Groups prefill here and are copied into their slots when done, so slots only ever decode.
        # Every prompt starts with the same meta tokens. Where groups hold one prompt length (a CPU) their state is
        # computed once and groups continue from copies of it (chunked prefill, the same function as one piece). A GPU
        # recomputes them instead: a forward from a fresh cache attends by index ([padding, meta, text]), one
        # continuing attends over the whole buffer through an explicit mask, which cost more than the 128 tokens saved
        # (the 1.5B shape on an H200, 512-token prompts all at once: 0.73 of static generate continuing, 0.80 fresh).
        self.meta = None
        if config.num_memory_tokens and not self.scheduler.pad:
            self.meta = HymbaCache(config, 1, max_len, device=self.device, dtype=model.dtype)
            with torch.inference_mode():
                model(torch.empty(1, 0, dtype=torch.long, device=self.device), cache=self.meta)
        self.scratch = HymbaCache(config, max_prefill_rows, max_len, device=self.device, dtype=model.dtype)
        # A small group's prefill is launch-bound (above), so where decode steps are captured its first forward is
        # too, per (rows, width) bucket. The 1.5B shape on an H200, 512-token prompts through 64 slots: 0.84 of static
        # generate all at once against 0.76 without, and at 24 requests/s a time to first token p50 of 0.05 s against
        # 0.17 (`benchmarks/serve_settings.py`, session 17).
        self.prefill_graphs = None
        if self.runner.graphed and prefill_graphs is not False:
            # One segment until several are measured on a GPU (they are tested on the CPU through the eager path).
            self.prefill_graphs = PrefillGraphs(model, self.scratch, progress=progress,
                                                segments=prefill_graph_segments)
            self.prefill_graphs.capture()
        if self.device.type == "cuda":
            self._warm_up_prefill(progress)
        # A small group's prefill forward is launch-bound on a GPU (about 70 ms of host time for 16 ms of device time
        # at 1 x 512 tokens on the 1.5B shape): running requests decode between its layers instead of waiting for it.
        # On a CPU every op computes as it is launched, so there is nothing to overlap.
        self.decode_during_prefill = (self.device.type == "cuda" if decode_during_prefill is None
                                      else decode_during_prefill)
        # Per-slot state on the device: the token each row feeds next, its seed and sample counter, and the tokens it
        # has seen (for the repetition penalty).
        self._next_tokens = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._seeds = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._counters = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._seen: torch.Tensor | None = None  # (max_batch, vocab) bool, allocated for the first penalised request
        self._slot_params = [SamplingParams()] * max_batch
        self._slot_sampling: RowSampling | None = None  # rebuilt when a slot changes hands
        self._slots: list[_Running | None] = [None] * max_batch
        self._free_rows = list(range(max_batch - 1, -1, -1))  # a stack: low rows are reused first
        self._freed_rows: list[int] = []  # rows of finished requests, emptied together (`_empty_freed_rows`)
        self._running: dict[int, _Running] = {}  # request id -> running request
        self._group: _Group | None = None
        self._inflight: collections.deque[_Launched] = collections.deque()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._cancelled: set[int] = set()
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards _waiting, _cancelled and the counters read by stats()
        self._step_lock = threading.Lock()  # one step at a time, whether from the thread or a caller
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._requests_total = 0
        self._finished: collections.Counter[str] = collections.Counter()
        self._prompt_tokens = 0
        self._generated_tokens = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per step
        self._step_fn = self.runner.step  # the decode step (tests replace it to inject failures)
        self.decode_steps_total = 0  # decode steps launched, and the requests they decoded (for benchmarks)
        self.decode_rows_total = 0
        self.seconds: collections.Counter[str] = collections.Counter()  # host time per part of `step`

    def _warm_up_prefill(self, progress: Callable[[str], None] | None) -> None:
        """Run the prefill shapes whose first use compiles, at start-up rather than in a request's time to first
        token. The compiled elementwise helpers (`compiled_on_gpu`) have dynamic shapes but specialize a size of 1,
        so a group of one row compiles them again (7 graphs, counted on the CPU; seconds on a GPU), as does a group's
        continuing piece; Triton specializes lengths by divisibility."""
        if progress is not None:
            progress("warming up the prefill (groups of 1 and 2 rows, a continuing piece)")
        rows = min(2, self.scratch.batch)
        with torch.inference_mode():
            for k in sorted({1, rows}):
                for tokens in sorted({min(16, self.max_len), min(17, self.max_len)}):
                    self.scratch.reset_rows(list(range(k)))
                    cache = self.scratch.rows(k)
                    ids = torch.full((k, tokens), self.pad_id, dtype=torch.long, device=self.device)
                    self.model(ids, torch.ones_like(ids), cache=cache, logits_to_keep=1)
                    if 2 * tokens <= self.max_len:  # a second piece, continuing from the first's state
                        self.model(ids, cache=cache, logits_to_keep=1)
            self.scratch.reset_rows(list(range(rows)))

    # ------------------------------------------------------------------ submitting (any thread)
    def submit(self, prompt: Sequence[int], params: GenerationParams | None = None,
               on_output: Callable[[Output], None] | None = None) -> int:
        """Queue a request; returns its id. Outputs go to `on_output` from the scheduler thread.

        Raises `RequestError` for a request that cannot run and `QueueFullError` when `max_queue` are waiting.
        """
        params = params or GenerationParams()
        prompt = [int(t) for t in prompt]
        self._validate(prompt, params)
        with self._lock:
            if self.max_queue is not None and len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting; retry later")
            seed = seed_as_int64(params.seed) if params.seed is not None else random_seed()
            request = _Request(next(self._ids), prompt, params, on_output or (lambda output: None), seed)
            self._waiting.append(request)
            self._requests_total += 1
        self._wakeup.set()
        return request.id

    def _validate(self, prompt: list[int], params: GenerationParams) -> None:
        vocab = self.model.config.vocab_size
        if not prompt:
            raise RequestError("the prompt is empty; give at least one token", "prompt")
        if any(not 0 <= t < vocab for t in prompt):
            raise RequestError(f"prompt token ids must be in 0..{vocab - 1}", "prompt")
        if params.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {params.max_tokens}", "max_tokens")
        if len(prompt) + params.max_tokens > self.max_len:
            what = "the prompt" if len(prompt) >= self.max_len else "the prompt + max_tokens"
            raise RequestError(f"{what} ({len(prompt)} + {params.max_tokens} tokens) exceed the context of "
                               f"{self.max_len} tokens; shorten the prompt or lower max_tokens",
                               "prompt" if len(prompt) >= self.max_len else "max_tokens")
        if any(not isinstance(s, str) or not s for s in params.stop):
            raise RequestError("stop strings must be non-empty strings", "stop")
        if params.logprobs is not None and not 0 <= params.logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {params.logprobs}", "logprobs")

    def cancel(self, request_id: int) -> None:
        """Stop a request (waiting or running); it gets a final output with finish_reason "cancelled"."""
        with self._lock:
            waiting = next((r for r in self._waiting if r.id == request_id), None)
            if waiting is not None:
                self._waiting.remove(waiting)  # at once: a withdrawn request must not hold a place in the queue
            else:
                self._cancelled.add(request_id)  # running (or finished): the scheduler frees its slot
        if waiting is not None:
            self._finish(waiting, None, Output(request_id, None, "", finish_reason="cancelled"))
        self._wakeup.set()

    def stats(self) -> EngineStats:
        now = time.monotonic()
        with self._lock:
            recent = sum(n for t, n in self._recent if now - t <= RATE_WINDOW_S)
            return EngineStats(running=len(self._running), waiting=len(self._waiting), max_batch=self.max_batch,
                               requests_total=self._requests_total, finished_total=dict(self._finished),
                               prompt_tokens_total=self._prompt_tokens, generated_tokens_total=self._generated_tokens,
                               tokens_per_second=recent / RATE_WINDOW_S)

    # ------------------------------------------------------------------ the scheduler thread
    def start(self) -> Engine:
        """Run the scheduler in a daemon thread until `stop()`."""
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._loop, name="hymba-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the scheduler thread; every unfinished request ends as "cancelled"."""
        if self._thread is not None:
            self._stopping.set()
            self._wakeup.set()
            self._thread.join()
            self._thread = None
        with self._lock:
            waiting = list(self._waiting)
            self._cancelled.update(self._running)
            if self._group is not None:
                self._cancelled.update(q.id for q in self._group.requests)
        for request in waiting:
            self.cancel(request.id)
        while self.step():  # the group ends, then what is in flight is processed
            pass

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wakeup.clear()  # before stepping: a submit during the step sets it again, so no wake-up is lost
            if not self.step():
                self._wakeup.wait()


    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def step(self) -> bool:
        """Cancel; launch a decode step and the next prefill piece; process the previous step's tokens while the
        device computes. Returns False when there was nothing to do."""
        with self._step_lock:
            with self._lock:
                cancelled, self._cancelled = self._cancelled, set()
            stopped = [self._running[i] for i in cancelled if i in self._running]
            for r in stopped:
                self._finish(r.request, r, Output(r.request.id, None, "", finish_reason="cancelled"))
            if self._group is not None:
                self._group.cancelled |= cancelled & {q.id for q in self._group.requests}
            clock = time.perf_counter()
            launched = self._guarded(self._decoding_requests(), self._launch_decode)
            if self._group is None:
                self._form_group()
            clock = self._time("decode launch", clock)
            # Prefill pieces up to the step's token budget: a group finished in one piece leaves room for the next.
            spent = 0
            while self._group is not None:
                group = self._group
                start, end = group.pieces[group.done_pieces]
                # Counted as the scheduler counts a group's forward: rows x (meta tokens if fresh + the piece).
                spent += len(group.requests) * (end - start + self.model.config.num_memory_tokens * group.fresh)
                launched |= self._guarded([q for q in self._group.requests if not q.done], self._prefill_piece)
                if self._group is not None or spent >= self.scheduler.max_batch_tokens:
                    break
                self._form_group(budget=self.scheduler.max_batch_tokens - spent)
            clock = self._time("prefill", clock)
            # Keep the newest launch on the device while the host handles the ones before it.
            processed = False
            while len(self._inflight) > int(launched):
                self._process(self._inflight.popleft())
                processed = True
            self._time("output processing (incl. waiting for the device)", clock)
            return bool(stopped or launched or processed)

    def _time(self, part: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[part] += now - since
        return now

    def _guarded(self, requests: list[_Request], fn) -> bool:
        """Run `fn`; if it raises (e.g. out of memory), end `requests` with an error instead of the scheduler."""
        try:
            return fn()
        except Exception as exc:  # any failure must reach the clients, not kill the thread
            message = f"{type(exc).__name__}: {exc}"
            while self._inflight:  # what was computed before the failure still reaches its requests
                self._process(self._inflight.popleft())
            if self._group is not None and any(q in self._group.requests for q in requests):
                self._release_group()
            for request in (r for r in requests if not r.done):
                self._finish(request, self._running.get(request.id),
                             Output(request.id, None, "", finish_reason="error", error=message))
            return False

    # ------------------------------------------------------------------ model runner
    def _decoding_requests(self) -> list[_Request]:
        return [r.request for r in self._running.values() if r.launched < r.request.params.max_tokens]

    def _launch_decode(self) -> bool:
        self._empty_freed_rows()  # parks them before the step
        decoding = [r for r in self._running.values() if r.launched < r.request.params.max_tokens]
        if not decoding:
            return False
        self._compact()
        rows = max(r.row for r in self._running.values()) + 1
        if self._slot_sampling is None:
            self._slot_sampling = RowSampling.of(self._slot_params, self.device)
        logits = self._step_fn(self._next_tokens[:rows])  # (rows, vocab)
        tokens = self._sample(logits, _prefix(self._slot_sampling, rows), self._seeds[:rows], self._counters[:rows],
                              None if self._seen is None else self._seen[:rows])
        self._next_tokens[:rows] = tokens
        self._counters[:rows] += 1
        entries = []
        for r in decoding:
            r.launched += 1
            entries.append((r, r.row))
            if r.launched == r.request.params.max_tokens:
                self.runner.idle[r.row] = True  # nothing more to feed: park the row at position 0
        self._push(entries, tokens, logits, [r.request for r in decoding])
        self.decode_steps_total += 1
        self.decode_rows_total += len(decoding)
        return True

    def _compact(self) -> None:
        """Move requests from the highest rows into free lower ones while that shrinks the step's bucket, so a
        half-empty engine runs a half-size step however its requests came and went. Everything of a slot moves:
        cache row, next token, seed, counter, seen tokens and settings (device copies, in stream order after the
        step that last wrote them)."""
        while True:
            top = max(self._running.values(), key=lambda r: r.row)
            lower = [row for row in self._free_rows if row < top.row]
            if not lower or top.launched >= top.request.params.max_tokens:
                return  # no hole below, or the top row is done and frees itself
            if self.runner.bucket(len(self._running)) >= self.runner.bucket(top.row + 1):
                return  # the bucket would not shrink
            old, new = top.row, min(lower)
            self.cache.copy_rows_from([new], self.cache, [old])
            for per_slot in (self._next_tokens, self._seeds, self._counters, self._seen):
                if per_slot is not None:
                    per_slot[new] = per_slot[old]
            self.runner.idle[new], self.runner.idle[old] = False, True
            self.cache.reset_rows([old])
            self._slot_params[new], self._slot_params[old] = self._slot_params[old], SamplingParams()
            self._slots[new], self._slots[old] = top, None
            self._slot_sampling = None
            self._free_rows.remove(new)
            self._free_rows.append(old)
            self._free_rows.sort(reverse=True)
            top.row = new

    def _sample(self, logits, rows: RowSampling, seeds, counters, seen) -> torch.Tensor:
        tokens = sample(logits, rows, seeds, counters, seen)
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        return tokens

    def _push(self, entries: list[tuple[_Running, int]], tokens: torch.Tensor, logits: torch.Tensor,
              requests: list[_Request]) -> None:
        """Queue the copy of a launch's tokens (and log-probabilities, if any request asks) back to the host."""
        want = [q.params.logprobs for q in requests if q.params.logprobs is not None]
        logprobs = None
        if want:
            logp = torch.log_softmax(logits.float(), dim=-1)
            top = logp.topk(max(max(want), 1), dim=-1)
            logprobs = tuple(t.to("cpu", non_blocking=True) for t in
                             (logp.gather(1, tokens[:, None])[:, 0], top.values, top.indices))
        event = None
        host_tokens = tokens.to("cpu", non_blocking=True)
        if tokens.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self._inflight.append(_Launched(entries, host_tokens, logprobs, event))

    def _form_group(self, budget: int | None = None) -> None:
        if not self._free_rows:
            return
        self._empty_freed_rows()  # before a group's copy can fill them
        with self._lock:
            lengths = [len(q.prompt) for q in self._waiting]
            oldest = time.monotonic() - self._waiting[0].arrived if self._waiting else 0.0
            k = self.scheduler.group_size(lengths, len(self._free_rows), bool(self._running), oldest, budget)
            requests = [self._waiting.popleft() for _ in range(k)]
        if not requests:
            return
        slots = [self._free_rows.pop() for _ in requests]
        ids, mask = left_pad([q.prompt for q in requests], self.pad_id, self.device)
        width, padding = ids.shape[1], max(ids.shape[1] - len(q.prompt) for q in requests)
        chunk = self.scheduler.chunk
        rows = list(range(len(requests)))
        # Padding may only precede a row's meta tokens, so only unpadded rows can start from their state.
        from_meta = self.meta is not None and padding == 0
        first = chunk if from_meta else min(width, padding + chunk)
        pieces = [(0, min(first, width))] + [(start, min(start + chunk, width)) for start in range(first, width, chunk)]
        self._group = _Group(requests, slots, ids, mask, pieces, from_meta)
        if from_meta:
            self.scratch.copy_rows_from(rows, self.meta, [0] * len(rows))
        else:
            self.scratch.reset_rows(rows)
        with self._lock:
            self._prompt_tokens += sum(lengths[:len(requests)])

    def _prefill_piece(self) -> bool:
        """The group's next forward; after its last, sample each row's first token and move the rows to their
        slots."""
        group = self._group
        k = len(group.requests)
        cache = self.scratch.rows(k)
        cache.started = not group.fresh
        start, end = group.pieces[group.done_pieces]
        mask = group.mask[:, start:end] if not cache.started else None
        logits = None
        if self.prefill_graphs is not None and group.fresh and len(group.pieces) == 1:
            # None when no bucket holds the group. A replay is queued at once, so the decode step between its
            # segments goes in unconditionally.
            logits = self.prefill_graphs(group.ids, group.mask,
                                         between=self._decode_now if self.decode_during_prefill else None)
        if logits is None:
            logits = self.model(group.ids[:, start:end], mask, cache=cache, logits_to_keep=1,
                                between_layers=self._decode_between_layers if self.decode_during_prefill else None
                                ).logits[:, -1]
        group.done_pieces += 1
        if group.done_pieces < len(group.pieces):
            return True
        live = [i for i, q in enumerate(group.requests) if q.id not in group.cancelled]
        for i, q in enumerate(group.requests):
            if i not in live:
                self._free_rows.append(group.slots[i])
                self._free_rows.sort(reverse=True)
                self._finish(q, None, Output(q.id, None, "", finish_reason="cancelled"))
        if not live:
            self._group = None
            return True
        requests, slots = [group.requests[i] for i in live], [group.slots[i] for i in live]
        index = device_tensor(live, torch.long, self.device)
        slot_index = device_tensor(slots, torch.long, self.device)
        params = [q.params.sampling for q in requests]
        seen = None
        if any(p.repetition_penalty != 1 for p in params):
            if self._seen is None:
                self._seen = torch.zeros(self.max_batch, self.model.config.vocab_size, dtype=torch.bool,
                                         device=self.device)
            seen = torch.zeros(len(live), self.model.config.vocab_size, dtype=torch.bool, device=self.device)
            seen.scatter_(1, group.ids[index], group.mask[index].bool())  # padding is not a seen token
        seeds = device_tensor([q.seed for q in requests], torch.long, self.device)
        counters = torch.zeros(len(live), dtype=torch.long, device=self.device)
        tokens = self._sample(logits[index], RowSampling.of(params, self.device), seeds, counters, seen)
        self.cache.copy_rows_from(slots, self.scratch, live)
        self._next_tokens[slot_index] = tokens
        self._seeds[slot_index] = seeds
        self._counters[slot_index] = 1
        if self._seen is not None:
            self._seen[slot_index] = False if seen is None else seen
        self.runner.idle[slot_index] = False
        entries = [self._start_decoding(q, slot) for q, slot in zip(requests, slots)]
        self._push([(r, i) for i, r in enumerate(entries)], tokens, logits[index], requests)
        self._group = None
        return True

    def _decode_between_layers(self) -> None:
        """Called between a prefill forward's layers: once the newest launch has finished on the device, launch the
        next decode step (it queues behind the layers launched so far) and hand out the finished tokens."""
        if self._inflight and not self._inflight[-1].finished():
            return
        self._decode_now()

    def _decode_now(self) -> None:
        """Launch the next decode step and hand out the tokens of the launches before it."""
        clock = time.perf_counter()
        launched = self._guarded(self._decoding_requests(), self._launch_decode)
        while len(self._inflight) > int(launched):
            self._process(self._inflight.popleft())
        self._time("decoding between prefill layers", clock)

    def _start_decoding(self, request: _Request, slot: int) -> _Running:
        decoder = StreamDecoder(self.tokenizer)
        # Seen after the prompt, the first new word keeps its leading space (as `complete` reads it). The decoder
        # looks back only to the start of its last emitted chunk, so the prompt's tail is enough; the flush takes
        # the prompt's own held-back text (a chat template's final "\n" is a byte token) out of the completion.
        decoder.push_many(request.prompt[-PROMPT_TAIL:])
        decoder.flush()
        running = _Running(request, slot, decoder, launched=1)
        self._running[request.id] = running
        self._slots[slot] = running
        self._slot_params[slot] = request.params.sampling
        self._slot_sampling = None
        if request.params.max_tokens == 1:
            self.runner.idle[slot] = True
        return running

    def _release_group(self) -> None:
        """Give a failed group's slots back (those no request of it holds yet and not given back already)."""
        self._free_rows += [s for s in self._group.slots if self._slots[s] is None and s not in self._free_rows]
        self._free_rows.sort(reverse=True)
        self._group = None

    # ------------------------------------------------------------------ output processor
    def _empty_freed_rows(self) -> None:
        """Empty the rows of the requests finished since the last call and park them, in one set of kernels: a wave of
        requests finishing together costs ~70 small launches, not ~70 per request. Runs before each decode step and
        before a group takes rows."""
        if self._freed_rows:
            rows = device_tensor(self._freed_rows, torch.long, self.device)
            self.cache.reset_rows(rows)
            self.runner.idle.index_fill_(0, rows, True)
            self._freed_rows = []

    def _process(self, launched: _Launched) -> None:
        """Hand one launch's tokens to their requests (waits only for that launch's copy)."""
        if launched.event is not None:
            launched.event.synchronize()
        tokens = launched.tokens.tolist()
        if launched.logprobs is not None:
            chosen, top_values, top_ids = (t.tolist() for t in launched.logprobs)
        now = time.monotonic()
        count = 0
        for r, index in launched.entries:
            if r.request.done:
                continue  # finished (EOS seen) while this launch was on the device: its token is dropped
            logprob = None
            k = r.request.params.logprobs
            if k is not None:
                logprob = TokenLogprob(tokens[index], chosen[index],
                                       list(zip(top_ids[index][:k], top_values[index][:k])))
            self._advance(r, tokens[index], logprob)
            count += 1
        with self._lock:
            self._generated_tokens += count
            self._recent.append((now, count))
            while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
                self._recent.popleft()

    def _advance(self, r: _Running, token: int, logprob: TokenLogprob | None) -> None:
        """Append one token to a request: detokenize, check EOS / stop strings / length, emit, maybe finish."""
        params = r.request.params
        r.generated += 1
        finish = None
        if token in self.eos and not params.ignore_eos:
            finish = "stop"
        else:
            r.text += r.decoder.push(token)
            if params.stop and any(s in r.text for s in params.stop):
                finish = "stop"
            elif r.generated >= params.max_tokens:
                finish = "length"
        if finish is None:
            safe = len(r.text) - _partial_stop_suffix(r.text, params.stop)
            text, r.shown = r.text[r.shown:max(safe, r.shown)], max(safe, r.shown)
            self._emit(r.request, Output(r.request.id, token, text, logprob))
            return
        text = trim_completion(r.text + r.decoder.flush(), params.stop)[r.shown:]
        self._finish(r.request, r, Output(r.request.id, token, text, logprob, finish_reason=finish))

    def _finish(self, request: _Request, running: _Running | None, output: Output) -> None:
        if running is not None:
            del self._running[request.id]
            self._slots[running.row] = None
            self._slot_params[running.row] = SamplingParams()
            self._slot_sampling = None
            self._freed_rows.append(running.row)
            self._free_rows.append(running.row)
            self._free_rows.sort(reverse=True)  # lowest on top, so the step's rows stay few
        request.done = True
        with self._lock:
            self._finished[output.finish_reason] += 1
        self._emit(request, output)

    def _emit(self, request: _Request, output: Output) -> None:
        try:
            request.on_output(output)
        except Exception:  # a consumer that cannot take outputs any more (closed loop) is gone
            if output.finish_reason is None:
                self.cancel(request.id)


    # ------------------------------------------------------------------ convenience
    def complete(self, prompts: Sequence[str | Sequence[int]], params: GenerationParams | None = None) -> list[
            Completion]:
        """Run prompts (text, encoded with BOS, or token ids) to completion; with the scheduler thread stopped,
        steps it here. Raises HymbaError if a request ends in an error."""
        outputs: queue.Queue[Output] = queue.Queue()
        ids = [self.submit(self.tokenizer.encode(p) if isinstance(p, str) else p, params, outputs.put)
               for p in prompts]
        results: dict[int, Completion] = {i: Completion("", [], "", []) for i in ids}
        pending = set(ids)
        while pending:
            if self._thread is None:
                while outputs.empty():
                    self.step()
            output = outputs.get()
            if output.error:
                raise HymbaError(f"request {output.request_id} failed: {output.error}")
            result = results[output.request_id]
            result.text += output.text
            if output.token_id is not None:
                result.token_ids.append(output.token_id)
            if output.logprob is not None:
                result.logprobs.append(output.logprob)
            if output.finish_reason:
                result.finish_reason = output.finish_reason
                pending.discard(output.request_id)
        return [results[i] for i in ids]


def _prefix(rows: RowSampling, n: int) -> RowSampling:
    """The first n rows of per-slot sampling settings."""
    return RowSampling(rows.temperature[:n], rows.top_k[:n], rows.top_p[:n], rows.min_p[:n],
                       rows.repetition_penalty[:n], rows.any_sample, rows.any_top_k, rows.any_top_p, rows.any_min_p,
                       rows.any_penalty)


class Replicas:
    """Data-parallel engines (one per device, each with its own copy of the model) behind the interface of one:
    `hymba serve --devices cuda:0,cuda:1` serves them from one HTTP server.

    A request goes to the engine with the fewest requests running or waiting (in turn among equals), and keeps it to
    the end; request ids are the replicas' own, so `cancel` finds the engine that holds the request. `stats()` adds
    the engines' up.
    """

    def __init__(self, engines: Sequence[Engine]):
        if not engines:
            raise HymbaError("Replicas needs at least one engine")
        self.engines = list(engines)
        self.tokenizer = self.engines[0].tokenizer
        self.max_len = min(e.max_len for e in self.engines)
        self.max_batch = sum(e.max_batch for e in self.engines)
        self._ids = itertools.count()
        self._routes: dict[int, tuple[Engine, int]] = {}  # replica request id -> (engine, its id there)
        self._lock = threading.Lock()  # held while a request is routed, so its outputs never beat its route

    def submit(self, prompt: Sequence[int], params: GenerationParams | None = None,
               on_output: Callable[[Output], None] | None = None) -> int:
        on_output = on_output or (lambda output: None)
        with self._lock:
            request_id = next(self._ids)

            def forward(output: Output) -> None:
                if output.finish_reason is not None:
                    with self._lock:
                        self._routes.pop(request_id, None)
                on_output(dataclasses.replace(output, request_id=request_id))

            # The least busy engine; among equally busy ones, the next in turn, so idle replicas share the work.
            turn = request_id % len(self.engines)
            engine = min(self.engines[turn:] + self.engines[:turn], key=_load)
            self._routes[request_id] = (engine, engine.submit(prompt, params, forward))
        return request_id

    def cancel(self, request_id: int) -> None:
        with self._lock:
            route = self._routes.get(request_id)
        if route is not None:
            route[0].cancel(route[1])

    def stats(self) -> EngineStats:
        parts = [e.stats() for e in self.engines]

        def total(name: str):
            return sum(getattr(part, name) for part in parts)

        finished: collections.Counter[str] = collections.Counter()
        for part in parts:
            finished.update(part.finished_total)
        return EngineStats(running=total("running"), waiting=total("waiting"), max_batch=total("max_batch"),
                           requests_total=total("requests_total"), finished_total=dict(finished),
                           prompt_tokens_total=total("prompt_tokens_total"),
                           generated_tokens_total=total("generated_tokens_total"),
                           tokens_per_second=total("tokens_per_second"))

    def start(self) -> Replicas:
        for engine in self.engines:
            engine.start()
        return self

    def stop(self) -> None:
        for engine in self.engines:
            engine.stop()

    def __enter__(self) -> Replicas:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _load(engine: Engine) -> int:
    stats = engine.stats()
    return stats.running + stats.waiting
