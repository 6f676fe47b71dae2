"""One decode step's SSM inputs at Hymba-1.5B sizes (conv update, x_proj, dt/B/C norms, dt_proj): the fused
four-kernel op against the same steps as PyTorch ops compiled by inductor, as the decode step ran them before.

    python benchmarks/bench_ssm_step.py            # default launch parameters, against the compiled reference
    python benchmarks/bench_ssm_step.py --sweep    # the fused op over its two channel-block sizes
    python benchmarks/bench_ssm_step.py --whole --batches 1 2 4 8 16 [--sweep]
        # the whole step: the four input kernels + the state update against ssm_step_triton's two kernels and
        # ssm_step_rows_triton's four (--sweep: the latter's block sizes past 2 rows)
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from hymba.ops.scan import ssm_step_inputs_ref
from hymba.ops.scan.triton import selective_state_update_triton
from hymba.ops.scan.triton_step import ssm_step_inputs_triton, ssm_step_rows_triton, ssm_step_triton

d_inner, dt_rank, d_state, width = 3200, 100, 16, 4  # Hymba-1.5B


def inputs(batch: int):
    def rand(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * scale

    norms = (rand(dt_rank), rand(d_state), rand(d_state))
    return (rand(batch, d_inner, width - 1), rand(batch, 3 * d_inner)[:, d_inner:2 * d_inner],
            rand(d_inner, width), rand(d_inner), rand(dt_rank + 2 * d_state, d_inner, scale=d_inner ** -0.5),
            rand(d_inner, dt_rank, scale=dt_rank ** -0.5), norms)


def step_inputs(batch: int):
    """`inputs` plus the SSM state, z, dt_proj's bias, A_log and D."""
    state, x, conv_w, conv_b, x_proj, dt_proj, norms = inputs(batch)
    A_log = torch.log(torch.arange(1, d_state + 1, device="cuda", dtype=torch.float32)).expand(d_inner, -1)
    return (state, torch.randn(batch, d_inner, d_state, device="cuda"), x,
            torch.randn(batch, 2 * d_inner, device="cuda", dtype=torch.bfloat16)[:, d_inner:], conv_w, conv_b, x_proj,
            dt_proj, torch.randn(d_inner, device="cuda", dtype=torch.bfloat16) - 2, A_log.contiguous(),
            torch.ones(d_inner, device="cuda", dtype=torch.bfloat16), norms)


def whole_step(batches: list[int], layers: int, sweep: bool) -> None:
    def unfused(conv, ssm, x, z, conv_w, conv_b, x_proj, dt_proj, dt_bias, A_log, D, norms):
        u, delta, B, C = ssm_step_inputs_triton(conv, x, conv_w, conv_b, x_proj, dt_proj, *norms, 1e-5)
        return selective_state_update_triton(ssm, u, delta, A_log, B, C, D, z, dt_bias, A_is_log=True)

    def fused(conv, ssm, x, z, conv_w, conv_b, x_proj, dt_proj, dt_bias, A_log, D, norms, block_d_in=0, block_c=0):
        return ssm_step_triton(conv, ssm, x, z, conv_w, conv_b, x_proj, dt_proj, dt_bias, A_log, D, *norms, 1e-5,
                               None, block_d_in, block_c)

    def rows(conv, ssm, x, z, conv_w, conv_b, x_proj, dt_proj, dt_bias, A_log, D, norms, block_c=0, warps=0):
        return ssm_step_rows_triton(conv, ssm, x, z, conv_w, conv_b, x_proj, dt_proj, dt_bias, A_log, D, *norms,
                                    1e-5, None, block_c, warps)

    print(f"{'batch':>5} {'5 kernels us':>12} {'2 kernels us':>12} {'4 (rows) us':>12} {'speedup':>7}")
    for batch in batches:
        sets = [step_inputs(batch) for _ in range(layers)]
        want = unfused(*(a.clone() if torch.is_tensor(a) else a for a in sets[0]))
        errs = []
        for step in (fused, rows):
            got = step(*(a.clone() if torch.is_tensor(a) else a for a in sets[0]))
            errs.append(((got.float() - want.float()).norm() / want.float().norm()).item())
        t_old, t_new, t_rows = (graph_time_us(step, sets) for step in (unfused, fused, rows))
        print(f"{batch:5d} {t_old:12.1f} {t_new:12.1f} {t_rows:12.1f} {t_old / min(t_new, t_rows):7.2f}   "
              f"(y rel. err. {errs[0]:.1e}, {errs[1]:.1e})", flush=True)
        if sweep and batch > 2:
            for block_c in (16, 32, 64):
                for warps in (2, 4, 8):
                    t = graph_time_us(lambda *a, c=block_c, w=warps: rows(*a, c, w), sets)
                    print(f"    rows: block_c {block_c:3d} warps {warps}  {t:7.1f} us", flush=True)
        if sweep and batch <= 2:
            for block_in in (32, 64, 128):
                for block_c in (16, 32, 64):
                    t = graph_time_us(lambda *a, i=block_in, c=block_c: fused(*a, i, c), sets)
                    print(f"    block_d_in {block_in:3d} block_c {block_c:3d}  {t:7.1f} us", flush=True)


def graph_time_us(fn, sets, replays: int = 20) -> float:
    """GPU time per call: one CUDA graph calls `fn` once per input set (distinct buffers, together larger than the
    L2 cache, as successive layers are), replayed; CPU launch overhead is not counted, as in the decode graph."""
    for args in sets:  # compile and warm up outside the graph
        fn(*args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in sets:
            fn(*args)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * len(sets))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="time block_d_in x block_d_out")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--layers", type=int, default=16, help="input sets per graph (distinct buffers)")
    parser.add_argument("--whole", action="store_true", help="the whole step (inputs, state update, gate)")
    args = parser.parse_args()
    if args.whole:
        with torch.inference_mode():
            whole_step(args.batches, args.layers, args.sweep)
        return
    reference = torch.compile(ssm_step_inputs_ref, fullgraph=True, dynamic=False)

    def fused(state, x, conv_w, conv_b, x_proj, dt_proj, norms, block_d_in=0, block_d_out=0):
        return ssm_step_inputs_triton(state, x, conv_w, conv_b, x_proj, dt_proj, *norms, 1e-5, None, block_d_in,
                                      block_d_out)

    print(f"{'batch':>5} {'compiled ref us':>15} {'fused us':>9} {'speedup':>7}")
    with torch.inference_mode():
        for batch in args.batches:
            sets = [inputs(batch) for _ in range(args.layers)]
            t_ref = graph_time_us(lambda *a: reference(*a, 1e-5), sets)
            t_fused = graph_time_us(fused, sets)
            print(f"{batch:5d} {t_ref:15.1f} {t_fused:9.1f} {t_ref / t_fused:7.2f}", flush=True)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fused(*sets[0])
                torch.cuda.synchronize()
            for event in prof.key_averages():
                print(f"    {event.key[:60]:60s} {event.device_time:7.1f} us")
            if args.sweep:
                for block_in in (16, 32, 64, 128):
                    for block_out in (32, 64, 128, 256):
                        t = graph_time_us(lambda *a, i=block_in, o=block_out: fused(*a, i, o), sets)
                        print(f"    block_d_in {block_in:3d} block_d_out {block_out:3d}  {t:7.1f} us", flush=True)


if __name__ == "__main__":
    main()
