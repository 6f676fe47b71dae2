"""Continuous batching: one scheduler owns the model and a `HymbaCache` whose rows are request slots.

Each `step()`:
1. cancelled requests leave and free their slots;
2. waiting requests take free slots: each prompt is prefilled alone into a batch-1 scratch cache (continuing
   from the state after the meta tokens, computed once), whose state (K/V of every producer layer, key positions
   and validity, SSM and conv state, next position) is copied into the slot, and its first token is sampled from
   the prefill logits;
3. one decode step runs for every slot at once (a CUDA graph on GPU, captured once for the full slot batch),
   and each running request samples its next token with its own parameters and generator.
A request that finishes (EOS, stop string, max_tokens) frees its slot at once, so the next waiting one joins the
batch at the following step.

Rows never mix: attention, the SSM and the conv state are per row, and every other op is per token, so a request
decodes exactly as it would alone and greedy output equals offline `generate` whatever else is in the batch.
A free slot still computes a (garbage) row each step: it is held at position 0, so it writes one key that only
it can see and never runs past its buffer, and even a NaN there stays in that row (tests/test_engine.py poisons
free slots to check). Admission overwrites the whole row, so nothing of an earlier request survives.

`Engine.start()` runs the scheduler in a thread; `submit` and `cancel` are safe from any thread, and outputs go
to each request's callback from the scheduler thread (`hymba.serve` forwards them to asyncio queues).
"""

from __future__ import annotations

import collections
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
    CudaGraphDecoder,
    SamplingParams,
    _eos_ids,
    _partial_stop_suffix,
    apply_repetition_penalty,
    decode_step,
    prefill,
    sample,
    trim_completion,
)
from hymba.tokenizer import HymbaTokenizer, StreamDecoder

# Most alternatives a request may ask log-probabilities for (OpenAI's chat limit).
MAX_TOP_LOGPROBS = 20
# Prompt tokens shown to a request's detokenizer before its completion (see `_admit`).
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
    alternatives (k = 0: the chosen one only), from the model's distribution before sampling filters."""

    max_tokens: int = 16
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: Sequence[str] = ()
    logprobs: int | None = None


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
    done: bool = False  # its final output was sent


@dataclass
class _Running:
    """A request in a slot: its sampler state and the text shown so far."""

    request: _Request
    row: int
    generator: torch.Generator | None
    seen: torch.Tensor | None  # (1, vocab) bool, for the repetition penalty
    decoder: StreamDecoder
    text: str = ""
    shown: int = 0
    generated: int = 0
    next_token: int = 0


