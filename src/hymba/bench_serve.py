"""`hymba bench serve`: the continuous-batching engine under load, against static `generate` batches in the same
process.

The load: `--requests` random prompts of `--prompt-len` tokens (or of lengths uniform from `--prompt-len-min` up
to it, as real traffic has; groups then pad), each asking for `--output-len` new tokens (EOS
off, so every request runs to its length), on a model with random weights (nothing downloaded). Arrivals are all
at once (`--arrivals all`) or Poisson (`--arrivals poisson`) at `--rate` requests/s, by default 70% of the capacity
the all-at-once run measured (that run then goes first). The engine runs its scheduler thread as `hymba serve` does;
with `--http` the same load goes through the OpenAI-compatible server on loopback with the `openai` client.

Reported per run: output tok/s, total tok/s (prompt + output), time to first token p50/p90/p99, time per output
token p50/p90 (per request: (last token - first token) / (tokens - 1), as vLLM's benchmark counts it), the
inter-token latency p50/p90 (every gap between a request's successive tokens: the p50 is the steady step), and the
mean number of rows decoding per step. The baseline is the same requests as static `model.generate` batches of
`--slots` rows (what a user without the engine would run), timed in the same process, with the ratio, and the
static decode step time at the batch the Poisson run kept (for its time-per-token target).
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hymba.errors import HymbaError


@dataclass
class ServeLoad:
    requests: int
    prompt_len: int  # the longest prompt; each is exactly this long unless prompt_len_min is set
    output_len: int
    slots: int
    arrivals: str = "all"  # or "poisson"
    rate: float | None = None  # requests/s for poisson; None: 70% of the measured capacity
    seed: int = 0
    prompt_len_min: int | None = None  # prompt lengths uniform in [prompt_len_min, prompt_len]; None: all prompt_len


@dataclass
class ServeResult:
    name: str
    requests: int
    seconds: float
    output_tok_s: float
    total_tok_s: float
    ttft_s: dict[str, float] = field(default_factory=dict)  # p50, p90, p99, mean
    tpot_ms: dict[str, float] = field(default_factory=dict)  # p50, p90, mean
    itl_ms: dict[str, float] = field(default_factory=dict)  # gaps between a request's successive tokens: p50, p90, mean
    mean_decode_rows: float | None = None
    rate: float | None = None
    engine_seconds: dict[str, float] = field(default_factory=dict)  # the scheduler thread's time, by part


def percentiles(values: list[float], points=(50, 90, 99)) -> dict[str, float]:
    """Nearest-rank percentiles and the mean; empty input gives an empty dict."""
    if not values:
        return {}
    ordered = sorted(values)
    out = {f"p{p}": ordered[min(len(ordered) - 1, max(0, -(-p * len(ordered) // 100) - 1))] for p in points}
    out["mean"] = statistics.fmean(ordered)
    return out


def random_prompts(load: ServeLoad, vocab_size: int) -> list[list[int]]:
    rng = random.Random(load.seed)
    shortest = load.prompt_len if load.prompt_len_min is None else load.prompt_len_min
    return [[rng.randrange(3, vocab_size - 1) for _ in range(rng.randint(shortest, load.prompt_len))]
            for _ in range(load.requests)]


def arrival_offsets(load: ServeLoad, rate: float | None) -> list[float]:
    """Seconds after the start at which each request arrives."""
    if load.arrivals == "all":
        return [0.0] * load.requests
    rng = random.Random(load.seed + 1)
    t, offsets = 0.0, []
    for _ in range(load.requests):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


class _Timeline:
    """Per-request token times, filled from the engine's output callbacks."""

    def __init__(self, n: int):
        self.submitted = [0.0] * n
        self.times: list[list[float]] = [[] for _ in range(n)]
        self.left = n
        self.done = threading.Event()
        self.lock = threading.Lock()

    def on_output(self, index: int, output) -> None:
        now = time.perf_counter()
        if output.token_id is not None:
            self.times[index].append(now)
        if output.error:
            raise HymbaError(f"request {index} failed in the benchmark: {output.error}")
        if output.finish_reason is not None:
            with self.lock:
                self.left -= 1
                if not self.left:
                    self.done.set()

    def result(self, name: str, load: ServeLoad, start: float, rate: float | None, prompt_tokens: int) -> ServeResult:
        end = max(t[-1] for t in self.times)
        produced = sum(len(t) for t in self.times)
        seconds = end - start
        ttft = [t[0] - s for t, s in zip(self.times, self.submitted)]
        tpot = [(t[-1] - t[0]) / (len(t) - 1) * 1e3 for t in self.times if len(t) > 1]
        gaps = [(b - a) * 1e3 for t in self.times for a, b in zip(t, t[1:])]
        return ServeResult(name, load.requests, seconds, produced / seconds,
                           (produced + prompt_tokens) / seconds, percentiles(ttft),
                           percentiles(tpot, (50, 90)), percentiles(gaps, (50, 90)), rate=rate)


