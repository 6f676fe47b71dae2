"""Prefill attention at Hymba-1.5B shapes (8K tokens + 128 meta tokens, 25 query / 5 KV heads, dims 64/64/128).

    python benchmarks/bench_prefill_attention.py                    # needs CUDA
    python benchmarks/bench_prefill_attention.py --kernel-options   # FlexAttention launch parameters, index mask
    python benchmarks/bench_prefill_attention.py --backward         # forward + backward at the training shape

FlexAttention with the block mask `plan_attention` builds (per-row positions, as prefill uses it), against the
same mask written from indices alone (valid when no row is padded), and cuDNN SDPA's causal kernel for the global
layers (a global layer with no padding is plain causal attention). Prints time per call and TFLOP/s.
"""

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask
from triton.testing import do_bench

from hymba.ops.attention import FLEX_TRAINING_OPTIONS, _compiled_flex, _flex_block_mask

B, L, HQ, HKV, DQK, DV, META, WINDOW = 4, 8192 + 128, 25, 5, 64, 128, 128, 1024


def index_mask(window):
    def visible(b, h, qi, ki):
        seen = ki <= qi
        if window is not None:
            seen = seen & ((qi - ki <= window) | (ki < META))
        return seen
    return create_block_mask(visible, None, None, L, L, device="cuda")


# FlexAttention's Triton kernel parameters to try (None: its defaults for the device and head dims).
KERNEL_OPTIONS = [None, dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
                  dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
                  dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
                  dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)]


def sweep_kernel_options(q, k, v, flex) -> None:
    print(f"{'layer':>8} {'kernel options':>60} {'ms':>8}")
    for window in (WINDOW, None):
        mask = index_mask(window)
        for options in KERNEL_OPTIONS:
            run = lambda o=options, m=mask: flex(q, k, v, block_mask=m, enable_gqa=True, kernel_options=o)  # noqa: E731
            try:
                run()
                cell = f"{do_bench(run, warmup=5, rep=20):8.2f}"
            except Exception as exc:  # noqa: BLE001 - a rejected option set is a result too
                cell = str(exc).splitlines()[0][:60]
            print(f"{'global' if window is None else 'window':>8} {str(options or 'default'):>60} {cell}")


# Forward + backward at `hymba bench train`'s 1.5B shape (8 rows of 2,048 tokens + 128 meta tokens). "fwd_" and
# "bwd_" prefixes give an option to one pass only; the backward's kernels take BLOCK_M1/N1 (dK, dV) and BLOCK_M2/N2
# (dQ). The second set is what training runs now (`FLEX_TRAINING_OPTIONS`).
TRAIN_B, TRAIN_L = 8, 2048 + 128
INFERENCE_FORWARD = {k: v for k, v in FLEX_TRAINING_OPTIONS[(9, 0)].items() if k.startswith("fwd_")}  # inference's
BACKWARD_OPTIONS = [None, FLEX_TRAINING_OPTIONS[(9, 0)], INFERENCE_FORWARD,
                    {**INFERENCE_FORWARD, "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128,
                     "bwd_BLOCK_N2": 64, "bwd_num_warps": 8, "bwd_num_stages": 3},
                    {**INFERENCE_FORWARD, "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128,
                     "bwd_BLOCK_N2": 32, "bwd_num_warps": 4, "bwd_num_stages": 3},
                    {**INFERENCE_FORWARD, "bwd_BLOCK_M1": 128, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64,
                     "bwd_BLOCK_N2": 128, "bwd_num_warps": 8, "bwd_num_stages": 2},
                    {**FLEX_TRAINING_OPTIONS[(9, 0)], "bwd_num_stages": 2},
                    {**FLEX_TRAINING_OPTIONS[(9, 0)], "bwd_num_warps": 8}]


def sweep_backward_options(flex) -> None:
    q, k, v = (torch.randn(TRAIN_B, h, TRAIN_L, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h, d in ((HQ, DQK), (HKV, DQK), (HKV, DV)))
    grad = torch.randn(TRAIN_B, HQ, TRAIN_L, DV, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(TRAIN_L, device="cuda").expand(TRAIN_B, TRAIN_L)
    for index, options in enumerate(BACKWARD_OPTIONS):
        print(f"set {index}: {options or 'the defaults'}")
    print(f"{'layer':>8} {'set':>4} {'fwd+bwd ms':>10} {'max dq err':>10}")
    for window in (WINDOW, None):
        mask = _flex_block_mask(pos, pos, None, window, META)
        reference = None
        for index, options in enumerate(BACKWARD_OPTIONS):
            def run(o=options, m=mask):
                q.grad = k.grad = v.grad = None
                flex(q, k, v, block_mask=m, enable_gqa=True, kernel_options=o).backward(grad)
            try:
                run()
                reference = q.grad.clone() if reference is None else reference
                err = (q.grad.float() - reference.float()).abs().max().item()
                cell = f"{do_bench(run, warmup=3, rep=20):10.2f} {err:10.1e}"
            except Exception as exc:  # noqa: BLE001 - a rejected option set is a result too
                cell = str(exc).splitlines()[0][:80]
            print(f"{'global' if window is None else 'window':>8} {index:>4} {cell}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel-options", action="store_true", help="sweep FlexAttention's kernel options")
    parser.add_argument("--backward", action="store_true",
                        help="sweep forward + backward kernel options at the training shape")
    args = parser.parse_args()
    if args.backward:
        sweep_backward_options(_compiled_flex())
        return
    q = torch.randn(B, HQ, L, DQK, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, HKV, L, DQK, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, HKV, L, DV, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(L, device="cuda").expand(B, L)
    flex = _compiled_flex()
    if args.kernel_options:
        sweep_kernel_options(q, k, v, flex)
        return
    print(f"{'layer':>8} {'variant':>28} {'ms':>8} {'TFLOP/s':>8} {'max err':>8}")
    for window in (WINDOW, None):
        masks = {"flex, per-row positions": _flex_block_mask(pos, pos, None, window, META),
                 "flex, index mask": index_mask(window)}
        outs = {}
        for name, mask in masks.items():
            run = lambda m=mask: flex(q, k, v, block_mask=m, enable_gqa=True)  # noqa: E731
            outs[name] = run()
            ms = do_bench(run, warmup=5, rep=20)
            flops = 4 * B * HQ * L * (DQK + DV) / 2 * (L * (1 - mask.sparsity() / 100))
            err = (outs[name].float() - outs["flex, per-row positions"].float()).abs().max().item()
            print(f"{'global' if window is None else 'window':>8} {name:>28} {ms:8.2f} {flops / ms / 1e9:8.0f} "
                  f"{err:8.1e}")
        if window is None:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                run = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
                try:
                    out = run()
                    ms = do_bench(run, warmup=5, rep=20)
                    err = (out.float() - outs["flex, per-row positions"].float()).abs().max().item()
                    print(f"{'global':>8} {'cuDNN SDPA causal':>28} {ms:8.2f} "
                          f"{4 * B * HQ * L * L / 2 * (DQK + DV) / 2 / ms / 1e9:8.0f} {err:8.1e}")
                except RuntimeError as exc:
                    print(f"cuDNN SDPA causal: {str(exc).splitlines()[0]}")


if __name__ == "__main__":
    main()
