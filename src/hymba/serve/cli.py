"""`hymba serve`: load a checkpoint, start the engine's scheduler thread, serve the OpenAI-compatible API."""

from __future__ import annotations

import argparse
import sys

from hymba.errors import HymbaError


def run_serve(args: argparse.Namespace) -> int:
    """Serve until interrupted (Ctrl-C or SIGTERM); unfinished requests are cancelled on the way out."""
    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue),
                        ("--max-context", 1 if args.max_context is None else args.max_context),
                        ("--max-batch-tokens", args.max_batch_tokens), ("--prefill-chunk", args.prefill_chunk),
                        ("--max-prefill-rows", 1 if args.max_prefill_rows is None else args.max_prefill_rows)):
        if value < 1:
            raise HymbaError(f"{flag} must be positive, got {value}")
    if not 0 <= args.prefill_wait < 60:
        raise HymbaError(f"--prefill-wait is in seconds, from 0 to 60; got {args.prefill_wait}")
    if not 0 <= args.port <= 65535:
        raise HymbaError(f"--port {args.port} is not a TCP port; use 1-65535 (0 picks a free one)")
    try:
        import uvicorn

        from hymba.serve.app import create_app
    except ImportError as exc:
        raise HymbaError(f"hymba serve needs FastAPI and uvicorn ({exc.name} is missing); "
                         "install them with: pip install 'hymba[serve]'") from None
    from hymba.engine import Engine, Replicas
    from hymba.generate_cli import load_model_and_tokenizer

    devices = parse_devices(args.devices) if args.devices else [args.device]
    if args.devices and args.device:
        raise HymbaError("give --device or --devices, not both")
    engines = []
    for device in devices:
        model, tokenizer = load_model_and_tokenizer(args.model, device, args.dtype)
        if model.device.type == "cuda":
            print(f"hymba serve: on {model.device}, {'compiling and ' if args.compile else ''}capturing the decode "
                  f"step for each batch size up to {args.max_batch}" + (
                      " (about a minute each the first time, seconds once inductor's cache holds them; "
                      "--no-compile skips compiling)" if args.compile else ""), file=sys.stderr)
        engines.append(Engine(model, tokenizer, max_batch=args.max_batch, max_len=args.max_context,
                              max_queue=args.max_queue, max_batch_tokens=args.max_batch_tokens,
                              max_prefill_rows=args.max_prefill_rows,
                              prefill_chunk=args.prefill_chunk, prefill_wait_s=args.prefill_wait,
                              compile=args.compile, prefill_graphs=args.prefill_graphs, progress=_progress))
    engine = engines[0] if len(engines) == 1 else Replicas(engines)
    name = args.served_model_name or args.model or "hymba"
    app = create_app(engine, name)
    with engine:
        where = f" on each of {len(engines)} devices" if len(engines) > 1 else ""
        print(f"hymba serve: {name} on http://{args.host}:{args.port}/v1 ({args.max_batch} slots of "
              f"{engine.max_len} tokens{where})", file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def parse_devices(text: str) -> list[str]:
    """`--devices cuda:0,cuda:1` as a list; each must be distinct (one engine and one model copy per device)."""
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices or len(set(devices)) != len(devices):
        raise HymbaError(f"--devices takes distinct comma-separated devices (cuda:0,cuda:1), got {text!r}")
    from hymba.checkpoint import resolve_device

    for device in devices:
        resolve_device(device)
    return devices


def _progress(line: str) -> None:
    print(f"hymba serve: {line}", file=sys.stderr, flush=True)


def add_parser(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP API with continuous batching",
        description="Serve a Hymba checkpoint over an OpenAI-compatible HTTP API (/v1/completions, "
                    "/v1/chat/completions, /v1/models, /health, /metrics). Needs the serve extra (FastAPI, uvicorn).")
    serve.add_argument("--model", help="checkpoint directory or hub id (default: the small model in the package)")
    serve.add_argument("--served-model-name", help="the name clients pass as `model` (default: --model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, local only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    serve.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                       help="weights dtype (default: float32 on CPU, the checkpoint's own on GPU)")
    serve.add_argument("--devices",
                       help="comma-separated devices (cuda:0,cuda:1,...): one engine with its own model copy on each, "
                            "behind this one server; a request goes to the least busy (data-parallel replicas)")
    serve.add_argument("--max-batch", type=int, default=64,
                       help="requests decoded together (cache slots), on each device")
    serve.add_argument("--max-context", type=int,
                       help="tokens per slot, prompt + completion (default: the model's context)")
    serve.add_argument("--max-queue", type=int, default=256,
                       help="requests that may wait for a slot; beyond it the server answers 429")
    serve.add_argument("--max-batch-tokens", type=int, default=65536,
                       help="prompt tokens (meta tokens and padding included) one prefill forward may take; prompts "
                            "waiting together prefill in one forward up to this (default 65536)")
    serve.add_argument("--max-prefill-rows", type=int,
                       help="prompts one prefill forward may take (default: --max-batch); they prefill in a scratch "
                            "cache of this many rows of --max-context tokens, so lowering it saves memory")
    serve.add_argument("--prefill-chunk", type=int, default=2048,
                       help="tokens per prefill piece: a long prompt prefills over several steps while the running "
                            "requests keep decoding (default 2048)")
    serve.add_argument("--prefill-wait", type=float, default=0.0,
                       help="seconds a prefill group that is not full may wait for more arrivals while others decode "
                            "(fewer, larger prefills: more throughput, later first tokens; default 0)")
    serve.add_argument("--no-compile", dest="compile", action="store_false",
                       help="on CUDA, capture the eager decode step instead of compiling it first (starts faster, "
                            "decodes about 10%% slower)")
    serve.add_argument("--no-prefill-graphs", dest="prefill_graphs", action="store_false",
                       help="on CUDA, run the first prefill of a small group of prompts eagerly instead of "
                            "replaying a CUDA graph captured at start-up for its (rows, length) bucket (starts faster; "
                            "first tokens come later under load)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                       help="uvicorn's log level (info logs every request)")
    serve.set_defaults(func=run_serve)
