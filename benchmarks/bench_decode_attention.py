"""Decode attention at Hymba-1.5B shapes: the split-K Triton kernel against the SDPA reference (time, bandwidth).

    python benchmarks/bench_decode_attention.py     # needs CUDA and Triton

Rows x keys cover the 1.5B cache at 8K: meta tokens + ring (1,153 keys) and global layers (8,320 keys).
"""

import torch
from triton.testing import do_bench

from hymba.ops.attention import decode_attention
from hymba.ops.attention.triton_decode import decode_attention_triton

hq, hkv, dqk, dv = 25, 5, 64, 128  # Hymba-1.5B
print(f"{'batch':>5} {'keys':>6} {'sdpa us':>9} {'triton us':>9} {'speedup':>7} {'triton GB/s':>11} {'max err':>8}")
for b in (1, 32, 128):
    for S in (1153, 8320):
        q = torch.randn(b, hq, 1, dqk, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, hkv, S, dqk, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, hkv, S, dv, device="cuda", dtype=torch.bfloat16)
        valid = torch.ones(b, S, dtype=torch.bool, device="cuda")
        valid[:, S // 2: S // 2 + 7] = False
        mask = valid[:, None, None, :]
        ref = decode_attention(q, k, v, mask)
        out = decode_attention_triton(q, k, v, mask)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        args = (q, k, v, mask)
        t_ref = do_bench(lambda a=args: decode_attention(*a), warmup=25, rep=100)
        t_tri = do_bench(lambda a=args: decode_attention_triton(*a), warmup=25, rep=100)
        gbs = (k.numel() + v.numel()) * 2 / (t_tri * 1e-3) / 1e9
        print(f"{b:5d} {S:6d} {t_ref * 1e3:9.1f} {t_tri * 1e3:9.1f} {t_ref / t_tri:7.2f} {gbs:11.0f} {err:8.1e}")
