"""Split-K Triton decode attention against the SDPA reference `decode_attention`.

Without CUDA the kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set before the
kernels are defined). Shapes are awkward on purpose: key counts that are not a multiple of the key block, query
groups of 1, 3 and 5 (padded to 16 rows for tl.dot), dqk != dv and neither a power of two, K/V as strided views
of larger cache buffers. bf16 is compared with the reference's math in float32 on the same bf16 values; its
tolerance is loose because the kernel rounds the softmax weights to bf16 before the P @ V product (and the
interpreter truncates float32 -> bf16 casts instead of rounding to nearest).
"""

import pytest
import torch
from conftest import rel_err
from triton_setup import DEVICE, gpu_only  # sets TRITON_INTERPRET without CUDA; skips without Triton

from hymba.ops.attention import decode_attention
from hymba.ops.attention.triton_decode import decode_attention_triton

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make_inputs(batch, hkv, group, seq_len, dqk, dv, dtype, *, mask="holes", layout="slice", seed=0):
    """q (b, hkv*group, 1, dqk); k, v strided views of larger cache buffers; valid (b, 1, 1, S) as the cache
    passes it (a view of a (b, S) tensor). The newest key is always valid, as in decoding.

    layout "slice": the first S slots, offset by 3, of (b, hkv, S+8, d) buffers; "heads_inner": (b, S, hkv, d)
    buffers transposed, so no stride of K or V is contiguous along S."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hkv * group, 1, dqk, generator=g)
    if layout == "slice":
        k = torch.randn(batch, hkv, seq_len + 8, dqk, generator=g)[:, :, 3:3 + seq_len]
        v = torch.randn(batch, hkv, seq_len + 8, dv, generator=g)[:, :, 3:3 + seq_len]
    else:
        k = torch.randn(batch, seq_len, hkv, dqk, generator=g).transpose(1, 2)
        v = torch.randn(batch, seq_len, hkv, dv, generator=g).transpose(1, 2)
    if mask == "all":
        valid = torch.ones(batch, seq_len, dtype=torch.bool)
    elif mask == "holes":
        valid = torch.rand(batch, seq_len, generator=g) < 0.6
    else:  # "few": one to three valid keys per row anywhere, besides the newest
        valid = torch.zeros(batch, seq_len, dtype=torch.bool)
        for row in range(batch):
            valid[row, torch.randint(0, seq_len, (1 + row % 3,), generator=g)] = True
    valid[:, -1] = True
    # Scale like real attention logits (q.k / sqrt(d) of order a few units), cast to the dtype once.
    q, k, v = (t.to(dtype).to(DEVICE) for t in (q * 2, k, v))
    return q, k, v, valid.to(DEVICE)[:, None, None, :]


def reference(q, k, v, valid):
    """`decode_attention` on float32 copies: for float32 the reference itself, for bf16 its math on the same values."""
    return decode_attention(q.float(), k.float(), v.float(), valid).to(q.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 3, 5])
@pytest.mark.parametrize("seq_len", [1, 7, 130, 1153])
def test_matches_reference(seq_len, group, dtype):
    q, k, v, valid = make_inputs(2, 2, group, seq_len, 40, 24, dtype)
    out = decode_attention_triton(q, k, v, valid)
    assert out.shape == (2, 2 * group, 1, 24) and out.dtype == dtype
    assert rel_err(out, reference(q, k, v, valid)) < TOL[dtype]


# Split counts: one program per KV head streaming every block, a ragged split (the last split shorter), and more
# splits than key blocks (capped). Key block 16 so a short sequence still spans several blocks.
@pytest.mark.parametrize("num_splits", [1, 3, 100])
@pytest.mark.parametrize("mask", ["all", "holes", "few"])
def test_splits_and_masks(mask, num_splits):
    q, k, v, valid = make_inputs(3, 2, 3, 150, 40, 24, torch.float32, mask=mask)
    out = decode_attention_triton(q, k, v, valid, block_n=16, num_splits=num_splits)
    assert rel_err(out, reference(q, k, v, valid)) < 1e-5


def test_rows_with_different_masks_and_strides():
    """Row 0 sees every key, row 1 only its newest: each row's result must equal that row computed alone."""
    q, k, v, valid = make_inputs(2, 2, 5, 200, 40, 24, torch.float32, layout="heads_inner")
    valid[0] = True
    valid[1, ..., :-1] = False
    out = decode_attention_triton(q, k, v, valid, block_n=32)
    for row in range(2):
        alone = reference(q[row:row + 1], k[row:row + 1], v[row:row + 1], valid[row:row + 1])
        assert rel_err(out[row:row + 1], alone) < 1e-5
    # One visible key: the output is exactly that key's value for every query head.
    assert torch.equal(out[1, :, 0], v[1, :, -1].repeat_interleave(5, dim=0))


def test_head_dims_of_the_released_models():
    """Hymba-1.5B: 25 query heads over 5 KV heads, dqk 64, dv 128; the tiny test config: dqk 16, dv 32."""
    for hkv, group, dqk, dv in [(5, 5, 64, 128), (2, 2, 16, 32)]:
        q, k, v, valid = make_inputs(1, hkv, group, 100, dqk, dv, torch.bfloat16)
        assert rel_err(decode_attention_triton(q, k, v, valid), reference(q, k, v, valid)) < 2e-2


@pytest.mark.parametrize("num_splits", [1, 3])  # one split: the split kernel writes the output, no merge runs
def test_row_without_valid_keys_gives_zeros(num_splits):
    q, k, v, valid = make_inputs(2, 2, 3, 70, 40, 24, torch.float32)
    valid[1] = False
    out = decode_attention_triton(q, k, v, valid, block_n=16, num_splits=num_splits)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert rel_err(out[:1], reference(q[:1], k[:1], v[:1], valid[:1])) < 1e-5


def test_nan_fails_the_comparison():
    q, k, v, valid = make_inputs(1, 1, 1, 9, 40, 24, torch.float32)
    v[0, 0, -1, 0] = float("nan")
    with pytest.raises(AssertionError):
        assert rel_err(decode_attention_triton(q, k, v, valid), reference(q, k, v, valid)) < 1e-5


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_realistic_size_gpu(dtype):
    """Hymba-1.5B's heads over a long cache, batch 4, a slice of a longer buffer, holes in the mask."""
    q, k, v, valid = make_inputs(4, 5, 5, 8192 + 128, 64, 128, dtype)
    assert rel_err(decode_attention_triton(q, k, v, valid), reference(q, k, v, valid)) < TOL[dtype]


@gpu_only
@pytest.mark.gpu
def test_compiles_and_captures_in_a_cuda_graph_gpu():
    """The decode step is torch.compile'd and replayed as a CUDA graph: the kernels must trace without a graph
    break, and a replay must read the new cache contents written in place."""
    q, k, v, valid = make_inputs(2, 5, 5, 1000, 64, 128, torch.bfloat16)
    step = torch.compile(lambda q, k, v, valid: decode_attention_triton(q, k, v, valid) * 2, fullgraph=True,
                         dynamic=False)
    assert rel_err(step(q, k, v, valid) / 2, reference(q, k, v, valid)) < 2e-2

    side = torch.cuda.Stream()  # warm up on a side stream before capture, as CudaGraphDecoder does
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(q, k, v, valid)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(q, k, v, valid)
    q.copy_(torch.randn_like(q))
    v.mul_(-1)
    valid[0, ..., : 500] = False
    graph.replay()
    assert rel_err(out / 2, reference(q, k, v, valid)) < 2e-2
