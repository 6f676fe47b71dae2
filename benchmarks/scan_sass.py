"""The selective scan's walk kernels compiled offline for sm_90, without a GPU: registers per thread, and SASS
instructions per step of each loop, for the 1.5B training shape (batch 8, 2,176 positions, 3,200 channels).

    python benchmarks/scan_sass.py                      # the forward walk and the backward walk
    python benchmarks/scan_sass.py --chunk 16 --ops     # chunks of 16, with each loop's most frequent instructions
    python benchmarks/scan_sass.py --waits              # where a load's scoreboard is shared with a shuffle or MUFU

`hymba.ops.offline` compiles the kernels for an H100/H200 target with the arguments specialised as Triton's JIT
specialises them, and the cuobjdump bundled in Triton's wheel disassembles them. A loop is the code between a
backward branch and its target; at one warp per program its instruction count is what each position costs one
program. Session 22 used this to find that `tl.exp` is five instructions on sm_90 where `tl.exp2` is one; session 23
used `--waits` (the scoreboard bits of the instruction words) to find that the reverse loop's first use of a
shuffle's result waits for the step-ahead loads. Timing still needs the GPU (`bench_scan.py`).
"""

import argparse
import collections
import re

import torch

from hymba.ops.offline import compile_sm90, cuobjdump
from hymba.ops.scan import triton as scan_triton

BATCH, D_INNER, D_STATE, LENGTH = 8, 3200, 16, 2176
SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9.]*)(.*?);")
# An instruction with the second (high) word of its encoding, which holds the control bits: on Volta and later, the
# scoreboard the instruction sets when its result is written (bits 46-48 of that word, 7 = none), the one it sets when
# its sources have been read (49-51), and the mask of scoreboards it waits on first (52-57).
SASS_WORDS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);\s*/\* 0x[0-9a-f]{16} \*/\s*\n\s*/\* 0x([0-9a-f]{16}) \*/")


def load_waits(sass: str, first: int, last: int) -> list[str]:
    """The loop's waits on a global load's scoreboard that a short-latency instruction (a shuffle, MUFU, shared memory
    load) shares: there, a use of that instruction's result also waits for the load. Each line gives the waiting
    instruction and how many instructions before it the loads were issued. Simulates the loop body twice, so that the
    loads of one step reach the waits of the next."""
    body = []
    for m in SASS_WORDS.finditer(sass):
        address, text, control = int(m.group(1), 16), m.group(2).strip(), int(m.group(3), 16)
        if first <= address <= last:
            body.append((text, (control >> 46) & 7, (control >> 49) & 7, (control >> 52) & 0x3F))
    pending = {board: [] for board in range(6)}  # scoreboard -> [(step, text)] set since its last wait
    lines = []
    for step in range(2 * len(body)):
        text, on_write, on_read, waits = body[step % len(body)]
        for board in range(6):
            if waits >> board & 1:
                loads = [step - s for s, t in pending[board] if "LDG" in t]
                others = [t.split()[0] for _, t in pending[board] if "LDG" not in t]
                if step >= len(body) and loads and others:
                    lines.append(f"    {step - len(body):4d} {text[:44]:44s} waits on loads issued {sorted(loads)} "
                                 f"instructions before, sharing their scoreboard with {others[0]}")
                pending[board] = []
        if on_write != 7:
            pending[on_write].append((step, text))
        if on_read != 7 and "LDG" not in text:  # a load's read scoreboard frees its address registers: short
            pending[on_read].append((step, text))
    return lines


def report(title: str, cubin: bytes, show_ops: bool, show_waits: bool = False) -> None:
    usage, sass = cuobjdump(cubin, "-res-usage"), cuobjdump(cubin, "-sass")
    registers = re.search(r"REG:(\d+)", usage).group(1)
    code = [(int(m.group(1), 16), m.group(3), m.group(4)) for m in SASS_LINE.finditer(sass)]
    print(f"{title}: {registers} registers a thread, {len(code)} SASS instructions")
    loops = []  # (first, last address): a backward branch closes a loop
    for address, op, operands in code:
        target = re.search(r"0x([0-9a-f]+)", operands)
        if op == "BRA" and target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    for first, last in loops:
        if any(first <= a and b <= last and (a, b) != (first, last) for a, b in loops):
            print(f"  loop {first:#06x}-{last:#06x}: the outer loop around the ones above")
            continue
        body = [op for address, op, _ in code if first <= address <= last]
        line = f"  loop {first:#06x}-{last:#06x}: {len(body)} instructions a step"
        spills = sum(op.startswith(("LDL", "STL")) for op in body)
        if spills:
            line += f" ({spills} of them local-memory spills)"
        if show_ops:
            line += ": " + ", ".join(f"{op} {n}" for op, n in collections.Counter(body).most_common(8))
        print(line)
        if show_waits:
            print("\n".join(load_waits(sass, first, last)))


