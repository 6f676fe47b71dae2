"""A decode step's four projections at a few rows, Hymba-1.5B's shapes: the reference (the norm, cuBLAS, SwiGLU and
the residual add as separate kernels) against the fused kernel (`hymba.ops.linear.fused`) over the weight elements a
program holds and its warps, with and without programmatic dependent launch (PDL).

    python benchmarks/bench_fused_linear.py                  # needs CUDA and Triton
    python benchmarks/bench_fused_linear.py --rows 1,4 --cases in_proj,down_proj
    python benchmarks/bench_fused_linear.py --cases none --step --step-rows 1,2,4 --compile   # the step, off / on

Each timing is a CUDA graph of 32 calls on 32 different weights, as the step's 32 layers run them: the weights do not
fit in L2 together (a benchmark replaying one weight reads it from L2 and overstates the bandwidth), and each call
follows another kernel, as in the step, which is where PDL can overlap one kernel's start with another's end.
GB/s counts the weights read.
"""

import argparse
import itertools

import torch
from bench_mlp import add_step_arguments, steps
from bench_ssm_step import graph_time_us

from hymba.ops import linear
from hymba.ops.linear import fused_linear_ref
from hymba.ops.linear.fused import fused_rows_linear

LAYERS = 32
HIDDEN, INNER, INTERMEDIATE, IN_PROJ = 1600, 3200, 5504, 8960
# name: (outputs, inputs, the extras it takes)
CASES = {"in_proj": (IN_PROJ, HIDDEN, ("norm_weight",)),
         "out_proj": (HIDDEN, INNER, ("norm_weight", "x2", "norm2_weight", "residual")),
         "gate_up": (INTERMEDIATE, HIDDEN, ("norm_weight", "up_weight")),
         "down_proj": (HIDDEN, INTERMEDIATE, ("residual",))}
# (weight elements a program holds, per weight; num_warps)
TILES = [(4096, 4), (8192, 4), (16384, 4), (16384, 8), (32768, 8)]


def per_call_us(fn, layers: list[dict]) -> float:
    """Microseconds per call of fn(**layer) in a captured graph of one call per layer."""
    return graph_time_us(lambda layer: fn(**layer), [(layer,) for layer in layers])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,2,4")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, or none")
    add_step_arguments(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{'case':>9} {'rows':>4} {'path':>26} {'us':>7} {'GB/s':>7} {'vs ref':>7}")
    for case in [c for c in args.cases.split(",") if c != "none"]:
        n, k, extras = CASES[case]
        for rows in map(int, args.rows.split(",")):
            def make(*shape, scale=1.0):
                return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * scale

            layers = [dict(x=make(rows, k), weight=make(n, k, scale=0.02)) for _ in range(LAYERS)]
            for layer in layers:
                full = dict(x2=make(rows, k), norm_weight=1 + make(k, scale=0.1), norm2_weight=1 + make(k, scale=0.1),
                            up_weight=make(n, k, scale=0.02), residual=make(rows, n))
                layer.update({name: full[name] for name in extras})
            weight_bytes = (2 if "up_weight" in extras else 1) * n * k * 2
            want = fused_linear_ref(**layers[0])
            ref = per_call_us(fused_linear_ref, layers)
            print(f"{case:>9} {rows:4d} {'reference':>26} {ref:7.2f} {weight_bytes / ref / 1e3:7.0f} {1.0:7.2f}")
            for (elements, warps), pdl in itertools.product(TILES, (False, True)):
                def fused(e=elements, w=warps, pdl=pdl, **layer):
                    return fused_rows_linear(**layer, tile_elements=e, num_warps=w, pdl=pdl)

                err = ((fused(**layers[0]).float() - want.float()).norm() / want.float().norm()).item()
                us = per_call_us(fused, layers)
                name = f"{elements} x w{warps}{' pdl' if pdl else ''}"
                print(f"{case:>9} {rows:4d} {name:>26} {us:7.2f} {weight_bytes / us / 1e3:7.0f} {ref / us:7.2f}"
                      + (f"  (rel. error {err:.1e})" if err > 1e-2 else ""), flush=True)
    if args.step:
        steps([int(r) for r in args.step_rows.split(",")], args.context, args.compile, linear, "FUSED_MAX_ROWS")


if __name__ == "__main__":
    main()