def drive_engine(engine, prompts: list[list[int]], load: ServeLoad, offsets: list[float], name: str,
                 rate: float | None) -> ServeResult:
    """Submit the load to a running engine at its arrival times and wait for every request to finish."""
    from hymba.engine import GenerationParams

    timeline = _Timeline(len(prompts))
    params = GenerationParams(max_tokens=load.output_len)
    engines = getattr(engine, "engines", [engine])  # `Replicas` hold several

    def counters():
        seconds: dict[str, float] = {}
        for e in engines:
            for part, t in e.seconds.items():
                seconds[part] = seconds.get(part, 0.0) + t
        return sum(e.decode_rows_total for e in engines), sum(e.decode_steps_total for e in engines), seconds

    rows_before, steps_before, seconds_before = counters()
    start = time.perf_counter()
    for i, (prompt, offset) in enumerate(zip(prompts, offsets)):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        timeline.submitted[i] = time.perf_counter()
        engine.submit(prompt, params, lambda out, i=i: timeline.on_output(i, out))
    timeline.done.wait()
    result = timeline.result(name, load, start, rate, sum(map(len, prompts)))
    rows, steps, seconds = counters()
    result.engine_seconds = {part: round(t - seconds_before.get(part, 0.0), 3) for part, t in seconds.items()}
    steps -= steps_before
    result.mean_decode_rows = (rows - rows_before) / steps if steps else None  # per engine
    return result


