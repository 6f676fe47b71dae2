"""The Triton selective scan's forward at a Hymba-1.5B prefill shape, over channels per program.

    python benchmarks/bench_scan.py     # needs CUDA and Triton

One program walks all positions for `block_d` channels with block_d / 32 warps, so time per position is the
latency of one step of the recurrence; the table shows how that trades against the number of programs.
"""

import torch
from triton.testing import do_bench

from hymba.ops.scan.triton import selective_scan_triton

BATCH, D_INNER, D_STATE, LENGTH = 8, 3200, 16, 8192 + 128


def main() -> None:
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    # Position-major activations, as the model passes them: (batch, L, channels) memory viewed as (batch, d, L).
    u, delta, z = (torch.randn(BATCH, LENGTH, D_INNER, device=dev, dtype=bf16).transpose(1, 2) for _ in range(3))
    B, C = (torch.randn(BATCH, LENGTH, D_STATE, device=dev, dtype=bf16).transpose(1, 2) for _ in range(2))
    A = -torch.rand(D_INNER, D_STATE, device=dev)
    D, bias = torch.ones(D_INNER, device=dev), torch.zeros(D_INNER, device=dev)
    print(f"{'block_d':>7} {'programs':>8} {'ms':>8} {'ns/position':>11}")
    for block_d in (16, 32, 64, 128):
        ms = do_bench(lambda bd=block_d: selective_scan_triton(u, delta, A, B, C, D, z, bias, True, block_d=bd),
                      warmup=3, rep=10)
        programs = BATCH * -(-D_INNER // block_d)
        print(f"{block_d:7d} {programs:8d} {ms:8.2f} {ms * 1e6 / LENGTH:11.0f}")


if __name__ == "__main__":
    main()
