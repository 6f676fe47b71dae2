"""One decode step's SSM inputs at Hymba-1.5B sizes (conv update, x_proj, dt/B/C norms, dt_proj): the fused
two-kernel op against the same steps as PyTorch ops compiled by inductor, as the decode step ran them before.

    python benchmarks/bench_ssm_step.py            # default launch parameters, against the compiled reference
    python benchmarks/bench_ssm_step.py --sweep    # the fused op over its two channel-block sizes
"""

import argparse

import torch
from triton.testing import do_bench

from hymba.ops.scan import ssm_step_inputs_ref
from hymba.ops.scan.triton_step import ssm_step_inputs_triton

d_inner, dt_rank, d_state, width = 3200, 100, 16, 4  # Hymba-1.5B


def inputs(batch: int):
    def rand(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * scale

    norms = (rand(dt_rank), rand(d_state), rand(d_state))
    return (rand(batch, d_inner, width - 1), rand(batch, 3 * d_inner)[:, d_inner:2 * d_inner],
            rand(d_inner, width), rand(d_inner), rand(dt_rank + 2 * d_state, d_inner, scale=d_inner ** -0.5),
            rand(d_inner, dt_rank, scale=dt_rank ** -0.5), norms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="time block_d_in x block_d_out")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    args = parser.parse_args()
    reference = torch.compile(ssm_step_inputs_ref, fullgraph=True, dynamic=False)
    print(f"{'batch':>5} {'compiled ref us':>15} {'fused us':>9} {'speedup':>7}")
    for batch in args.batches:
        state, x, conv_w, conv_b, x_proj, dt_proj, norms = inputs(batch)

        def fused(block_d_in=0, block_d_out=0, a=(state, x, conv_w, conv_b, x_proj, dt_proj, *norms)):
            return ssm_step_inputs_triton(*a, 1e-5, None, block_d_in, block_d_out)

        with torch.inference_mode():
            ref = lambda a=(state, x, conv_w, conv_b, x_proj, dt_proj, norms): reference(*a, 1e-5)  # noqa: E731
            t_ref = do_bench(ref, warmup=25, rep=100)
            t_fused = do_bench(fused, warmup=25, rep=100)
            print(f"{batch:5d} {t_ref * 1e3:15.1f} {t_fused * 1e3:9.1f} {t_ref / t_fused:7.2f}", flush=True)
            if args.sweep:
                for block_in in (32, 64, 128, 256):
                    for block_out in (32, 64, 128, 256):
                        t = do_bench(lambda i=block_in, o=block_out: fused(i, o), warmup=10, rep=50)
                        print(f"    block_d_in {block_in:3d} block_d_out {block_out:3d}  {t * 1e3:7.1f} us")


if __name__ == "__main__":
    main()
