"""The MLP's gate/up projections and SwiGLU at decode batches, Hymba-1.5B's shape: two cuBLAS GEMVs and the compiled
SwiGLU (what the model runs) against the fused Triton kernel (`hymba.ops.mlp.triton`) over its tile sizes.

    python benchmarks/bench_mlp.py                    # needs CUDA and Triton
    python benchmarks/bench_mlp.py --rows 1,2,4,8,16,32,64,128
    python benchmarks/bench_mlp.py --step --step-rows 1,8,32  # and the decode step with the kernel off and on

`--step` also times the whole decode step (Hymba-1.5B, random weights, a `--context`-token cache, captured as a CUDA
graph; `--compile` compiles it first) with the fused kernel off and on, in the same process.

Times are of CUDA-graph replays (`triton.testing.do_bench_cudagraph`), as the decode step runs them, so launch
overhead is not counted. GB/s counts the two weights read (2 x 5504 x 1600 bf16, 35.2 MB). Each fused row is checked
against the plain path. If a fused configuration beats the plain path at every row count up to some n, setting
`hymba.ops.mlp.FUSED_MAX_ROWS = n` (and its tile sizes as the module's defaults) makes the model use it.
"""

import argparse

import torch
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench_cudagraph

from hymba.bench import build_engine_model, engine_decode
from hymba.config import HymbaConfig
from hymba.ops import mlp
from hymba.ops.mlp import gate_up_swiglu_ref
from hymba.ops.mlp.triton import gate_up_swiglu_triton

HIDDEN, INTERMEDIATE = 1600, 5504
# (block_n, block_k, num_warps, num_stages)
CONFIGS = [(32, 128, 4, 4), (64, 128, 4, 4), (64, 128, 4, 3), (64, 64, 4, 4), (64, 256, 4, 2), (128, 64, 4, 4),
           (128, 128, 8, 3), (64, 128, 8, 4), (32, 64, 4, 4), (32, 128, 8, 3), (64, 64, 8, 3), (128, 64, 8, 3)]


def kernels(rows_list: list[int]) -> None:
    torch.manual_seed(0)
    gate, up = (torch.randn(INTERMEDIATE, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(2))
    weight_bytes = 2 * gate.numel() * gate.element_size()
    print(f"{'rows':>4} {'path':>28} {'us':>7} {'GB/s':>7} {'vs plain':>8}")
    for rows in rows_list:
        x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)
        want = gate_up_swiglu_ref(x, gate, up)
        plain = do_bench_cudagraph(lambda x=x: gate_up_swiglu_ref(x, gate, up)) * 1e3
        print(f"{rows:4d} {'cuBLAS x2 + SwiGLU':>28} {plain:7.1f} {weight_bytes / plain / 1e3:7.0f} {1.0:8.2f}")
        for block_n, block_k, warps, stages in CONFIGS:
            def fused(x=x, bn=block_n, bk=block_k, w=warps, s=stages):
                return gate_up_swiglu_triton(x, gate, up, block_n=bn, block_k=bk, num_warps=w, num_stages=s)

            name = f"fused n{block_n} k{block_k} w{warps} s{stages}"
            try:
                err = ((fused().float() - want.float()).norm() / want.float().norm()).item()
            except OutOfResources:  # the tiles at this many rows need more shared memory than the GPU has
                print(f"{rows:4d} {name:>28} {'(tiles exceed shared memory)':>24}")
                continue
            us = do_bench_cudagraph(fused) * 1e3
            print(f"{rows:4d} {name:>28} {us:7.1f} {weight_bytes / us / 1e3:7.0f} {plain / us:8.2f}"
                  + (f"  (rel. error {err:.1e})" if err > 1e-2 else ""), flush=True)


@torch.inference_mode()  # as generate and the engine decode: the fused kernels never run where gradients are wanted
def steps(rows_list: list[int], context: int, compile: bool, module=mlp, limit_name: str = "FUSED_MAX_ROWS") -> None:
    """The whole decode step at each row count with `module.<limit_name>` (the rows a fused kernel runs for) at 0 and
    at the largest row count, in one process."""
    config = HymbaConfig.preset("hymba-1.5b")
    model = build_engine_model(config, torch.device("cuda"), torch.bfloat16)
    fused_rows = max(rows_list)
    print(f"\ndecode step, hymba-1.5b, {context}-token cache, {'compiled, ' if compile else ''}captured, "
          f"{module.__name__}.{limit_name} 0 / {fused_rows}")
    print(f"{'rows':>4} {'plain ms':>9} {'fused ms':>9} {'speed-up':>8}")
    default = getattr(module, limit_name)
    for rows in rows_list:
        ms = {}
        for limit in (0, fused_rows):
            setattr(module, limit_name, limit)  # read when the step is captured (or compiled)
            run = engine_decode(model, context, rows, steps=64, warmup=8, fill="synthetic", device=model.device,
                                compile=compile)
            ms[limit] = run["seconds"] / 64 * 1e3
        print(f"{rows:4d} {ms[0]:9.3f} {ms[fused_rows]:9.3f} {ms[0] / ms[fused_rows]:8.2f}", flush=True)
    setattr(module, limit_name, default)


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `steps`, shared by the kernel benchmarks that time the decode step with their kernel on."""
    parser.add_argument("--step", action="store_true", help="also time the whole decode step, the kernel off and on")
    parser.add_argument("--step-rows", default="1,8,32", help="row counts for --step (the kernel runs up to the "
                        "largest)")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--compile", action="store_true", help="--step: compile the step before capturing it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,8,32,128", help="comma-separated row counts (default 1,8,32,128)")
    add_step_arguments(parser)
    args = parser.parse_args()
    kernels([int(r) for r in args.rows.split(",")])
    if args.step:
        steps([int(r) for r in args.step_rows.split(",")], args.context, args.compile)


if __name__ == "__main__":
    main()
