"""Decode attention at Hymba-1.5B shapes: the split-K Triton kernel against the SDPA reference (time, bandwidth).

    python benchmarks/bench_decode_attention.py            # default launch parameters, against SDPA
    python benchmarks/bench_decode_attention.py --sweep    # the kernel over block sizes and split counts

Rows x keys cover the 1.5B cache at 8K: meta tokens + ring (1,153 keys) and global layers (8,320 keys).
"""

import argparse
import itertools

import torch
from triton.testing import do_bench

from hymba.ops.attention import decode_attention
from hymba.ops.attention.triton_decode import decode_attention_triton

hq, hkv, dqk, dv = 25, 5, 64, 128  # Hymba-1.5B


def inputs(b: int, S: int):
    q = torch.randn(b, hq, 1, dqk, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, hkv, S, dqk, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, hkv, S, dv, device="cuda", dtype=torch.bfloat16)
    valid = torch.ones(b, S, dtype=torch.bool, device="cuda")
    valid[:, S // 2: S // 2 + 7] = False
    return q, k, v, valid[:, None, None, :]


def gb_per_s(k, v, ms):
    return (k.numel() + v.numel()) * k.element_size() / (ms * 1e-3) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true",
                        help="time the kernel over launch parameters instead of comparing to SDPA")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--keys", type=int, nargs="+", default=[1153, 8320])
    parser.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128], help="--sweep: keys per step")
    parser.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16, 64],
                        help="--sweep: key splits (0: the kernel's own choice)")
    parser.add_argument("--warps", type=int, nargs="+", default=[0], help="--sweep: num_warps (0: Triton's default)")
    parser.add_argument("--stages", type=int, nargs="+", default=[0],
                        help="--sweep: num_stages (0: Triton's default)")
    args = parser.parse_args()
    if args.sweep:
        print(f"{'batch':>5} {'keys':>6} {'block_n':>7} {'splits':>6} {'warps':>5} {'stages':>6} {'us':>8} "
              f"{'GB/s':>6}")
        for b in args.batches:
            for S in args.keys:
                q, k, v, mask = inputs(b, S)
                for block_n, splits, warps, stages in itertools.product(args.block_n, args.splits, args.warps,
                                                                         args.stages):
                    run = lambda a=(q, k, v, mask, block_n, splits, warps, stages): decode_attention_triton(*a)  # noqa: E731
                    ms = do_bench(run, warmup=10, rep=50)
                    print(f"{b:5d} {S:6d} {block_n:7d} {splits or 'auto':>6} {warps or 'dflt':>5} "
                          f"{stages or 'dflt':>6} {ms * 1e3:8.1f} {gb_per_s(k, v, ms):6.0f}", flush=True)
        return
    print(f"{'batch':>5} {'keys':>6} {'sdpa us':>9} {'triton us':>9} {'speedup':>7} {'triton GB/s':>11} {'max err':>8}")
    for b in args.batches:
        for S in args.keys:
            q, k, v, mask = inputs(b, S)
            ref = decode_attention(q, k, v, mask)
            out = decode_attention_triton(q, k, v, mask)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            args = (q, k, v, mask)
            t_ref = do_bench(lambda a=args: decode_attention(*a), warmup=25, rep=100)
            t_tri = do_bench(lambda a=args: decode_attention_triton(*a), warmup=25, rep=100)
            print(f"{b:5d} {S:6d} {t_ref * 1e3:9.1f} {t_tri * 1e3:9.1f} {t_ref / t_tri:7.2f} "
                  f"{gb_per_s(k, v, t_tri):11.0f} {err:8.1e}")


if __name__ == "__main__":
    main()
