"""The Triton selective scan at Hymba-1.5B shapes: the walk over positions against the parallel forward (and
backward) over blocks of positions, by channels per program.

    python benchmarks/bench_scan.py                 # needs CUDA and Triton
    python benchmarks/bench_scan.py --batches 1,8 --length 640
    python benchmarks/bench_scan.py --batches 8 --length 2176 --backward   # forward + backward, as training runs it
    python benchmarks/bench_scan.py --batches 8 --length 2176 --backward --segments   # the walks in segments
    python benchmarks/bench_scan.py --batches 1,8 --segments                          # prefill's forward in segments

The walk: one program per `block_d` channels steps through every position with block_d / 32 warps, so time per
position is the latency of one step of the recurrence. The parallel kernels (`block_l` positions per block) scan
each block at once and carry only the state from block to block. Each row is checked against the walk (its output,
or with --backward the gradient of its input u). With --backward the walk cases also run with the walk backward's
warps per program and with its inputs loaded a step ahead (`WALK_BACKWARD_SETTINGS`; "4 ahead" is 4 warps, loading
ahead).

With --segments, the walk (32 channels a program) by its segments of positions (`FORWARD_SEGMENTS`,
`BACKWARD_SEGMENTS`; "auto" is `scan_segments`' choice, shown in brackets) and the backward's cap on registers
(`BACKWARD_MAX_REGISTERS`), each against the unsegmented walk and checked against it: with --backward, forward +
backward at chunks of 64 and 16, in every input's gradient; without, the forward alone, as prefill runs it, and at
a batch whose walk has at most 128 programs also the parallel forward prefill runs there.
"""

import argparse

import torch
from triton.testing import do_bench

from hymba.ops.scan import triton as scan_triton
from hymba.ops.scan.triton import selective_scan_triton

D_INNER, D_STATE = 3200, 16
# (block_d, block_l, backward block_l, chunk): the forward without gradients saves no states, so its chunk is moot; the
# walk's backward recomputes each chunk's states into a scratch of chunk x block_d x d_state floats per program (in
# L2 when small); a parallel backward saves a state per block of its own.
CASES = [(16, None, None, 64), (32, None, None, 64), (64, None, None, 64), (8, 16, 16, 16), (16, 16, 16, 16),
         (32, 16, 16, 16), (16, 32, 32, 32), (16, 64, 64, 64), (32, 8, 8, 8)]
# (The parallel backwards, (8, 16, 16, 16) to (8, None, 16, 16) here in session 18, ran at 0.44-0.61x the walk.)
# 16 and 64 channels per one-warp walk: fewer cross-lane sums per channel for dB and dC, against fewer lanes' worth of
# work per program (16) or twice the registers per lane (64).
BACKWARD_CASES = [(32, None, None, 64), (32, None, None, 32), (32, None, None, 16), (16, None, None, 16),
                  (16, None, None, 64), (64, None, None, 64), (8, 16, 16, 16), (32, None, 16, 16)]
# (forward segments, backward segments, backward's max registers) for --segments --backward; None segments is "auto".
SEGMENT_CASES = [(1, 1, None), (1, 1, 168), (1, None, None), (1, None, 168), (1, 3, 168), (1, 5, 168), (1, 8, 168),
                 (1, 12, 168), (1, 5, 152), (None, None, 168), (4, 1, None), (8, 1, None)]
# Forward segments for --segments without --backward (prefill's walk): batch 1's 100 programs fill few SMs.
FORWARD_ONLY_SEGMENTS = [1, None, 2, 4, 8, 16]
# The walk backward's (warps per program, inputs loaded a step ahead), for the walk cases of BACKWARD_CASES;
# (1, True) is the default (`hymba.ops.scan.triton.BACKWARD_WALK_WARPS` / `BACKWARD_PREFETCH`). Session 19 on an H200
# also ran (4, True): 0.79x, (2, True): 0.96x and (8, True): 0.36x of the (4, False) walk that (1, True) beat 2.0x.
WALK_BACKWARD_SETTINGS = [(1, True), (1, False), (4, False)]


def scan_inputs(batch: int, length: int, backward: bool, dev: str = "cuda"):
    """(leaves, (u, delta, z, B, C), A, D, bias, dy) at the 1.5B shape: the activations position-major, as the model
    passes them ((batch, L, channels) memory viewed as (batch, d, L)), and their leaves for the gradients."""
    leaves = [torch.randn(batch, length, n, device=dev, dtype=torch.bfloat16, requires_grad=backward)
              for n in (D_INNER, D_INNER, D_INNER, D_STATE, D_STATE)]
    activations = tuple(t.transpose(1, 2) for t in leaves)
    A = -torch.rand(D_INNER, D_STATE, device=dev)
    D, bias = torch.ones(D_INNER, device=dev), torch.zeros(D_INNER, device=dev)
    return leaves, activations, A, D, bias, torch.randn_like(activations[0])


