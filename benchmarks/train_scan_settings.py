"""The selective scan's tuning knobs in the whole training step: `hymba bench train`'s 1.5B case (random tokens,
8 rows of 2,048 positions, bf16, no activation checkpointing) under each setting, in one process, each setting run
between two runs of the defaults.

    python benchmarks/train_scan_settings.py                     # needs CUDA
    python benchmarks/train_scan_settings.py --steps 8 --settings "chunk=16" "bwd=auto,regs=168,chunk=16"

A setting is comma-separated knobs of `hymba.ops.scan.triton`: fwd (FORWARD_SEGMENTS), bwd (BACKWARD_SEGMENTS),
regs (BACKWARD_MAX_REGISTERS) and chunk (DEFAULT_CHUNK, positions between the forward's saved states); "auto"
leaves the segments to `scan_segments`. Prints per run the step time, tokens/s, MFU (as `hymba bench train` counts
it) and peak memory, and each setting's step time over the mean of the default runs beside it.
`benchmarks/bench_scan.py --backward --segments` times the scan alone.
"""

from __future__ import annotations

import argparse

import torch

from hymba.bench_train import TrainBenchOptions, TrainRow, run_case
from hymba.ops.scan import triton as scan_triton

KNOBS = {"fwd": "FORWARD_SEGMENTS", "bwd": "BACKWARD_SEGMENTS", "regs": "BACKWARD_MAX_REGISTERS",
         "chunk": "DEFAULT_CHUNK"}
SETTINGS = ["bwd=auto,regs=168", "bwd=auto,regs=168,chunk=16", "chunk=16", "bwd=auto", "fwd=auto,bwd=auto,regs=168",
            "bwd=5,regs=168", "bwd=8,regs=168,chunk=16"]


def parse_setting(text: str) -> dict[str, int | None]:
    """"bwd=auto,regs=168" -> {"BACKWARD_SEGMENTS": None, "BACKWARD_MAX_REGISTERS": 168}."""
    knobs = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in KNOBS or not value:
            raise SystemExit(f"bad setting {item!r} in {text!r}: use {', '.join(KNOBS)} = a number or auto")
        knobs[KNOBS[key]] = None if value == "auto" else int(value)
    return knobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=SETTINGS, help="settings to time (default: a sweep)")
    parser.add_argument("--model", default="hymba-1.5b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cuda (the knobs act on the Triton scan only)")
    args = parser.parse_args()
    settings = [(text, parse_setting(text)) for text in args.settings]
    defaults = {knob: getattr(scan_triton, knob) for knob in KNOBS.values()}
    options = TrainBenchOptions(models=[args.model], seqs=[args.seq], tokens_per_step=8 * args.seq,
                                checkpointing=[False], lora_r=0, steps=args.steps, warmup_steps=args.warmup_steps,
                                device=torch.device(args.device))

    def run(label: str, knobs: dict) -> float | None:
        for knob, value in {**defaults, **knobs}.items():
            setattr(scan_triton, knob, value)
        row = run_case(TrainRow(args.model, args.seq, 8, False, 0, False), options, print)
        if row.step_ms is None:
            print(f"{label:>32}   did not fit", flush=True)
            return None
        mfu = f"{row.mfu:.1%}" if row.mfu is not None else "-"
        peak = f"{row.peak_gib:.1f}" if row.peak_gib is not None else "-"
        print(f"{label:>32} {row.batch_ran:5d} {row.step_ms:8.1f} {row.tokens_per_s:9,.0f} {mfu:>6} {peak:>7}",
              flush=True)
        return row.step_ms

    print(f"{'setting':>32} {'batch':>5} {'step ms':>8} {'tokens/s':>9} {'MFU':>6} {'GiB':>7}")
    before = run("defaults", {})
    for text, knobs in settings:
        ms = run(text, knobs)
        after = run("defaults", {})
        base = [t for t in (before, after) if t is not None]
        if ms is not None and base:
            print(f"{'':>32} {text}: {ms / (sum(base) / len(base)):.3f}x the defaults' step around it", flush=True)
        before = after
    for knob, value in defaults.items():
        setattr(scan_triton, knob, value)


if __name__ == "__main__":
    main()