def drive_http(engine, model_name: str, prompts: list[list[int]], load: ServeLoad, offsets: list[float],
               rate: float | None) -> ServeResult:
    """The same load through `hymba serve`'s app on loopback, streamed with the `openai` client."""
    import asyncio
    import socket

    import uvicorn
    from openai import AsyncOpenAI

    from hymba.serve.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, model_name), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    timeline = _Timeline(len(prompts))

    async def one(client, i: int, prompt: list[int], at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        timeline.submitted[i] = time.perf_counter()
        stream = await client.completions.create(model=model_name, prompt=prompt, max_tokens=load.output_len,
                                                 temperature=0, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text is not None:
                timeline.times[i].append(time.perf_counter())

    async def main() -> float:
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                             timeout=3600)
        start = time.perf_counter()
        await asyncio.gather(*(one(client, i, p, start + o) for i, (p, o) in enumerate(zip(prompts, offsets))))
        await client.close()
        return start

    try:
        start = asyncio.run(main())
    finally:
        server.should_exit = True
        thread.join()
    # A streamed chunk carries text, not always exactly one token: count tokens as the load asked for.
    result = timeline.result("engine over HTTP", load, start, rate, sum(map(len, prompts)))
    produced = load.requests * load.output_len
    result.output_tok_s = produced / result.seconds
    result.total_tok_s = (produced + sum(map(len, prompts))) / result.seconds
    return result


def static_generate(model, prompts: list[list[int]], load: ServeLoad, device) -> ServeResult:
    """The same requests as static `generate` batches of `slots` rows, one after the other."""
    import torch

    from hymba.generate import left_pad, pad_token_id

    start = time.perf_counter()
    for i in range(0, len(prompts), load.slots):
        ids, mask = left_pad(prompts[i:i + load.slots], pad_token_id(model.config), device)
        model.generate(ids, mask, max_new_tokens=load.output_len, eos_token_id=[])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    produced = len(prompts) * load.output_len
    return ServeResult("static generate", len(prompts), seconds, produced / seconds,
                       (produced + sum(map(len, prompts))) / seconds)


def static_step_ms(model, batch: int, context: int, device, steps: int = 32) -> float:
    """Milliseconds per decode step of static `generate` at `batch` rows: the difference between a run of
    1 + `steps` new tokens and one of 1, over `steps`."""
    import torch

    ids = torch.randint(3, model.config.vocab_size - 1, (batch, context), device=device)

    def run(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, eos_token_id=[])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    run(steps + 1)  # warm-up: captures (and compiles) this bucket
    return (min(run(steps + 1) for _ in range(2)) - min(run(1) for _ in range(2))) / steps * 1e3


def run_serve_bench(args: argparse.Namespace) -> int:
    import torch

    from hymba.bench import build_engine_model, device_name
    from hymba.checkpoint import resolve_dtype
    from hymba.config import HymbaConfig
    from hymba.engine import Engine, Replicas
    from hymba.generate import decode_runner
    from hymba.tokenizer import HymbaTokenizer

    if args.devices and args.device:
        raise HymbaError("give --device or --devices, not both")
    if args.devices:
        from hymba.serve.cli import parse_devices

        devices = [torch.device(d) for d in parse_devices(args.devices)]
    else:
        devices = [torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))]
    device = devices[0]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HymbaError(f"--device {args.device} asked for, but PyTorch sees no CUDA device; use --device cpu")
    gpu = device.type == "cuda"
    for flag in ("requests", "prompt_len", "prompt_len_min", "output_len", "slots", "max_prefill_rows"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise HymbaError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.rate is not None and args.rate <= 0:
        raise HymbaError("--rate must be > 0 requests/s")
    load = ServeLoad(requests=args.requests or (256 if gpu else 8), prompt_len=args.prompt_len or (512 if gpu else 16),
                     output_len=args.output_len or (256 if gpu else 8), slots=args.slots or (64 if gpu else 4),
                     arrivals=args.arrivals, rate=args.rate, seed=args.seed, prompt_len_min=args.prompt_len_min)
    if load.prompt_len_min is not None and load.prompt_len_min > load.prompt_len:
        raise HymbaError(f"--prompt-len-min ({load.prompt_len_min}) must be <= --prompt-len ({load.prompt_len})")
    config = HymbaConfig.preset(args.model or ("hymba-1.5b" if gpu else "tiny"))
    if load.prompt_len + load.output_len + config.num_memory_tokens > config.max_position_embeddings:
        raise HymbaError(f"--prompt-len + --output-len exceed the model's {config.max_position_embeddings} positions")
    dtype = resolve_dtype(args.dtype or ("bfloat16" if gpu else "float32"))
    torch.manual_seed(args.seed)
    models = [build_engine_model(config, d, dtype, args.seed) for d in devices]
    model = models[0]  # the static baseline's
    tokenizer = HymbaTokenizer.from_pretrained()

    def note(line: str) -> None:
        print(f"  {line}", file=sys.stderr, flush=True)

    # The engine's cache is sized as generate sizes its own (`decode_runner`), so both share compiled steps.
    max_len = decode_runner(model, load.slots, load.prompt_len + load.output_len, compile=not args.no_compile).max_len
    note(f"starting {len(models)} engine(s): {load.slots} slots of {max_len} tokens each")
    engines = [Engine(m, tokenizer, max_batch=load.slots, max_len=max_len, eos_token_id=[],
                      compile=not args.no_compile, cuda_graph=not args.no_cuda_graph,
                      max_batch_tokens=args.max_batch_tokens, max_prefill_rows=args.max_prefill_rows,
                      prefill_chunk=args.prefill_chunk,
                      prefill_wait_s=args.prefill_wait, prefill_graphs=not args.no_prefill_graphs, progress=note)
               for m in models]
    engine = engines[0] if len(engines) == 1 else Replicas(engines)
    prompts = random_prompts(load, config.vocab_size)
    results: list[ServeResult] = []
    with engine:
        warm = ServeLoad(min(load.requests, load.slots), load.prompt_len, 2, load.slots)
        note("warming up the engine (prefill shapes)")
        drive_engine(engine, prompts[:warm.requests], warm, [0.0] * warm.requests, "warm-up", None)
        rate = load.rate
        if load.arrivals == "all" or rate is None:
            note(f"all at once: {load.requests} requests")
            results.append(drive_engine(engine, prompts, load, [0.0] * load.requests, "engine, all at once", None))
            rate = rate or 0.7 * load.requests / results[-1].seconds
        poisson = None
        if load.arrivals == "poisson":
            note(f"poisson arrivals at {rate:.2f} requests/s")
            poisson = drive_engine(engine, prompts, load, arrival_offsets(load, rate),
                                   f"engine, poisson {rate:.1f} req/s", rate)
            results.append(poisson)
        if args.http:
            note("the same load over HTTP")
            results.append(drive_http(engine, "bench", prompts, load,
                                      arrival_offsets(load, rate) if load.arrivals == "poisson"
                                      else [0.0] * load.requests, rate if load.arrivals == "poisson" else None))
    note(f"static generate in batches of {load.slots}")
    static_generate(model, prompts[:load.slots], ServeLoad(load.slots, load.prompt_len, 2, load.slots), device)
    baseline = static_generate(model, prompts, load, device)
    step_ms = None
    if poisson is not None and poisson.mean_decode_rows:
        batch = max(1, round(poisson.mean_decode_rows))
        note(f"static decode step at batch {batch}")
        step_ms = static_step_ms(model, batch, load.prompt_len, device)
    report = dict(device=device_name(device) if gpu else f"CPU ({platform.machine()})",
                  torch_version=torch.__version__, dtype=str(dtype).removeprefix("torch."),
                  devices=[str(d) for d in devices], model=args.model or config_name(gpu), load=asdict(load),
                  compile=not args.no_compile and gpu,
                  cuda_graph=not args.no_cuda_graph and gpu, max_batch_tokens=args.max_batch_tokens,
                  prefill_chunk=args.prefill_chunk, prefill_wait_s=args.prefill_wait,
                  prefill_graphs=engines[0].prefill_graphs is not None,
                  results=[asdict(r) for r in results], static=asdict(baseline), static_step_ms=step_ms)
    print(format_report(report))
    if args.json:
        from hymba.bench import write_json_atomic

        write_json_atomic(Path(args.json), report)
        print(f"wrote {args.json}")
    return 0


def prompt_lengths(load: dict[str, Any]) -> str:
    if load.get("prompt_len_min") is None:
        return str(load["prompt_len"])
    return f"{load['prompt_len_min']}-{load['prompt_len']}"


def config_name(gpu: bool) -> str:
    return "hymba-1.5b" if gpu else "tiny"


def format_report(report: dict[str, Any]) -> str:
    load = report["load"]
    lines = [f"hymba bench serve on {report['device']}, torch {report['torch_version']}, {report['dtype']}, "
             f"{report['model']} (random weights), {load['requests']} requests x ({prompt_lengths(load)} prompt + "
             f"{load['output_len']} new), {load['slots']} slots, compiled step: {'yes' if report['compile'] else 'no'}",
             "",
             "| run | output tok/s | total tok/s | vs static | TTFT p50 / p90 / p99 (s) | TPOT p50 / p90 (ms) "
             "| ITL p50 / p90 (ms) | rows/step |",
             "|---|---:|---:|---:|---|---|---|---:|"]
    static = report["static"]

    def cells(r: dict[str, Any]) -> str:
        ttft, tpot = r["ttft_s"], r["tpot_ms"]
        ttft_cell = " / ".join(f"{ttft[p]:.3f}" for p in ("p50", "p90", "p99")) if ttft else "-"
        tpot_cell, itl_cell = (" / ".join(f"{ms[p]:.2f}" for p in ("p50", "p90")) if ms else "-"
                               for ms in (tpot, r.get("itl_ms")))
        rows = f"{r['mean_decode_rows']:.1f}" if r.get("mean_decode_rows") else "-"
        return (f"| {r['name']} | {r['output_tok_s']:,.0f} | {r['total_tok_s']:,.0f} | "
                f"{r['output_tok_s'] / static['output_tok_s']:.2f} | {ttft_cell} | {tpot_cell} | {itl_cell} | {rows} |")

    lines += [cells(r) for r in report["results"]]
    if len(report["devices"]) > 1:
        lines.append(f"| (the engine rows: {len(report['devices'])} replicas, one per device; static generate: one "
                     "device) | | | | | | | |")
    splits = [f"{r['name']}: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["engine_seconds"].items())
              for r in report["results"] if r.get("engine_seconds")]
    lines.append(f"| static generate, batches of {load['slots']} | {static['output_tok_s']:,.0f} | "
                 f"{static['total_tok_s']:,.0f} | 1.00 | - | - | - | - |")
    if splits:
        lines += ["", "engine host time by part: " + "; ".join(splits)]
    if report.get("static_step_ms"):
        lines.append(f"\nstatic decode step at the Poisson run's batch: {report['static_step_ms']:.2f} ms "
                     f"(time per output token target: <= {2 * report['static_step_ms']:.2f} ms)")
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    """Register `hymba bench serve` (under `hymba bench`, whose own options keep measuring the decode step)."""
    parser = subparsers.add_parser(
        "serve", help="the serving engine under load vs static generate (random weights)",
        description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--requests", type=int, help="requests in the load (default 256 on GPU, 8 on CPU)")
    parser.add_argument("--prompt-len", type=int, help="prompt tokens per request (default 512 on GPU, 16 on CPU)")
    parser.add_argument("--prompt-len-min", type=int,
                        help="draw each prompt's length uniformly from this up to --prompt-len (default: all equal)")
    parser.add_argument("--output-len", type=int, help="new tokens per request (default 256 on GPU, 8 on CPU)")
    parser.add_argument("--slots", type=int, help="engine slots = static batch (default 64 on GPU, 4 on CPU)")
    parser.add_argument("--arrivals", choices=["all", "poisson"], default="all",
                        help="all requests at once (default), or Poisson arrivals at --rate")
    parser.add_argument("--rate", type=float,
                        help="Poisson arrival rate in requests/s (default: 70%% of the capacity an all-at-once run "
                             "measures first)")
    parser.add_argument("--http", action="store_true",
                        help="also run the load through `hymba serve` on loopback with the openai client")
    parser.add_argument("--model", help="model shape preset (default hymba-1.5b on GPU, tiny on CPU)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--devices", help="comma-separated devices: one engine replica on each, behind one router, as "
                                          "`hymba serve --devices` runs them (static generate runs on the first)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--max-batch-tokens", type=int, default=65536,
                        help="prompt tokens one prefill forward may take (default 65536)")
    parser.add_argument("--max-prefill-rows", type=int, help="prompts one prefill forward may take (default: --slots)")
    parser.add_argument("--prefill-chunk", type=int, default=2048, help="tokens per prefill piece (default 2048)")
    parser.add_argument("--prefill-wait", type=float, default=0.0,
                        help="seconds a group that is not full may wait for more arrivals while others decode")
    parser.add_argument("--no-compile", action="store_true", help="capture the eager decode step (no torch.compile)")
    parser.add_argument("--no-cuda-graph", action="store_true", help="run the decode step eagerly on CUDA")
    parser.add_argument("--no-prefill-graphs", action="store_true",
                        help="run small groups' prefill forwards eagerly instead of replaying CUDA graphs of them")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, prompts and arrivals")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.set_defaults(func=run_serve_bench)

