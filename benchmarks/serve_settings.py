"""Serving-engine settings side by side on one model and one load, against static `generate` in the same process.

    python benchmarks/serve_settings.py                                   # the defaults vs the reference paths
    python benchmarks/serve_settings.py --settings "" prefill_graphs=False "prefill_wait_s=0.05"
    python benchmarks/serve_settings.py --prompt-len 2048 --output-len 128 --requests 512 --slots 128 --no-poisson

Each setting is a comma-separated list of `Engine` keyword arguments (`name=value`, values read as Python literals;
"" is the defaults); `scan_block_l=N` forces the selective scan's Triton kernels to blocks of N positions (1 walks;
by default `hymba.ops.scan.triton_scan_blocks` chooses by batch). For each, a fresh engine runs the load all at once,
then (unless `--no-poisson`) with Poisson arrivals at `--rate` requests/s, by default 70% of the capacity the first
setting's all-at-once run measured, so every setting meets the same arrivals. Random weights, no download; CUDA by
default (`--device cpu` runs the tiny shape, for trying the script). Decode steps are captured eagerly unless
`--compile` (compiling every bucket costs about 40 s each). Prints one table; `--json` writes the rows. `--profile`
records a window of the first setting's all-at-once run (`--profile-window`) with the PyTorch profiler and prints how
busy the GPU was and its top kernels: where an engine loses to static generate, the gaps show as idle time.
"""

import argparse
import ast
import functools
import json
import sys
import threading
import time

import torch

from hymba.bench import build_engine_model
from hymba.bench_serve import (
    ServeLoad,
    arrival_offsets,
    drive_engine,
    prompt_lengths,
    random_prompts,
    static_generate,
    static_step_ms,
)
from hymba.config import HymbaConfig
from hymba.engine import Engine
from hymba.generate import decode_runner
from hymba.ops import scan
from hymba.tokenizer import HymbaTokenizer

REFERENCE_SETTINGS = ["", "decode_during_prefill=False", "prefill_graphs=False"]


