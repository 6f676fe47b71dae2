"""Split-K ("flash-decoding") attention for one query token per row over a KV cache, in Triton.

Semantics are those of `hymba.ops.attention.decode_attention`: q (b, hq, 1, dqk) against k (b, hkv, S, dqk) and
v (b, hkv, S, dv), query head h reading KV head h // (hq // hkv), softmax at scale 1/sqrt(dqk) over the keys that
`valid` (b, 1, 1, S) marks. A row with no valid key gets zeros rather than NaN.

One program per (row, KV head) is far too few to keep a GPU busy on long caches, so the keys are split too:
each program streams one key range in BLOCK_N chunks with a float32 online softmax for all G query heads of its
KV head at once (each K and V byte is read once) and writes a partial (max, sum, output); a second kernel merges
the splits. Where one split covers all keys (many rows: batch x KV heads programs are enough already), the first
kernel writes the output itself. The split count depends on shapes only, so a call never syncs with the host and
can be captured in a CUDA graph. The function is a torch custom op, so a compiled decode step calls it as one
opaque op.

Triton is optional: this module is imported only when it is importable. Under TRITON_INTERPRET=1 the
kernels also take CPU tensors, which is how the tests exercise them without a GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from hymba.ops.launch import pdl_launch, wait_for_inputs

__all__ = ["decode_attention_triton"]

# About four programs per SM of an H100 (132 SMs): enough in flight to saturate memory bandwidth, while each
# split keeps a few key blocks so the partials stay a small fraction of the K/V traffic.
TARGET_PROGRAMS = 512
# tl.dot needs every dimension >= 16: the query group and head dims are padded (and masked) up to it.
MIN_DOT = 16
# The running max starts finite, so a block (or a whole split) with no valid key gives exp2(-inf - max) = 0
# instead of exp2(-inf - -inf) = NaN; real scores are always far above it.
EMPTY_MAX: tl.constexpr = tl.constexpr(-1.0e30)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, valid_ptr, m_ptr, l_ptr, acc_ptr, out_ptr,
    hkv, seq_len, blocks_per_split, qk_scale,
    stride_q_b, stride_q_h, stride_q_d,
    stride_k_b, stride_k_h, stride_k_n, stride_k_d,
    stride_v_b, stride_v_h, stride_v_n, stride_v_d,
    stride_valid_b, stride_valid_n,
    GROUP: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_FP32: tl.constexpr, SINGLE_SPLIT: tl.constexpr, USE_PDL: tl.constexpr,
):
    """One program: row b, KV head h, key split `split`. Scores are in log2 units (qk_scale folds in log2(e)).

    Partials (m, l, acc) go to contiguous float32 scratch laid out (b * hkv, num_splits, GROUP[, DV]). The head
    dims are constexpr so the compiler sees the masks along them as whole vectors: with runtime dims the K/V loads
    are not vectorised, hence not pipelined (checked in the sm_90 TTGIR: no async copies)."""
    wait_for_inputs(USE_PDL)
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = pid_bh // hkv
    h = pid_bh % hkv
    offs_g = tl.arange(0, BLOCK_G)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_g = offs_g < GROUP
    mask_dqk = offs_dqk < DQK
    mask_dv = offs_dv < DV

    q_ptrs = q_ptr + b * stride_q_b + (h * GROUP + offs_g[:, None]) * stride_q_h + offs_dqk[None, :] * stride_q_d
    q = tl.load(q_ptrs, mask=mask_g[:, None] & mask_dqk[None, :], other=0.0)  # (BLOCK_G, BLOCK_DQK)
    dot_dtype = k_ptr.dtype.element_ty
    if DOT_FP32:
        dot_dtype = tl.float32
    q = q.to(dot_dtype)
    kt_base = k_ptr + b * stride_k_b + h * stride_k_h + offs_dqk[:, None] * stride_k_d  # K read transposed
    v_base = v_ptr + b * stride_v_b + h * stride_v_h + offs_dv[None, :] * stride_v_d
    valid_base = valid_ptr + b * stride_valid_b

    m_i = tl.full((BLOCK_G,), EMPTY_MAX, tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_DV), tl.float32)
    start = split * blocks_per_split * BLOCK_N
    end = tl.minimum(start + blocks_per_split * BLOCK_N, seq_len)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_seq = offs_n < seq_len
        valid = tl.load(valid_base + offs_n * stride_valid_n, mask=in_seq, other=0) != 0
        kt = tl.load(kt_base + offs_n[None, :] * stride_k_n, mask=mask_dqk[:, None] & in_seq[None, :], other=0.0)
        # "ieee" keeps float32 inputs out of TF32 (bf16/fp16 inputs ignore it).
        s = tl.dot(q, kt.to(dot_dtype), input_precision="ieee") * qk_scale  # (BLOCK_G, BLOCK_N)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        vv = tl.load(v_base + offs_n[:, None] * stride_v_n, mask=in_seq[:, None] & mask_dv[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(dot_dtype), vv.to(dot_dtype), input_precision="ieee")
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

    part = (pid_bh * tl.num_programs(1) + split) * GROUP + offs_g
    if SINGLE_SPLIT:
        # The whole key range was this program's: normalise and write the output (as the merge would), so no merge
        # kernel runs. out (b, hq, 1, dv) is contiguous and part is then its query-head row. No valid key: zeros.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + part[:, None] * DV + offs_dv[None, :], out, mask=mask_g[:, None] & mask_dv[None, :])
    else:
        tl.store(m_ptr + part, m_i, mask=mask_g)
        tl.store(l_ptr + part, l_i, mask=mask_g)
        tl.store(acc_ptr + part[:, None] * DV + offs_dv[None, :], acc, mask=mask_g[:, None] & mask_dv[None, :])


@triton.jit
def _decode_combine_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr,
    num_splits,
    GROUP: tl.constexpr, DV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, USE_PDL: tl.constexpr,
):
    """One program: query head `pid` of all b * hq, i.e. row (b * hkv + h) * GROUP + g of out (b, hq, 1, dv),
    contiguous. Merges the splits' partials BLOCK_S at a time (one load per block, not a chain of dependent loads
    per split: at batch 1 there are ~100 splits), rescaling each to the running max."""
    wait_for_inputs(USE_PDL)
    pid = tl.program_id(0).to(tl.int64)
    bh, g = pid // GROUP, pid % GROUP
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < DV

    m_tot = tl.full((1,), EMPTY_MAX, tl.float32)
    l_tot = tl.zeros((1,), tl.float32)
    out = tl.zeros((BLOCK_DV,), tl.float32)
    for start in range(0, num_splits, BLOCK_S):
        mask_s = start + offs_s < num_splits
        part = (bh * num_splits + start + offs_s) * GROUP + g
        m_s = tl.load(m_ptr + part, mask=mask_s, other=EMPTY_MAX)
        l_s = tl.load(l_ptr + part, mask=mask_s, other=0.0)
        acc_s = tl.load(acc_ptr + part[:, None] * DV + offs_dv[None, :], mask=mask_s[:, None] & mask_dv[None, :],
                        other=0.0)
        m_new = tl.maximum(m_tot, tl.max(m_s, axis=0))
        alpha = tl.exp2(m_tot - m_new)
        beta = tl.exp2(m_s - m_new)
        l_tot = l_tot * alpha + tl.sum(l_s * beta, axis=0)
        out = out * alpha + tl.sum(acc_s * beta[:, None], axis=0)
        m_tot = m_new
    # No valid key leaves l_tot = 0 and out = 0 (every p was 0): divide by 1 to return zeros, not NaN.
    out = out / tl.where(l_tot > 0, l_tot, 1.0)
    tl.store(out_ptr + pid * DV + offs_dv, out, mask=mask_dv)


# Triton's interpreter multiplies bf16 dot operands as their raw bits (triton-lang/triton#11584; it does not support
# bf16 arithmetic), so an interpreted kernel gets float32 dot operands; a compiled one uses the inputs' dtype.
INTERPRETED = not isinstance(_decode_split_kernel, triton.runtime.JITFunction)


# A custom op, so torch.compile (the compiled decode step) keeps the launches whole as one opaque call rather than
# tracing into Triton's launcher; the fake below gives it the output's shape.
@torch.library.custom_op("hymba::decode_attention_triton", mutates_args=())
def decode_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                            block_n: int = 32, num_splits: int = 0, num_warps: int = 0,
                            num_stages: int = 0) -> torch.Tensor:
    """q (b, hq, 1, dqk); k (b, hkv, S, dqk); v (b, hkv, S, dv); valid (b, 1, 1, S) bool -> (b, hq, 1, dv) in
    q's dtype, as `decode_attention`. Any strides (cache views are never copied).

    `num_splits` (0: about TARGET_PROGRAMS programs in all) is capped so no split is empty. `block_n` = 32 keys per
    step measured fastest at the 1.5B shapes on an H100 (`benchmarks/bench_decode_attention.py --sweep`): at batch
    128, 116 us against 173 us for 64 over a 1,153-key ring, and 690 against 787 us over 8,320 keys."""
    b, hq, _, dqk = q.shape
    hkv, seq_len, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    num_blocks = max(1, triton.cdiv(seq_len, block_n))
    wanted = num_splits or triton.cdiv(TARGET_PROGRAMS, b * hkv)
    blocks_per_split = triton.cdiv(num_blocks, min(wanted, num_blocks))
    num_splits = triton.cdiv(num_blocks, blocks_per_split)

    out = torch.empty(b, hq, 1, dv, device=q.device, dtype=q.dtype)
    single = num_splits == 1
    if single:
        part_max = part_sum = part_out = out  # not written
    else:
        part_max = torch.empty(b * hkv, num_splits, group, device=q.device, dtype=torch.float32)
        part_sum = torch.empty_like(part_max)
        part_out = torch.empty(b * hkv, num_splits, group, dv, device=q.device, dtype=torch.float32)
    block_g = max(MIN_DOT, triton.next_power_of_2(group))
    block_dv = max(MIN_DOT, triton.next_power_of_2(dv))
    # The mask goes in as bytes, the way PyTorch stores bool (a view: same storage and strides); AOTInductor has
    # compiled *i1 arguments as packed bits (pytorch/pytorch#176353).
    _decode_split_kernel[(b * hkv, num_splits)](
        q, k, v, valid.view(torch.uint8), part_max, part_sum, part_out, out,
        hkv, seq_len, blocks_per_split, math.log2(math.e) / math.sqrt(dqk),
        q.stride(0), q.stride(1), q.stride(3),
        *k.stride(), *v.stride(),
        valid.stride(0), valid.stride(3),
        GROUP=group, DQK=dqk, DV=dv,
        BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_DQK=max(MIN_DOT, triton.next_power_of_2(dqk)), BLOCK_DV=block_dv,
        DOT_FP32=INTERPRETED, SINGLE_SPLIT=single, **launch_options(num_warps, num_stages), **pdl_launch(q),
    )
    if not single:
        _decode_combine_kernel[(b * hq,)](part_max, part_sum, part_out, out, num_splits,
                                          GROUP=group, DV=dv, BLOCK_S=min(32, triton.next_power_of_2(num_splits)),
                                          BLOCK_DV=block_dv, **pdl_launch(q))
    return out


def launch_options(num_warps: int, num_stages: int) -> dict:
    """Triton's launch options where given (nonzero), else its defaults."""
    return {name: value for name, value in (("num_warps", num_warps), ("num_stages", num_stages)) if value}


@decode_attention_triton.register_fake
def _(q, k, v, valid, block_n=32, num_splits=0, num_warps=0, num_stages=0):
    return q.new_empty(q.shape[0], q.shape[1], 1, v.shape[3])
