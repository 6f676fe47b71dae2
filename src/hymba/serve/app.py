"""The OpenAI-compatible HTTP API on the continuous-batching `Engine` (FastAPI).

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent events in
OpenAI's chunk format, ending with `data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus text).

Handlers run on the asyncio loop and never touch the model: they validate, tokenize, submit one engine request
per choice and read the outputs, which the scheduler thread hands over with `loop.call_soon_threadsafe`. A
client that disconnects cancels its requests, which frees their slots at the next step. Errors use OpenAI's body,
`{"error": {"message", "type", "param", "code"}}`: 400 for bad input, 404 for an unknown model or route, 429 when
the engine's queue is full.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from hymba.engine import Engine, GenerationParams, Output, QueueFullError, RequestError, TokenLogprob
from hymba.errors import HymbaError
from hymba.generate import SamplingParams

# How often a non-streaming handler checks whether its client is still there.
DISCONNECT_POLL_S = 0.5
# OpenAI's limits where the API defines them.
MAX_STOP_STRINGS = 4
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20


# ---------------------------------------------------------------------------------------------- request bodies
def _unicode(text: str) -> str:
    # JSON may escape a lone surrogate ("\ud800"), which is no text: the tokenizer would fail on it (a 500).
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("holds a lone surrogate (\\ud800-\\udfff), which is not Unicode text") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class _Body(BaseModel):
    # Unknown fields are errors: a misspelt parameter must not be silently ignored. Strict types, as OpenAI's: no
    # "10" or true for an integer (pydantic would convert them); an integer is still a valid number.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by both endpoints; `top_k`, `min_p`, `repetition_penalty` and `ignore_eos` extend OpenAI's
    (as vLLM's do)."""

    model: str
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    presence_penalty: float | None = None  # accepted only as 0: not implemented
    frequency_penalty: float | None = None
    seed: int | None = Field(None, ge=-2**63, lt=2**63)  # choice i samples with seed + i: within torch's range
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)


# ---------------------------------------------------------------------------------------------- errors
class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body, status_code=error.status)


def _validation_error(exc: RequestValidationError) -> ApiError:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # OpenAI names the top-level parameter; the message keeps the full path (union members add their type name).
    param = loc[0] if loc else None
    message = first["msg"] if not loc else f"{'.'.join(loc)}: {first['msg']}"
    return ApiError(400, message, param=param)


# ---------------------------------------------------------------------------------------------- engine bridge
@dataclass
class _Choice:
    """What one choice has produced so far."""

    text: str = ""
    tokens: int = 0
    logprobs: list[tuple[TokenLogprob, int]] = field(default_factory=list)  # (log-prob, text offset)
    finish_reason: str | None = None
    error: str | None = None


