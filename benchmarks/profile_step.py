"""Where a decode step's, a prefill's or a training step's time goes: the top CUDA kernels, as a torch.profiler
table.

    python benchmarks/profile_step.py --model hymba-1.5b --context 8192 --batch 128 [--no-compile]
    python benchmarks/profile_step.py --phase prefill --context 8192 --batch 4
    python benchmarks/profile_step.py --phase train --context 2048 --batch 8

Random bf16 weights. Decode: one (compiled) step over a synthetically filled cache, as `hymba bench` does.
Prefill: one prefill of `context` random tokens per row into a fresh cache, after an untimed one of the same shape.
Train: one `hymba train` optimizer step (bf16 autocast, float32 master weights, fused AdamW) on random tokens, as
`hymba bench train` times it, after two untimed ones.
"""

import argparse
import csv

import torch
from torch.profiler import ProfilerActivity, profile

from hymba.bench import build_engine_model, fill_cache_synthetic
from hymba.cache import HymbaCache
from hymba.config import HymbaConfig
from hymba.generate import decode_step, prefill
from hymba.ops import scan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hymba-1.5b")
    parser.add_argument("--phase", choices=["decode", "prefill", "train"], default="decode")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--no-compile", action="store_true", help="decode: profile the eager step")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--scan-block-l", type=int,
                        help="the selective scan's Triton kernels in blocks of N positions (1 walks; default by batch)")
    parser.add_argument("--ops", action="store_true",
                        help="also the PyTorch ops (with input shapes) that launched the most kernel time, to find "
                             "which copies and casts a kernel row stands for")
    parser.add_argument("--sequence", metavar="CSV",
                        help="also write every kernel in launch order (name, start and duration in us) to CSV, to read "
                             "one layer's kernels one by one")
    args = parser.parse_args()
    scan.TRITON_BLOCK_L = args.scan_block_l

    if args.phase == "train":
        from hymba.bench_train import TrainBenchOptions, TrainRow, training_step

        row = TrainRow(args.model, args.context, args.batch, False, 0, False)
        options = TrainBenchOptions([args.model], [args.context], args.batch * args.context, [False], 0, 1, 2,
                                    torch.device("cuda"))
        step = training_step(row, options, args.batch)[3]
        report(step, warmup=2, rows=args.rows, sequence=args.sequence, ops=args.ops)
        return
    model = build_engine_model(HymbaConfig.preset(args.model), torch.device("cuda"), torch.bfloat16)
    new_cache = lambda: HymbaCache(model.config, args.batch, args.context, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    if args.phase == "prefill":
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.context), device="cuda")
        run = lambda: prefill(model, new_cache(), ids, None)  # noqa: E731
    else:
        cache = new_cache()
        fill_cache_synthetic(cache, args.context - 8)
        step = decode_step if args.no_compile else torch.compile(decode_step, dynamic=False, fullgraph=True)
        tokens = torch.randint(0, model.config.vocab_size, (args.batch,), device="cuda")
        run = lambda: step(model, cache, tokens)  # noqa: E731
    with torch.inference_mode():
        report(run, warmup=1 if args.phase == "prefill" else 3, rows=args.rows, sequence=args.sequence, ops=args.ops)


def report(run, warmup: int, rows: int, sequence: str | None = None, ops: bool = False) -> None:
    """Profile one call of `run` after `warmup` untimed ones and print the kernels by total time (and write them in
    launch order to `sequence`; with `ops`, also the ops with their input shapes by the kernel time they launched)."""
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if ops else [ProfilerActivity.CUDA]
    with profile(activities=activities, record_shapes=ops) as prof:
        run()
        torch.cuda.synchronize()
    if ops:
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cuda_time_total", row_limit=rows,
                                                                  max_name_column_width=40, max_shapes_column_width=70))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=90))
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_ms = sum(e.device_time for e in kernels) / 1e3
    print(f"{len(kernels)} kernels, {total_ms:.2f} ms of kernel time (profiled; a CUDA graph replay adds no launches)")
    if sequence:
        with open(sequence, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["kernel", "start_us", "duration_us"])
            for e in sorted(kernels, key=lambda e: e.time_range.start):
                out.writerow([e.name, f"{e.time_range.start:.1f}", f"{e.device_time:.2f}"])


if __name__ == "__main__":
    main()