class Engine:
    """Continuous batching over `max_batch` cache slots of `max_len` tokens each (prompt + generated).

    `max_len` defaults to the model's context (max_position_embeddings minus meta tokens). `max_queue` bounds
    the waiting requests (`submit` raises `QueueFullError` beyond it). `cuda_graph` (default: on for CUDA)
    replays one captured decode step for the whole slot batch.
    """

    def __init__(self, model, tokenizer: HymbaTokenizer, max_batch: int = 8, max_len: int | None = None,
                 max_queue: int | None = None, prefill_chunk: int | None = None, cuda_graph: bool | None = None,
                 eos_token_id: int | list[int] | None = None):
        config = model.config
        limit = config.max_position_embeddings - config.num_memory_tokens
        max_len = max_len or limit
        if max_batch < 1:
            raise HymbaError(f"max_batch must be >= 1, got {max_batch}")
        if not 1 <= max_len <= limit:
            raise HymbaError(f"max_len must be in 1..{limit} (the model's context without meta tokens), got {max_len}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_len, self.max_queue, self.prefill_chunk = max_batch, max_len, max_queue, prefill_chunk
        self.device = model.device
        self.eos = frozenset(_eos_ids(model, eos_token_id))
        self.cache = HymbaCache(config, max_batch, max_len, device=self.device, dtype=model.dtype)
        self.scratch = HymbaCache(config, 1, max_len, device=self.device, dtype=model.dtype)
        # Every prompt starts with the same meta tokens: their state is computed once, and each prefill continues
        # from a copy of it (chunked prefill, the same function as one piece): num_memory_tokens fewer per request.
        self.meta = HymbaCache(config, 1, max_len, device=self.device, dtype=model.dtype)
        if config.num_memory_tokens:
            with torch.inference_mode():
                model(torch.empty(1, 0, dtype=torch.long, device=self.device), cache=self.meta)
        # Slots only ever decode: the state copied in at admission is what a prefill would have left.
        self.cache.started = True
        self._free_rows = list(range(max_batch - 1, -1, -1))  # a stack: low rows are reused first
        self._free_mask = torch.ones(max_batch, dtype=torch.bool, device=self.device)
        self._running: dict[int, _Running] = {}  # request id -> running request
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
        self._step_fn = lambda tokens: decode_step(model, self.cache, tokens)
        if (cuda_graph is None or cuda_graph) and self.device.type == "cuda":
            with torch.inference_mode():
                self._step_fn = CudaGraphDecoder(model, self.cache, max_batch)

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
            request = _Request(next(self._ids), prompt, params, on_output or (lambda output: None))
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
        for request in waiting:
            self.cancel(request.id)
        self.step()

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
        """Cancel, admit, decode once. Returns False when there was nothing to do."""
        with self._step_lock:
            with self._lock:
                cancelled, self._cancelled = self._cancelled, set()
            stopped = [self._running[i] for i in cancelled if i in self._running]
            for r in stopped:
                self._finish(r.request, r, Output(r.request.id, None, "", finish_reason="cancelled"))
            with self._lock:
                admitted = [self._waiting.popleft() for _ in range(min(len(self._free_rows), len(self._waiting)))]
            for request in admitted:
                self._guarded([request], self._admit, request)
            decoding = bool(self._running)
            if decoding:
                self._guarded([r.request for r in self._running.values()], self._decode)
            return bool(stopped or admitted or decoding)

    def _guarded(self, requests: list[_Request], fn, *args) -> None:
        """Run `fn`; if it raises (e.g. out of memory), end `requests` with an error instead of the scheduler."""
        try:
            fn(*args)
        except Exception as exc:  # any failure must reach the clients, not kill the thread
            message = f"{type(exc).__name__}: {exc}"
            for request in (r for r in requests if not r.done):
                self._finish(request, self._running.get(request.id),
                             Output(request.id, None, "", finish_reason="error", error=message))

    def _admit(self, request: _Request) -> None:
        self.scratch.copy_row_from(0, self.meta)
        self.scratch.started = self.meta.started
        ids = torch.tensor([request.prompt], dtype=torch.long, device=self.device)
        logits = prefill(self.model, self.scratch, ids, None, self.prefill_chunk)  # (1, vocab)
        params = request.params
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        seen = None
        if params.sampling.repetition_penalty != 1.0:
            seen = torch.zeros(1, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
            seen[0, ids[0]] = True
        decoder = StreamDecoder(self.tokenizer)
        # Seen after the prompt, the first new word keeps its leading space (as `complete` reads it). The decoder
        # looks back only to the start of its last emitted chunk, so the prompt's tail is enough; the flush takes
        # the prompt's own held-back text (a chat template's final "\n" is a byte token) out of the completion.
        decoder.push_many(request.prompt[-PROMPT_TAIL:])
        decoder.flush()
        running = _Running(request, self._free_rows.pop(), generator, seen, decoder)
        self._running[request.id] = running  # from here on a failure frees the row (see _guarded)
        self.cache.copy_row_from(running.row, self.scratch)
        self._free_mask[running.row] = False
        with self._lock:
            self._prompt_tokens += len(request.prompt)
        self._accept([running], logits)

    def _decode(self) -> None:
        running = list(self._running.values())
        tokens = torch.zeros(self.max_batch, dtype=torch.long)
        for r in running:
            tokens[r.row] = r.next_token
        # Free rows restart at position 0 every step, so their garbage never runs past the end of the buffer.
        self.cache.next_position.masked_fill_(self._free_mask, 0)
        logits = self._step_fn(tokens.to(self.device))  # (max_batch, vocab)
        rows = torch.tensor([r.row for r in running], device=self.device)
        self._accept(running, logits[rows])

    def _accept(self, running: list[_Running], logits: torch.Tensor) -> None:
        """Sample each request's next token from its logits row (len(running), vocab) and hand it on."""
        chosen = logits.argmax(dim=-1)  # greedy rows need nothing else, and it costs one op for all
        for i, r in enumerate(running):
            sampling = r.request.params.sampling
            if sampling.do_sample or r.seen is not None:
                row_logits = logits[i:i + 1]
                if r.seen is not None:
                    row_logits = apply_repetition_penalty(row_logits, r.seen, sampling.repetition_penalty)
                chosen[i] = sample(row_logits, sampling, r.generator)[0]
                if r.seen is not None:
                    r.seen[0, chosen[i]] = True
        want = [i for i, r in enumerate(running) if r.request.params.logprobs is not None]
        logprobs: dict[int, TokenLogprob] = {}
        if want:
            top_k = max(running[i].request.params.logprobs for i in want)
            logp = torch.log_softmax(logits[want].float(), dim=-1)
            picked = logp.gather(1, chosen[want, None])[:, 0].tolist()
            top = logp.topk(max(top_k, 1), dim=-1)
            top_values, top_ids = top.values.tolist(), top.indices.tolist()
            for j, i in enumerate(want):
                k = running[i].request.params.logprobs
                logprobs[i] = TokenLogprob(int(chosen[i]), picked[j], list(zip(top_ids[j][:k], top_values[j][:k])))
        tokens = chosen.tolist()  # the one host sync of a step
        now = time.monotonic()
        with self._lock:
            self._generated_tokens += len(tokens)
            self._recent.append((now, len(tokens)))
            while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
                self._recent.popleft()
        for i, (r, token) in enumerate(zip(running, tokens)):
            self._advance(r, token, logprobs.get(i))

    def _advance(self, r: _Running, token: int, logprob: TokenLogprob | None) -> None:
        """Append one token to a request: detokenize, check EOS / stop strings / length, emit, maybe finish."""
        params = r.request.params
        r.generated += 1
        finish = None
        if token in self.eos:
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
            r.next_token = token
            self._emit(r.request, Output(r.request.id, token, text, logprob))
            return
        text = trim_completion(r.text + r.decoder.flush(), params.stop)[r.shown:]
        self._finish(r.request, r, Output(r.request.id, token, text, logprob, finish_reason=finish))

    def _finish(self, request: _Request, running: _Running | None, output: Output) -> None:
        if running is not None:
            del self._running[request.id]
            self.cache.reset_rows([running.row])
            self._free_mask[running.row] = True
            self._free_rows.append(running.row)
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
