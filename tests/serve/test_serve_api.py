"""The OpenAI-compatible API, driven by the official `openai` client against a live server on 127.0.0.1.

Greedy answers must equal offline `generate` for the same prompt, through streaming and not, completions and
chat, alone and under a 200-request load from 32 threads; bad input gets OpenAI-style 400s, a full queue 429.
"""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from hymba.config import HymbaConfig  # noqa: E402
from hymba.engine import Engine, GenerationParams  # noqa: E402
from hymba.generate import _eos_ids, generate, trim_completion  # noqa: E402
from hymba.generate_cli import default_model_dir, load_model_and_tokenizer  # noqa: E402
from hymba.model import HymbaForCausalLM  # noqa: E402
from hymba.serve.app import create_app  # noqa: E402
from hymba.tokenizer import default_tokenizer_dir  # noqa: E402

NAME = "hymba-test"
TEXTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,", "Hello",
         "In the beginning God created the heaven and the earth.", "Q: What is two plus two?\nA:", "Dear Sir,"]
MAX_TOKENS = 9  # the longest answer any test asks for


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The model shipped in the package once it exists, else a random tiny one."""
    if (default_model_dir() / "config.json").is_file():
        return default_model_dir()
    torch.manual_seed(0)
    model = HymbaForCausalLM(HymbaConfig.preset("tiny"))
    model.init_weights()
    path = tmp_path_factory.mktemp("tiny-serve")
    model.save_pretrained(path, copy_side_files_from=default_tokenizer_dir())
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    model, tokenizer = load_model_and_tokenizer(str(checkpoint), "cpu", "float32")
    # A short context keeps CPU decode steps cheap: every step attends over the whole slot.
    context = min(256, model.config.max_position_embeddings - model.config.num_memory_tokens)
    engine = Engine(model, tokenizer, max_batch=16, max_len=context, max_queue=256).start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held from here on: no race with other processes
    uv = uvicorn.Server(uvicorn.Config(create_app(engine, NAME), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield base, engine
    uv.should_exit = True
    thread.join(timeout=10)
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline(server):
    """Greedy (text, finish_reason) of offline `generate` for prompt ids and max_tokens, as the API must answer."""
    engine = server[1]
    model, tokenizer = engine.model, engine.tokenizer
    eos, runs = set(_eos_ids(model, None)), {}

    def answer(ids: list[int], max_tokens: int, stop: tuple[str, ...] = ()) -> tuple[str, str]:
        if tuple(ids) not in runs:
            with torch.no_grad():
                runs[tuple(ids)] = generate(model, [ids], max_new_tokens=MAX_TOKENS)[0, len(ids):].tolist()
        new = runs[tuple(ids)][:max_tokens]
        ended = next((i for i, t in enumerate(new) if t in eos), None)
        kept = new if ended is None else new[:ended]
        text = tokenizer.decode(ids + kept)[len(tokenizer.decode(ids)):]  # as `complete`: read after the prompt
        stopped = ended is not None or any(s in text for s in stop)
        return trim_completion(text, stop), "stop" if stopped else "length"

    def completion(text: str, max_tokens: int) -> tuple[str, str]:
        return answer(tokenizer.encode(text), max_tokens)

    def chat(text: str, max_tokens: int) -> tuple[str, str]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        return answer(ids, max_tokens, ("<extra_id_1>",))

    return completion, chat


def finished(base: str, reason: str) -> int:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(f'hymba_requests_finished_total{{reason="{reason}"}}'):
            return int(float(line.split()[-1]))
    return 0


def test_completions_greedy_equal_offline(client, offline):
    completion, _ = offline
    for text in TEXTS[:3]:
        expected, reason = completion(text, 7)
        out = client.completions.create(model=NAME, prompt=text, max_tokens=7, temperature=0)
        assert out.choices[0].text == expected and out.choices[0].finish_reason == reason
        assert out.usage.completion_tokens <= 7 and out.object == "text_completion"
        chunks = list(client.completions.create(model=NAME, prompt=text, max_tokens=7, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == reason
    # Several prompts x n choices in one request, with log-probabilities.
    out = client.completions.create(model=NAME, prompt=TEXTS[3:5], max_tokens=5, temperature=0, n=2, logprobs=2)
    assert [c.text for c in out.choices] == [completion(t, 5)[0] for t in TEXTS[3:5] for _ in range(2)]
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == out.usage.completion_tokens // 4
    assert all(len(top) == 2 and max(top.values()) == pytest.approx(p) for top, p in zip(lp.top_logprobs,
                                                                                         lp.token_logprobs))


def test_chat_greedy_equals_offline(client, offline):
    _, chat = offline
    for text in TEXTS[3:6]:
        expected, reason = chat(text, 9)
        messages = [{"role": "user", "content": text}]
        out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=9, temperature=0)
        assert out.choices[0].message.content == expected and out.choices[0].finish_reason == reason
        assert out.choices[0].message.role == "assistant" and out.object == "chat.completion"
        chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=9, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                         temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(
        t.logprob) for t in content)


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(model=NAME, prompt=TEXTS[0], max_tokens=10, temperature=0.9, top_p=0.95, seed=1234)
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first
    assert client.completions.create(**{**kwargs, "n": 2}).choices[0].text == first  # choice i uses seed + i


def test_load_200_requests_from_32_threads(server, client, offline):
    base, _ = server
    completion, chat = offline
    before = finished(base, "length") + finished(base, "stop")

    def one(i: int) -> bool:
        text, max_tokens, stream = TEXTS[i % len(TEXTS)], 2 + 2 * (i % 3), i % 4 >= 2
        if i % 2:
            messages = [{"role": "user", "content": text}]
            out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=max_tokens,
                                                 temperature=0, stream=stream)
            got = ("".join(c.choices[0].delta.content or "" for c in out) if stream
                   else out.choices[0].message.content)
            return got == chat(text, max_tokens)[0]
        out = client.completions.create(model=NAME, prompt=text, max_tokens=max_tokens, temperature=0, stream=stream)
        got = "".join(c.choices[0].text for c in out) if stream else out.choices[0].text
        return got == completion(text, max_tokens)[0]

    for text in TEXTS:  # the offline answers first, so the load runs against the server alone
        completion(text, MAX_TOKENS), chat(text, MAX_TOKENS)
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(200)))
    assert all(results), f"{results.count(False)} of 200 answers differ from offline generate"
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    assert finished(base, "length") + finished(base, "stop") - before == 200


@pytest.mark.parametrize("body, param", [
    ('{"model": "hymba-test", "prompt": "x",', None),  # malformed JSON
    ('["not", "an", "object"]', None),
    ('{"model": "hymba-test", "prompt": "x", "frobnicate": 1}', "frobnicate"),  # unknown field
    ('{"model": "hymba-test", "prompt": "x", "max_tokens": 0}', "max_tokens"),
    ('{"model": "hymba-test", "prompt": "x", "max_tokens": 1000000}', "max_tokens"),
    ('{"model": "hymba-test", "prompt": "LONG"}', "prompt"),  # longer than the context
    ('{"model": "hymba-test", "prompt": "x", "temperature": -0.5}', "temperature"),
    ('{"model": "hymba-test", "prompt": "x", "top_p": 0}', "top_p"),
    ('{"model": "hymba-test", "prompt": "x", "n": 0}', "n"),
    ('{"model": "hymba-test", "prompt": "x", "logprobs": 9}', "logprobs"),
    ('{"model": "hymba-test", "prompt": "x", "presence_penalty": 0.5}', "presence_penalty"),
    ('{"model": "hymba-test", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', "stop"),
    ('{"model": "hymba-test", "prompt": [[]]}', "prompt"),
    ('{"model": "hymba-test", "prompt": [99999999]}', "prompt"),
    ('{"model": "hymba-test"}', "prompt"),
    ('{"model": "hymba-test", "prompt": "x", "seed": 99999999999999999999999}', "seed"),  # past 64 bits: was 500
    ('{"model": "hymba-test", "prompt": "x", "max_tokens": true}', "max_tokens"),  # OpenAI rejects non-integers
    ('{"model": "hymba-test", "prompt": "x", "max_tokens": "10"}', "max_tokens"),
    ('{"model": "hymba-test", "prompt": "x", "max_tokens": 2.0}', "max_tokens"),
    ('{"model": "hymba-test", "prompt": "x", "temperature": "0.5"}', "temperature"),
    ('{"model": "hymba-test", "prompt": "x", "stream": "yes"}', "stream"),
    ('{"model": "hymba-test", "prompt": [1.0, 2.0]}', "prompt"),
    ('{"model": "hymba-test", "prompt": "\\ud800 x"}', "prompt"),  # a lone surrogate: the tokenizer failed (500)
    ('{"model": "hymba-test", "prompt": "x", "stop": ["\\udfff"]}', "stop"),
])
def test_bad_completion_requests_are_400(server, body, param):
    body = body.replace("LONG", "word " * server[1].max_len)
    response = httpx.post(server[0] + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi", "mood": "good"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 100000}, "max_tokens"),
])
def test_bad_chat_requests_are_400(server, client, body, param):
    response = httpx.post(server[0] + "/v1/chat/completions", json={"model": NAME, **body})
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, **body)


def test_unknown_model_and_route_are_404(server, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    response = httpx.get(server[0] + "/v1/engines")
    assert response.status_code == 404 and "error" in response.json()


def test_full_queue_is_429(server):
    engine = server[1]
    idle = Engine(engine.model, engine.tokenizer, max_batch=1, max_len=64, max_queue=2)  # no scheduler thread
    idle.submit([1, 2, 3], GenerationParams())
    with TestClient(create_app(idle, NAME)) as http:
        # n=2 needs two places but only one is left: refused whole, and the part already queued is withdrawn.
        response = http.post("/v1/completions", json={"model": NAME, "prompt": "x", "n": 2})
        assert response.status_code == 429 and response.json()["error"]["code"] == "queue_full"
        assert idle.stats().waiting == 1
        assert "hymba_requests_rejected_total 1" in http.get("/metrics").text


def test_disconnect_cancels_the_request(server):
    base, engine = server
    before = finished(base, "cancelled")
    # ignore_eos: both requests must still be running when the server notices the client left (EOS came at 45
    # tokens, 0.6 s, with the shipped model: the blocking request finished first on a fast CI machine).
    body = {"model": NAME, "prompt": "Once", "max_tokens": engine.max_len - 8, "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}) as response:
        next(response.iter_lines())  # the first chunk arrived: the request is running; now hang up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 20
    while finished(base, "cancelled") < before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert finished(base, "cancelled") == before + 2
    assert engine.stats().running == 0


def test_models_health_metrics(server, client):
    base, _ = server
    assert [m.id for m in client.models.list()] == [NAME]
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    metrics = httpx.get(base + "/metrics").text
    for name in ("hymba_requests_total", "hymba_generated_tokens_total", "hymba_generated_tokens_per_second",
                 "hymba_batch_occupancy", "hymba_queue_length", "hymba_running_requests"):
        assert f"# TYPE {name} " in metrics and any(line.startswith(name + " ") for line in metrics.splitlines())


def test_replicas_behind_one_server_answer_as_one_engine(server, offline):
    """`hymba serve --devices ...` runs one engine per device behind the app: answers and metrics as with one."""
    from hymba.engine import Replicas

    completion, _ = offline
    engine = server[1]
    replicas = Replicas([Engine(engine.model, engine.tokenizer, max_batch=2, max_len=64) for _ in range(2)])
    with replicas, TestClient(create_app(replicas, NAME)) as http:
        for text in TEXTS[:4]:
            body = http.post("/v1/completions", json={"model": NAME, "prompt": text, "max_tokens": 5,
                                                      "temperature": 0}).json()
            assert body["choices"][0]["text"] == completion(text, 5)[0]
        metrics = http.get("/metrics").text
    assert "hymba_requests_total 4" in metrics and 'hymba_requests_finished_total{reason="length"}' in metrics
    assert all(e.stats().requests_total > 0 for e in replicas.engines)
