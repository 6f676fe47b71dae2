"""Where one decode step's time goes: the top CUDA kernels of the (compiled) CUDA-graph decode step.

    python benchmarks/profile_decode.py --model hymba-1.5b --context 8192 --batch 128 [--no-compile]

Random bf16 weights, a synthetically filled cache (as `hymba bench` does); prints a torch.profiler table.
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from hymba.bench import build_engine_model, fill_cache_synthetic
from hymba.cache import HymbaCache
from hymba.config import HymbaConfig
from hymba.generate import decode_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hymba-1.5b")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()

    model = build_engine_model(HymbaConfig.preset(args.model), torch.device("cuda"), torch.bfloat16)
    cache = HymbaCache(model.config, args.batch, args.context, device="cuda", dtype=torch.bfloat16)
    fill_cache_synthetic(cache, args.context - 8)
    step = decode_step if args.no_compile else torch.compile(decode_step, dynamic=False)
    tokens = torch.randint(0, model.config.vocab_size, (args.batch,), device="cuda")
    with torch.inference_mode():
        for _ in range(3):
            step(model, cache, tokens)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step(model, cache, tokens)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=90))


if __name__ == "__main__":
    main()
