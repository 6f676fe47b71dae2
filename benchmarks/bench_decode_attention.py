"""Decode attention at Hymba-1.5B shapes: the split-K Triton kernel against the SDPA reference (time, bandwidth).

    python benchmarks/bench_decode_attention.py            # default launch parameters, against SDPA
    python benchmarks/bench_decode_attention.py --sweep    # the kernel over block sizes and split counts

Rows x keys cover the 1.5B cache at 8K: meta tokens + ring (1,153 keys) and global layers (8,320 keys).

Each timing is a CUDA graph that calls the kernel once per cache set, over sets of distinct buffers (at least 256 MB
together, more than the L2 cache), replayed: as the decode step runs it, launch overhead is not counted. (Timed call
by call with `do_bench`, a small case measures the CPU's launches: 155 us at batch 32 over 1,153 keys, against 24
us inside the step.)
"""

import argparse
import itertools

import torch
from bench_ssm_step import graph_time_us

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


def cache_sets(b: int, S: int) -> list[tuple]:
    """Distinct input sets, together at least 256 MB of K/V (at least two)."""
    bytes_per_set = b * hkv * S * (dqk + dv) * 2
    return [inputs(b, S) for _ in range(max(2, -(-(256 << 20) // bytes_per_set)))]


def gb_per_s(k, v, us):
    return (k.numel() + v.numel()) * k.element_size() / (us * 1e-6) / 1e9


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
                sets = cache_sets(b, S)
                k, v = sets[0][1], sets[0][2]
                for block_n, splits, warps, stages in itertools.product(args.block_n, args.splits, args.warps,
                                                                         args.stages):
                    run = lambda *a, p=(block_n, splits, warps, stages): decode_attention_triton(*a, *p)  # noqa: E731
                    us = graph_time_us(run, sets)
                    print(f"{b:5d} {S:6d} {block_n:7d} {splits or 'auto':>6} {warps or 'dflt':>5} "
                          f"{stages or 'dflt':>6} {us:8.1f} {gb_per_s(k, v, us):6.0f}", flush=True)
        return
    print(f"{'batch':>5} {'keys':>6} {'sdpa us':>9} {'triton us':>9} {'speedup':>7} {'triton GB/s':>11} {'max err':>8}")
    for b in args.batches:
        for S in args.keys:
            sets = cache_sets(b, S)
            q, k, v, mask = sets[0]
            ref = decode_attention(q, k, v, mask)
            out = decode_attention_triton(q, k, v, mask)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            t_ref = graph_time_us(decode_attention, sets)
            t_tri = graph_time_us(decode_attention_triton, sets)
            print(f"{b:5d} {S:6d} {t_ref:9.1f} {t_tri:9.1f} {t_ref / t_tri:7.2f} "
                  f"{gb_per_s(k, v, t_tri):11.0f} {err:8.1e}")


if __name__ == "__main__":
    main()