class _Requests:
    """The engine requests behind one HTTP request (prompts x n choices), read as one asyncio stream."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        self.open: dict[int, int] = {}  # engine request id -> choice index, until it finishes

    def submit(self, jobs: list[tuple[list[int], GenerationParams]]) -> None:
        """All or nothing: if one is refused (full queue, bad request) the ones already queued are cancelled."""
        try:
            for index, (prompt, params) in enumerate(jobs):
                self.open[self.engine.submit(prompt, params, functools.partial(self._deliver, index))] = index
        except HymbaError:
            self.cancel()
            raise

    def _deliver(self, index: int, output: Output) -> None:  # runs on the scheduler thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, output))

    async def outputs(self) -> AsyncIterator[tuple[int, Output]]:
        while self.open:
            index, output = await self.queue.get()
            if output.finish_reason:
                self.open.pop(output.request_id, None)
            yield index, output

    def cancel(self) -> None:
        for request_id in self.open:
            self.engine.cancel(request_id)


def _record(choice: _Choice, output: Output) -> None:
    if output.logprob is not None:
        choice.logprobs.append((output.logprob, len(choice.text)))
    choice.text += output.text
    choice.tokens += output.token_id is not None
    choice.finish_reason = output.finish_reason or choice.finish_reason
    choice.error = output.error or choice.error


# ---------------------------------------------------------------------------------------------- the app
def create_app(engine: Engine, model_name: str) -> FastAPI:
    """The API over `engine` (whose scheduler thread the caller starts), serving it as `model_name`."""
    app = FastAPI(title="Hymba", description="OpenAI-compatible API for Hymba models")
    tokenizer = engine.tokenizer
    created = int(time.time())
    rejected = [0]  # requests refused with 429, for /metrics
    chat_turn_end = "<extra_id_1>" if "<extra_id_1>" in (tokenizer.chat_template or "") else None

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return _error_response(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    def token_text(token_id: int) -> str:
        return tokenizer.convert_ids_to_tokens(token_id).replace("\u2581", " ")

    def generation_params(body: _Sampling, max_tokens: int, logprobs: int | None, extra_stop: list[str]) -> list[
            GenerationParams]:
        """One `GenerationParams` per choice; with a seed, choice i samples with seed + i so the n choices differ."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise ApiError(400, f"{name} is not supported; leave it at 0 (repetition_penalty is)", param=name)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings", param="stop")
        temperature = 1.0 if body.temperature is None else body.temperature
        try:
            sampling = SamplingParams(do_sample=temperature > 0, temperature=temperature, top_k=body.top_k or 0,
                                      top_p=1.0 if body.top_p is None else body.top_p, min_p=body.min_p or 0.0,
                                      repetition_penalty=body.repetition_penalty or 1.0)
        except HymbaError as exc:
            raise ApiError(400, str(exc)) from None
        return [GenerationParams(max_tokens=max_tokens, sampling=sampling,
                                 seed=None if body.seed is None else body.seed + i, stop=stop + extra_stop,
                                 logprobs=logprobs, ignore_eos=body.ignore_eos) for i in range(body.n)]

    def check_model(body: _Sampling) -> None:
        if body.model != model_name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def submit(jobs: list[tuple[list[int], GenerationParams]]) -> _Requests:
        requests = _Requests(engine)
        try:
            requests.submit(jobs)
        except QueueFullError as exc:
            rejected[0] += 1
            raise ApiError(429, f"the server is busy ({exc})", type="rate_limit_error", code="queue_full") from None
        except RequestError as exc:
            raise ApiError(400, str(exc), param=exc.param) from None
        return requests

    async def respond(request: Request, requests: _Requests, stream: bool, num_choices: int,
                      prompt_tokens: int, chunk: Callable[[int, Output, _Choice, bool], dict | None],
                      final: Callable[[list[_Choice], dict], dict], include_usage: bool) -> Response:
        """Stream chunks (SSE) or wait for all choices and build one response; cancel on disconnect."""
        choices = [_Choice() for _ in range(num_choices)]

        def usage() -> dict:
            completion = sum(c.tokens for c in choices)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion}

        if stream:
            async def events() -> AsyncIterator[str]:
                started = [False] * num_choices
                try:
                    async for index, output in requests.outputs():
                        _record(choices[index], output)
                        if output.error:
                            yield f"data: {json.dumps(ApiError(500, output.error, type='server_error').body)}\n\n"
                            continue
                        body = chunk(index, output, choices[index], not started[index])
                        started[index] = True
                        if body is not None:
                            yield f"data: {json.dumps(body)}\n\n"
                    if include_usage:
                        yield f"data: {json.dumps(final([], usage()))}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    requests.cancel()  # a no-op once all are done; frees the slots of a client that left

            return StreamingResponse(events(), media_type="text/event-stream")

        async def collect() -> None:
            async for index, output in requests.outputs():
                _record(choices[index], output)

        task = asyncio.ensure_future(collect())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if not task.done() and await request.is_disconnected():
                    return Response(status_code=499)  # nobody is listening; the finally cancels the work
        finally:
            requests.cancel()
            task.cancel()
        failed = next((c.error for c in choices if c.error), None)
        if failed:
            raise ApiError(500, failed, type="server_error")
        return JSONResponse(final(choices, usage()))

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                                         "owned_by": "hymba", "max_model_len": engine.max_len}]})

    @app.get("/metrics")
    async def metrics() -> Response:
        s = engine.stats()
        lines = []

        def metric(name: str, kind: str, help: str, values: dict[str, float]) -> None:
            lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {value}" for labels, value in values.items())

        metric("hymba_requests_total", "counter", "Requests accepted by the engine.", {"": s.requests_total})
        metric("hymba_requests_finished_total", "counter", "Requests finished, by reason.",
               {f'{{reason="{r}"}}': n for r, n in sorted(s.finished_total.items())})
        metric("hymba_requests_rejected_total", "counter", "Requests refused because the queue was full.",
               {"": rejected[0]})
        metric("hymba_prompt_tokens_total", "counter", "Prompt tokens prefilled.", {"": s.prompt_tokens_total})
        metric("hymba_generated_tokens_total", "counter", "Tokens generated.", {"": s.generated_tokens_total})
        metric("hymba_generated_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
               {"": round(s.tokens_per_second, 3)})
        metric("hymba_running_requests", "gauge", "Requests in a batch slot.", {"": s.running})
        metric("hymba_batch_occupancy", "gauge", "Fraction of batch slots in use.", {"": s.running / s.max_batch})
        metric("hymba_queue_length", "gauge", "Requests waiting for a slot.", {"": s.waiting})
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body)
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "prompt: give at least one prompt", param="prompt")
        prompts = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
        jobs = [(ids, params) for ids in prompts
                for params in generation_params(body, body.max_tokens or 16, body.logprobs, [])]
        requests = submit(jobs)
        response_id, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def logprobs(entries: list[tuple[TokenLogprob, int]]) -> dict | None:
            if body.logprobs is None:
                return None
            return {"tokens": [token_text(lp.token_id) for lp, _ in entries],
                    "token_logprobs": [lp.logprob for lp, _ in entries],
                    "top_logprobs": [{token_text(t): v for t, v in lp.top} for lp, _ in entries],
                    "text_offset": [offset for _, offset in entries]}

        def envelope(choices: list[dict]) -> dict:
            return {"id": response_id, "object": "text_completion", "created": now, "model": model_name,
                    "choices": choices}

        def chunk(index: int, output: Output, choice: _Choice, first: bool) -> dict | None:
            if not output.text and output.logprob is None and output.finish_reason is None:
                return None
            entries = choice.logprobs[-1:] if output.logprob is not None else []
            return envelope([{"index": index, "text": output.text, "logprobs": logprobs(entries),
                              "finish_reason": output.finish_reason}])

        def final(choices: list[_Choice], usage: dict) -> dict:
            return envelope([{"index": i, "text": c.text, "logprobs": logprobs(c.logprobs),
                              "finish_reason": c.finish_reason} for i, c in enumerate(choices)]) | {"usage": usage}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await respond(request, requests, body.stream, len(jobs), sum(len(p) for p in prompts), chunk, final,
                             include_usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body)
        if tokenizer.chat_template is None:
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions")
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) or m.content is None else "".join(
                         part.text for part in m.content)} for m in body.messages]
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except HymbaError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens or max(engine.max_len - len(ids), 1)
        top = body.top_logprobs or 0
        jobs = [(ids, p) for p in generation_params(body, max_tokens, top if body.logprobs else None,
                                                    [chat_turn_end] if chat_turn_end else [])]
        requests = submit(jobs)
        response_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def entry(token_id: int, logprob: float) -> dict:
            text = token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        def logprobs(entries: list[tuple[TokenLogprob, int]]) -> dict | None:
            if not body.logprobs:
                return None
            return {"content": [entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]}
                                for lp, _ in entries]}

        def envelope(kind: str, choices: list[dict]) -> dict:
            return {"id": response_id, "object": kind, "created": now, "model": model_name, "choices": choices}

        def chunk(index: int, output: Output, choice: _Choice, first: bool) -> dict | None:
            if not (first or output.text or output.logprob is not None or output.finish_reason):
                return None
            delta = ({"role": "assistant"} if first else {}) | ({"content": output.text} if output.text or first
                                                               else {})
            entries = choice.logprobs[-1:] if output.logprob is not None else []
            return envelope("chat.completion.chunk", [{"index": index, "delta": delta, "logprobs": logprobs(entries),
                                                       "finish_reason": output.finish_reason}])

        def final(choices: list[_Choice], usage: dict) -> dict:
            if not choices:  # the usage chunk that ends a stream
                return envelope("chat.completion.chunk", []) | {"usage": usage}
            return envelope("chat.completion", [
                {"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": logprobs(c.logprobs),
                 "finish_reason": c.finish_reason} for i, c in enumerate(choices)]) | {"usage": usage}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await respond(request, requests, body.stream, len(jobs), len(ids), chunk, final, include_usage)

    return app