def parse_setting(text: str) -> dict:
    setting = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        setting[name.strip()] = ast.literal_eval(value.strip())
    return setting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=REFERENCE_SETTINGS)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--prompt-len-min", type=int, help="prompt lengths uniform from this up to --prompt-len")
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--rate", type=float, help="Poisson arrivals per second (default: 70%% of measured capacity)")
    parser.add_argument("--no-poisson", action="store_true")
    parser.add_argument("--compile", action="store_true", help="compile the decode step before capturing it")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--profile", action="store_true", help="profile the first setting's all-at-once run")
    parser.add_argument("--profile-window", type=float, nargs=2, default=(2.0, 1.0), metavar=("START_S", "SECONDS"),
                        help="when --profile records, from the run's start (default 2 1)")
    args = parser.parse_args()
    if args.profile and not torch.cuda.is_available():
        parser.error("--profile records GPU kernels: it needs CUDA")

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    config = HymbaConfig.preset("hymba-1.5b" if gpu else "tiny")
    model = build_engine_model(config, device, torch.bfloat16 if gpu else torch.float32)
    tokenizer = HymbaTokenizer.from_pretrained()
    load = ServeLoad(args.requests, args.prompt_len, args.output_len, args.slots, prompt_len_min=args.prompt_len_min)
    prompts = random_prompts(load, config.vocab_size)
    max_len = decode_runner(model, load.slots, load.prompt_len + load.output_len, compile=args.compile).max_len
    warm = ServeLoad(min(load.requests, load.slots), load.prompt_len, 2, load.slots)
    static_generate(model, prompts[:warm.requests], warm, device)
    static = static_generate(model, prompts, load, device).output_tok_s
    rows, rate = [], args.rate

    def report(setting: str, arrivals: str, result) -> None:
        row = dict(setting=setting or "defaults", arrivals=arrivals, output_tok_s=round(result.output_tok_s),
                   vs_static=round(result.output_tok_s / static, 3), ttft_s=result.ttft_s, tpot_ms=result.tpot_ms,
                   itl_ms=result.itl_ms,
                   decode_rows=result.mean_decode_rows, engine_seconds=result.engine_seconds)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    for text in args.settings:
        setting = parse_setting(text)
        scan.TRITON_BLOCK_L = setting.pop("scan_block_l", None)
        engine = Engine(model, tokenizer, max_batch=load.slots, max_len=max_len, eos_token_id=[],
                        compile=args.compile, **setting).start()
        try:
            all_at_once = functools.partial(drive_engine, engine, prompts, load, [0.0] * load.requests,
                                            "all at once", None)
            first = text == args.settings[0]
            if first:
                # The whole load once, untimed: its prefill groups meet every shape the timed runs will (a shape
                # new to the compiled helpers or the Triton kernels costs seconds the first time).
                all_at_once()
            else:
                drive_engine(engine, prompts[:warm.requests], warm, [0.0] * warm.requests, "warm-up", None)
            result = profiled(all_at_once, *args.profile_window) if args.profile and first else all_at_once()
            report(text, "all at once", result)
            if not args.no_poisson:
                rate = rate or 0.7 * load.requests / result.seconds
                poisson = ServeLoad(**{**vars(load), "arrivals": "poisson", "rate": rate})
                report(text, f"poisson {rate:.1f}/s",
                       drive_engine(engine, prompts, poisson, arrival_offsets(poisson, rate), "poisson", rate))
        finally:
            engine.stop()
    batch = round(next((r["decode_rows"] for r in rows if r["arrivals"] != "all at once"), load.slots) or 1)
    step_ms = static_step_ms(model, batch, load.prompt_len, device)
    # The all-at-once runs' steady step (their inter-token p50) compares with this one.
    full_step_ms = static_step_ms(model, load.slots, load.prompt_len + load.output_len // 2, device)

    print(f"{load.requests} x ({prompt_lengths(vars(load))} prompt + {load.output_len} new), {load.slots} slots, "
          f"{config_label(gpu)}; static generate {static:,.0f} output tok/s; static step at {batch} rows "
          f"{step_ms:.2f} ms, at {load.slots} rows {full_step_ms:.2f} ms\n")
    print("| setting | arrivals | output tok/s | vs static | TTFT p50 / p90 / p99 (s) | TPOT p50 / p90 (ms) "
          "| ITL p50 / p90 (ms) |")
    print("|---|---|---:|---:|---|---|---|")
    for r in rows:
        ttft, tpot, itl = r["ttft_s"], r["tpot_ms"], r["itl_ms"]
        print(f"| {r['setting']} | {r['arrivals']} | {r['output_tok_s']:,} | {r['vs_static']:.2f} | "
              f"{ttft['p50']:.3f} / {ttft['p90']:.3f} / {ttft['p99']:.3f} | {tpot['p50']:.2f} / {tpot['p90']:.2f} | "
              f"{itl['p50']:.2f} / {itl['p90']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(load=vars(load), static_tok_s=static, static_step_ms=step_ms,
                           static_full_step_ms=full_step_ms, rows=rows), f, indent=1)


def profiled(run, start_s: float, seconds: float):
    """`run()` with the profiler on for `seconds` from `start_s` into it (a whole run's kernels are too many to read
    back: ~800 per decode step); prints the share of that window some kernel was running, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CUDA])
    results = []
    driver = threading.Thread(target=lambda: results.append(run()))  # the profiler is started where it was made
    driver.start()
    time.sleep(start_s)
    prof.start()
    time.sleep(seconds)
    prof.stop()
    driver.join()
    if not results:
        raise SystemExit("the profiled run failed (see above)")
    result = results[0]
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, reach = 0, None
    for start, end in spans:
        if reach is None or start > reach:
            busy, reach = busy + end - start, end
        elif end > reach:
            busy, reach = busy + end - reach, end
    wall = spans[-1][1] - spans[0][0] if spans else 0
    print(f"GPU busy {busy / 1e3:,.0f} of {wall / 1e3:,.0f} ms between the first and last kernel "
          f"({busy / max(wall, 1):.1%})", file=sys.stderr)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=80),
          file=sys.stderr)
    return result


def config_label(gpu: bool) -> str:
    name = torch.cuda.get_device_name() if gpu else "CPU"
    return f"hymba-1.5b on {name}" if gpu else "tiny on CPU"


if __name__ == "__main__":
    main()
