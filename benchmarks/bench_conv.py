"""The causal conv's forward + backward at Hymba-1.5B's training shape: the backward as autograd through the
reference (float32 copies, a cat, PyTorch's depthwise conv) against the Triton backward kernel, in one process.

    python benchmarks/bench_conv.py                           # needs CUDA and Triton
    python benchmarks/bench_conv.py --batches 1,8 --length 2176

If the kernel wins, `hymba.ops.conv.triton.TRITON_BACKWARD = True` makes training use it. Each run's input gradient
is checked against the reference's (any relative error above 1e-2 is printed).
"""

import argparse

import torch
from triton.testing import do_bench

from hymba.ops.conv import triton as conv_triton
from hymba.ops.conv.triton import causal_conv1d_triton

D_INNER, WIDTH = 3200, 4


def bench_batch(batch: int, length: int) -> None:
    # Position-major, as the model's in_proj output: (batch, L, channels) memory viewed as (batch, d, L).
    leaf = torch.randn(batch, length, D_INNER, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x = leaf.transpose(1, 2)
    weight = (torch.randn(D_INNER, WIDTH, device="cuda") / 2).requires_grad_()
    bias = torch.randn(D_INNER, device="cuda").requires_grad_()
    dout = torch.randn_like(x)
    # x, the output gradient and dx: the bytes any backward must move, and the forward's x and out.
    nbytes = 5 * leaf.numel() * leaf.element_size()

    def run():
        leaf.grad = weight.grad = bias.grad = None
        out, _ = causal_conv1d_triton(x, weight, bias)
        out.backward(dout)
        return leaf.grad

    times = {}
    for kernel in (False, True):
        conv_triton.TRITON_BACKWARD = kernel
        got = run().float()
        if not kernel:
            want = got
        err = ((got - want).norm() / want.norm()).item()
        times[kernel] = do_bench(run, warmup=3, rep=20, grad_to_none=[leaf, weight, bias])
        print(f"{batch:5d} {'triton' if kernel else 'autograd':>10} {times[kernel]:10.3f} "
              f"{nbytes / times[kernel] / 1e6:7.0f} {times[False] / times[kernel]:11.2f}"
              + (f"  (rel. error {err:.1e})" if err > 1e-2 else ""), flush=True)
    conv_triton.TRITON_BACKWARD = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="8", help="comma-separated batch sizes (default 8)")
    parser.add_argument("--length", type=int, default=2048 + 128, help="positions, meta tokens included")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{'batch':>5} {'backward':>10} {'fwd+bwd ms':>10} {'GB/s':>7} {'vs autograd':>11}")
    for batch in (int(b) for b in args.batches.split(",")):
        bench_batch(batch, args.length)


if __name__ == "__main__":
    main()
