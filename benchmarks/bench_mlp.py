"""The MLP's gate/up projections and SwiGLU at decode batches, Hymba-1.5B's shape: two cuBLAS GEMVs and the compiled
SwiGLU (what the model runs) against the fused Triton kernel (`hymba.ops.mlp.triton`) over its tile sizes.

    python benchmarks/bench_mlp.py                    # needs CUDA and Triton
    python benchmarks/bench_mlp.py --rows 1,2,4,8,16,32,64,128

Times are of CUDA-graph replays (`triton.testing.do_bench_cudagraph`), as the decode step runs them, so launch
overhead is not counted. GB/s counts the two weights read (2 x 5504 x 1600 bf16, 35.2 MB). Each fused row is checked
against the plain path. If a fused configuration beats the plain path at every row count up to some n, setting
`hymba.ops.mlp.FUSED_MAX_ROWS = n` (and its tile sizes as the module's defaults) makes the model use it.
"""

import argparse

import torch
from triton.testing import do_bench_cudagraph

from hymba.ops.mlp import gate_up_swiglu_ref
from hymba.ops.mlp.triton import gate_up_swiglu_triton

HIDDEN, INTERMEDIATE = 1600, 5504
# (block_n, block_k, num_warps, num_stages)
CONFIGS = [(16, 128, 4, 4), (32, 128, 4, 4), (64, 128, 4, 4), (32, 256, 4, 3), (16, 256, 4, 3), (32, 64, 4, 4),
           (32, 128, 8, 4), (64, 64, 8, 4), (16, 512, 8, 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,8,32,128", help="comma-separated row counts (default 1,8,32,128)")
    args = parser.parse_args()
    torch.manual_seed(0)
    gate, up = (torch.randn(INTERMEDIATE, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(2))
    weight_bytes = 2 * gate.numel() * gate.element_size()
    print(f"{'rows':>4} {'path':>28} {'us':>7} {'GB/s':>7} {'vs plain':>8}")
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)
        want = gate_up_swiglu_ref(x, gate, up)
        plain = do_bench_cudagraph(lambda x=x: gate_up_swiglu_ref(x, gate, up)) * 1e3
        print(f"{rows:4d} {'cuBLAS x2 + SwiGLU':>28} {plain:7.1f} {weight_bytes / plain / 1e3:7.0f} {1.0:8.2f}")
        for block_n, block_k, warps, stages in CONFIGS:
            def fused(x=x, bn=block_n, bk=block_k, w=warps, s=stages):
                return gate_up_swiglu_triton(x, gate, up, block_n=bn, block_k=bk, num_warps=w, num_stages=s)

            err = ((fused().float() - want.float()).norm() / want.float().norm()).item()
            us = do_bench_cudagraph(fused) * 1e3
            name = f"fused n{block_n} k{block_k} w{warps} s{stages}"
            print(f"{rows:4d} {name:>28} {us:7.1f} {weight_bytes / us / 1e3:7.0f} {plain / us:8.2f}"
                  + (f"  (rel. error {err:.1e})" if err > 1e-2 else ""), flush=True)


if __name__ == "__main__":
    main()
