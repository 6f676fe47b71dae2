"""The decode step's projections at Hymba-1.5B's shapes: cuBLAS (F.linear, what the model runs) against the
small-rows Triton kernel (`hymba.ops.linear.triton`) over its tiles and input slices.

    python benchmarks/bench_linear.py                       # needs CUDA and Triton
    python benchmarks/bench_linear.py --rows 1,8,32 --step  # and the whole decode step with the kernel off and on
    python benchmarks/bench_linear.py --projections lm_head --rows 64,128

Times are of CUDA-graph replays (`triton.testing.do_bench_cudagraph`), as the decode step runs them; GB/s counts
the weight read. Each kernel row is checked against F.linear. The model runs the kernel for the LM head alone (cuBLAS
won the layers' projections), up to `hymba.ops.linear.SMALL_ROWS_MAX` rows with the module's default tile; `--step`
measures the step with that limit at 0 and at the largest row count.
"""

import argparse

import torch
import torch.nn.functional as F
from bench_mlp import add_step_arguments, steps
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench_cudagraph

from hymba.ops import linear
from hymba.ops.linear.triton import small_rows_linear, split_k

# (name, out_features, in_features) of the 1.5B shape: in_proj (q, k, v, u, z of a producing layer), out_proj,
# down_proj, the LM head.
SHAPES = [("in_proj", 8000, 1600), ("out_proj", 1600, 3200), ("down_proj", 1600, 5504), ("lm_head", 32001, 1600)]
# (block_n, block_k, num_warps, num_stages, splits; 0: `split_k`'s choice)
CONFIGS = [(64, 128, 4, 4, 0), (64, 128, 4, 3, 0), (32, 128, 4, 4, 0), (64, 64, 4, 4, 0), (128, 64, 4, 4, 0),
           (64, 128, 4, 4, 1), (64, 128, 8, 4, 0)]


def kernels(rows_list: list[int], projections: list[str]) -> None:
    torch.manual_seed(0)
    print(f"{'proj':>9} {'rows':>4} {'path':>30} {'us':>7} {'GB/s':>7} {'vs cuBLAS':>9}")
    for name, n, k in [shape for shape in SHAPES if shape[0] in projections]:
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        nbytes = weight.numel() * weight.element_size()
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            want = F.linear(x, weight)
            plain = do_bench_cudagraph(lambda x=x, w=weight: F.linear(x, w)) * 1e3
            print(f"{name:>9} {rows:4d} {'cuBLAS':>30} {plain:7.1f} {nbytes / plain / 1e3:7.0f} {1.0:9.2f}")
            for block_n, block_k, warps, stages, splits in CONFIGS:
                def fused(x=x, weight=weight, bn=block_n, bk=block_k, w=warps, s=stages, sp=splits):
                    return small_rows_linear(x, weight, None, sp, bn, bk, w, s)

                label = f"n{block_n} k{block_k} w{warps} s{stages} split {splits or split_k(n, k, block_n, block_k)}"
                try:
                    err = ((fused().float() - want.float()).norm() / want.float().norm()).item()
                except OutOfResources:
                    print(f"{name:>9} {rows:4d} {label:>30} (tiles exceed shared memory)")
                    continue
                us = do_bench_cudagraph(fused) * 1e3
                print(f"{name:>9} {rows:4d} {label:>30} {us:7.1f} {nbytes / us / 1e3:7.0f} {plain / us:9.2f}"
                      + (f"  (rel. error {err:.1e})" if err > 1e-2 else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,8,32,128", help="comma-separated row counts (default 1,8,32,128)")
    parser.add_argument("--projections", default=",".join(shape[0] for shape in SHAPES),
                        help="comma-separated, from: " + ", ".join(shape[0] for shape in SHAPES))
    add_step_arguments(parser)
    args = parser.parse_args()
    kernels([int(r) for r in args.rows.split(",")], args.projections.split(","))
    if args.step:
        steps([int(r) for r in args.step_rows.split(",")], args.context, args.compile, linear, "SMALL_ROWS_MAX")


if __name__ == "__main__":
    main()
