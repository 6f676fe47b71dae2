"""The Triton selective scan's forward at Hymba-1.5B prefill shapes: the walk over positions against the parallel
forward over blocks of positions, by channels per program.

    python benchmarks/bench_scan.py                 # needs CUDA and Triton
    python benchmarks/bench_scan.py --batches 1,8 --length 640

The walk: one program per `block_d` channels steps through every position with block_d / 32 warps, so time per
position is the latency of one step of the recurrence. The parallel forward (`block_l` positions per block) scans
each block at once and carries only the state from block to block. Each row is checked against the walk.
"""

import argparse

import torch
from triton.testing import do_bench

from hymba.ops.scan.triton import selective_scan_triton

D_INNER, D_STATE = 3200, 16
CASES = [(16, None), (32, None), (64, None), (8, 16), (16, 16), (32, 16), (16, 32), (16, 64), (32, 8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--length", type=int, default=8192 + 128, help="positions, meta tokens included")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    header = ("batch", 5), ("block_d", 7), ("block_l", 7), ("programs", 8), ("ms", 8), ("ns/position", 11),
    print(" ".join(f"{name:>{width}}" for name, width in (*header, ("vs walk 32", 10))))
    for batch in (int(b) for b in args.batches.split(",")):
        length = args.length
        # Position-major activations, as the model passes them: (batch, L, channels) memory viewed as (batch, d, L).
        u, delta, z = (torch.randn(batch, length, D_INNER, device=dev, dtype=bf16).transpose(1, 2) for _ in range(3))
        B, C = (torch.randn(batch, length, D_STATE, device=dev, dtype=bf16).transpose(1, 2) for _ in range(2))
        A = -torch.rand(D_INNER, D_STATE, device=dev)
        D, bias = torch.ones(D_INNER, device=dev), torch.zeros(D_INNER, device=dev)
        inputs = (u, delta, A, B, C, D, z, bias, True)
        want, _ = selective_scan_triton(*inputs, block_d=32)
        baseline = do_bench(lambda args=inputs: selective_scan_triton(*args, block_d=32), warmup=3, rep=10)
        for block_d, block_l in CASES:
            def run(bd=block_d, bl=block_l, args=inputs):
                return selective_scan_triton(*args, block_d=bd, block_l=bl)
            err = ((run()[0].float() - want.float()).norm() / want.float().norm()).item()
            ms = do_bench(run, warmup=3, rep=10)
            programs = batch * -(-D_INNER // block_d)
            print(f"{batch:5d} {block_d:7d} {str(block_l):>7} {programs:8d} {ms:8.2f} {ms * 1e6 / length:11.0f} "
                  f"{baseline / ms:10.2f}" + (f"  (rel. error {err:.1e})" if err > 1e-2 else ""))


if __name__ == "__main__":
    main()