def position_major(batch: int, channels: int, length: int) -> torch.Tensor:
    """An activation as the model passes it: (batch, L, channels) memory viewed as (batch, channels, L)."""
    return torch.empty(batch, length, channels, dtype=torch.bfloat16).transpose(1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunk", type=int, default=scan_triton.DEFAULT_CHUNK, help="positions between saved states")
    parser.add_argument("--block-d", type=int, default=32, help="channels per program")
    parser.add_argument("--ops", action="store_true", help="each loop's most frequent instructions")
    parser.add_argument("--waits", action="store_true",
                        help="each loop's waits on a load whose scoreboard a short-latency instruction shares")
    parser.add_argument("--segments", type=int, default=1,
                        help="the walks' segments of positions (more than 1 adds the states' and the carries' walks)")
    parser.add_argument("--max-registers", type=int, default=scan_triton.BACKWARD_MAX_REGISTERS,
                        help="the backward walk's cap on registers a thread (ptxas's maxnreg)")
    args = parser.parse_args()
    chunk, block_d = args.chunk, args.block_d
    u, delta, z, y, dy, du, ddelta, dz = (position_major(BATCH, D_INNER, LENGTH) for _ in range(8))
    B, C = (position_major(BATCH, D_STATE, LENGTH) for _ in range(2))
    A, D, bias = torch.empty(D_INNER, D_STATE), torch.empty(D_INNER), torch.empty(D_INNER)
    n_dblocks = -(-D_INNER // block_d)
    ckpt = torch.empty(BATCH, D_INNER, -(-LENGTH // chunk), D_STATE)
    flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, CHUNK=chunk, BLOCK_D=block_d, BLOCK_N=D_STATE)

    def strides(*tensors):
        return [s for t in tensors for s in t.stride()]

    f32 = torch.empty
    segments = args.segments
    ends, dt_sums = f32(BATCH, segments - 1, D_INNER, D_STATE), f32(BATCH, segments - 1, D_INNER)
    starts = f32(BATCH, segments, D_INNER, D_STATE)
    segment_len = -(-ckpt.shape[2] // segments) * chunk
    if segments > 1:
        states_args = [u, delta, A, B, bias, ends, dt_sums, D_INNER, D_STATE, segment_len, *strides(u, delta, A, B)]
        cubin = compile_sm90(scan_triton._scan_fwd_states_kernel, states_args,
                             dict(HAS_BIAS=True, SOFTPLUS=True, BLOCK_D=block_d, BLOCK_N=D_STATE),
                             num_warps=max(1, block_d // 32))
        report("forward states (the recurrence alone)", cubin, args.ops, args.waits)
        starts_args = [ends, dt_sums, A, None, starts, D_INNER, D_STATE, segments, *A.stride(), 0, 0, 0]
        cubin = compile_sm90(scan_triton._segment_starts_kernel, starts_args,
                             dict(HAS_INIT=False, REVERSE=False, BLOCK_D=block_d, BLOCK_N=D_STATE), num_warps=1)
        report("segment starts (the fold)", cubin, args.ops, args.waits)
    forward_args = [u, delta, A, B, C, D, z, bias, None, starts if segments > 1 else None, y,
                    f32(BATCH, D_INNER, D_STATE), ckpt, D_INNER, D_STATE, LENGTH, segment_len,
                    *strides(u, delta, A, B, C, z), 0, 0, 0, *strides(y), *ckpt.stride()[:3]]
    cubin = compile_sm90(scan_triton._scan_fwd_kernel, forward_args,
                         dict(flags, HAS_H0=False, SAVE_CKPT=True, SEGMENTED=segments > 1, BLOCK_L=1),
                         num_warps=max(1, block_d // 32))
    report("forward walk (saving states)", cubin, args.ops, args.waits)

    if segments > 1:
        carries_args = [delta, A, C, z, bias, dy, ends, dt_sums, D_INNER, D_STATE, LENGTH, LENGTH // segments,
                        *strides(delta, A, C, z, dy)]
        cubin = compile_sm90(scan_triton._scan_bwd_carries_kernel, carries_args,
                             dict(HAS_Z=True, HAS_BIAS=True, HAS_DOUT=True, SOFTPLUS=True, BLOCK_D=block_d,
                                  BLOCK_N=D_STATE), num_warps=scan_triton.BACKWARD_WALK_WARPS)
        report("backward carries (the adjoint's walk alone)", cubin, args.ops, args.waits)
    backward_args = [u, delta, A, B, C, D, z, bias, ckpt, dy, None, starts if segments > 1 else None,
                     f32(BATCH, n_dblocks, segments, chunk, block_d, D_STATE),
                     du, ddelta, dz, f32(BATCH, segments, D_INNER, D_STATE), f32(BATCH, n_dblocks, LENGTH, D_STATE),
                     f32(BATCH, n_dblocks, LENGTH, D_STATE), f32(BATCH, segments, D_INNER),
                     f32(BATCH, segments, D_INNER), f32(BATCH, D_INNER, D_STATE), D_INNER, D_STATE, LENGTH,
                     -(-ckpt.shape[2] // segments), *strides(u, delta, A, B, C, z), *ckpt.stride()[:3],
                     *strides(dy), 0, 0, 0, *strides(du)]
    cubin = compile_sm90(scan_triton._scan_bwd_kernel, backward_args,
                         dict(flags, HAS_DOUT=True, HAS_DHLAST=False, SEGMENTED=segments > 1, PARALLEL=False,
                              PREFETCH=scan_triton.BACKWARD_PREFETCH), num_warps=scan_triton.BACKWARD_WALK_WARPS,
                         maxnreg=args.max_registers)
    report("backward walk (recompute loop, then the reverse loop)", cubin, args.ops, args.waits)

if __name__ == "__main__":
    main()