def bench_batch(batch: int, length: int, backward: bool, walk_only: bool) -> None:
    leaves, (u, delta, z, B, C), A, D, bias, dy = scan_inputs(batch, length, backward)

    def scan(block_d, block_l=None, backward_block_l=None, chunk=64):
        for leaf in leaves:
            leaf.grad = None
        y, _ = selective_scan_triton(u, delta, A, B, C, D, z, bias, True, block_d=block_d, block_l=block_l,
                                     backward_block_l=backward_block_l, chunk=chunk)
        if backward:
            y.backward(dy)
            return leaves[0].grad.detach().clone()
        return y.detach()

    want = scan(32)
    baseline = do_bench(lambda: scan(32), warmup=3, rep=10, grad_to_none=leaves)
    defaults = scan_triton.BACKWARD_WALK_WARPS, scan_triton.BACKWARD_PREFETCH
    cases = BACKWARD_CASES if backward else CASES
    runs = [(case, defaults) for case in cases if not (walk_only and (case[1] or case[2]))]  # block_l, backward's
    if backward and not walk_only:  # the walk backward's own knobs, on its walk cases
        runs += [(case, setting) for case in BACKWARD_CASES if case[2] is None
                 for setting in WALK_BACKWARD_SETTINGS if setting != defaults]
    for case, (warps, prefetch) in runs:
        scan_triton.BACKWARD_WALK_WARPS, scan_triton.BACKWARD_PREFETCH = warps, prefetch
        got = scan(*case)
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        ms = do_bench(lambda c=case: scan(*c), warmup=3, rep=10, grad_to_none=leaves)
        block_d, block_l, backward_block_l, chunk = case
        programs = batch * -(-D_INNER // block_d)
        walk = f"{warps}{' ahead' if prefetch else ''}" if backward and backward_block_l is None else "-"
        print(f"{batch:5d} {block_d:7d} {str(block_l):>7} {str(backward_block_l):>8} {chunk:5d} {walk:>10} "
              f"{programs:8d} {ms:8.2f} {ms * 1e6 / length:11.0f} {baseline / ms:10.2f}"
              + (f"  (rel. error {err:.1e})" if err > 1e-2 else ""), flush=True)
    scan_triton.BACKWARD_WALK_WARPS, scan_triton.BACKWARD_PREFETCH = defaults


def bench_segments(batch: int, length: int, backward: bool) -> None:
    dev = "cuda"
    leaves, (u, delta, z, B, C), A, D, bias, dy = scan_inputs(batch, length, backward, dev)
    knobs = ("FORWARD_SEGMENTS", "BACKWARD_SEGMENTS", "BACKWARD_MAX_REGISTERS")
    defaults = [getattr(scan_triton, knob) for knob in knobs]

    def scan(chunk, block_l=None):
        for leaf in leaves:
            leaf.grad = None
        y, _ = selective_scan_triton(u, delta, A, B, C, D, z, bias, True, block_d=8 if block_l else 32, chunk=chunk,
                                     block_l=block_l)
        if not backward:
            return [y.detach().float()]
        y.backward(dy)
        return [leaf.grad.detach().float().clone() for leaf in leaves]

    def show(label, chunk, forward, backward_segments, registers, got, ms):
        err = max(((g - w).norm() / w.norm()).item() for g, w in zip(got, want))
        print(f"{batch:5d} {label:>14} {chunk:5d} {forward:>9} {backward_segments:>9} {str(registers):>8} {ms:8.2f} "
              f"{baseline / ms:8.2f}  (largest rel. error {err:.1e})", flush=True)

    def chosen(knob, walk, units):  # the segments a None knob resolves to, as "auto [n]"
        n = walk(batch * -(-D_INNER // 32), units, torch.device(dev))
        return f"auto [{n}]" if knob is None else str(n)

    for knob, value in zip(knobs, (1, 1, None)):
        setattr(scan_triton, knob, value)
    want = scan(64)
    baseline = do_bench(lambda: scan(64), warmup=3, rep=10, grad_to_none=leaves)
    if not backward and batch * -(-D_INNER // 32) <= 128:  # what prefill runs at this batch: the parallel forward
        show("parallel fwd", 16, 1, "-", None, scan(16, 16), do_bench(lambda: scan(16, 16), warmup=3, rep=10))
    cases = SEGMENT_CASES if backward else [(f, 1, None) for f in FORWARD_ONLY_SEGMENTS]
    for chunk in (64, 16) if backward else (64,):
        for forward, backward_segments_, registers in cases:
            for knob, value in zip(knobs, (forward, backward_segments_, registers)):
                setattr(scan_triton, knob, value)
            got = scan(chunk)
            ms = do_bench(lambda c=chunk: scan(c), warmup=3, rep=10, grad_to_none=leaves)
            units = -(-length // chunk) if backward else -(-length // 4)
            show("walk", chunk, chosen(forward, scan_triton.forward_segments, units),
                 chosen(backward_segments_, scan_triton.backward_segments, -(-length // chunk)) if backward else "-",
                 registers, got, ms)
    for knob, value in zip(knobs, defaults):
        setattr(scan_triton, knob, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--length", type=int, default=8192 + 128, help="positions, meta tokens included")
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--walk-only", action="store_true",
                        help="only the walk's cases (no parallel forward or backward), with the default walk settings")
    parser.add_argument("--segments", action="store_true",
                        help="forward + backward of the walk by the backward's segments and register cap")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.segments:
        print(f"{'batch':>5} {'kernel':>14} {'chunk':>5} {'fwd segs':>9} {'bwd segs':>9} {'max regs':>8} {'ms':>8} "
              f"{'vs 1 x 64':>8}")
        for batch in (int(b) for b in args.batches.split(",")):
            bench_segments(batch, args.length, args.backward)
        return
    header = [("batch", 5), ("block_d", 7), ("block_l", 7), ("bwd bl", 8), ("chunk", 5), ("bwd warps", 10),
              ("programs", 8), ("ms", 8), ("ns/position", 11), ("vs walk 32", 10)]
    print(" ".join(f"{name:>{width}}" for name, width in header))
    for batch in (int(b) for b in args.batches.split(",")):
        bench_batch(batch, args.length, args.backward, args.walk_only)


if __name__ == "__main__":
    main()
