"""The fused gate/up SwiGLU kernel against its reference (two linear layers, then SwiGLU).

Without CUDA the kernel runs on CPU tensors through Triton's interpreter; the realistic size runs only on a GPU.
"""

import pytest
import torch
from conftest import rel_err
from triton_setup import DEVICE, gpu_only  # sets TRITON_INTERPRET without CUDA; skips without Triton

from hymba.ops.mlp import gate_up_swiglu_ref
from hymba.ops.mlp.triton import default_tiles, gate_up_swiglu_triton, pipeline_stages, shared_memory_bytes


def weights(n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)
            for shape, scale in (((n, k), 0.05), ((n, k), 0.05))]


# (rows, intermediate, hidden, block_n, block_k): outputs and the hidden dimension not multiples of their blocks.
# 150 rows: two programs of 128 rows each over the outputs.
@pytest.mark.parametrize("rows,n,k,block_n,block_k", [(1, 40, 70, 16, 32), (3, 100, 33, 32, 16), (16, 17, 64, 16, 64),
                                                      (40, 24, 20, 16, 16), (150, 20, 24, 16, 16)])
def test_fused_gate_up_swiglu_matches_reference_fp32(rows, n, k, block_n, block_k):
    gate, up = weights(n, k, torch.float32)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = gate_up_swiglu_triton(x, gate, up, block_n=block_n, block_k=block_k)
    assert got.shape == (rows, n) and got.dtype == x.dtype
    assert rel_err(got, gate_up_swiglu_ref(x, gate, up)) < 1e-5


def test_fused_gate_up_swiglu_bf16_rounds_as_the_linear_layers_do():
    gate, up = weights(48, 96, torch.bfloat16)
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).to(DEVICE)
    # The kernel rounds silu(gate) * up once, as the compiled SwiGLU does on a GPU; the CPU reference rounds silu(gate)
    # to bf16 first: a bf16 ulp or two apart.
    assert rel_err(gate_up_swiglu_triton(x, gate, up, block_n=16, block_k=32), gate_up_swiglu_ref(x, gate, up)) < 2e-2


def test_fused_gate_up_swiglu_refuses_what_it_cannot_read():
    gate, up = weights(8, 16, torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        gate_up_swiglu_triton(torch.zeros(2, 8, device=DEVICE), gate.t(), up.t())


@pytest.mark.parametrize("block_m", [16, 32, 64, 128])
@pytest.mark.parametrize("tiles", [(64, 128, 4, 4), (64, 64, 8, 3)])
@pytest.mark.parametrize("shared_kib", [227, 163, 99])  # an H100 / H200, an A100, an RTX 4090
def test_pipeline_stages_fit_in_shared_memory(block_m, tiles, shared_kib):
    # Four stages of 128-row bf16 tiles 128 wide in K need 256 KiB and failed to launch on an H200 (227 KiB a program).
    block_n, block_k, _, wanted = tiles
    per_stage = (block_m + 2 * block_n) * block_k * 2
    stages = pipeline_stages(block_m, block_n, block_k, 2, shared_kib * 1024, wanted)
    assert 1 <= stages <= wanted and stages * per_stage <= shared_kib * 1024
    assert stages == wanted or (stages + 1) * per_stage > shared_kib * 1024  # as many as fit


def test_default_tiles_by_rows():
    assert default_tiles(1) == default_tiles(32) == (64, 128, 4, 4)
    assert default_tiles(33) == default_tiles(64) == (64, 64, 4, 4)
    assert default_tiles(128) == default_tiles(500) == (64, 64, 8, 3)


def test_shared_memory_is_the_devices():
    # On a GPU Triton's driver reports the per-program limit; the kernels' defaults must fit it.
    assert 96 * 1024 <= shared_memory_bytes(torch.empty(0, device=DEVICE).device) <= 256 * 1024


@gpu_only
@pytest.mark.parametrize("rows", [1, 4, 8, 64, 128])
def test_fused_gate_up_swiglu_realistic_size_gpu(rows):
    gate, up = weights(5504, 1600, torch.bfloat16)  # Hymba-1.5B's MLP
    x = torch.randn(rows, 1600, device="cuda", dtype=torch.bfloat16)
    assert rel_err(gate_up_swiglu_triton(x, gate, up), gate_up_swiglu_ref(x, gate, up)) < 1e-2
    compiled = torch.compile(lambda a: gate_up_swiglu_triton(a, gate, up), fullgraph=True)
    assert torch.equal(compiled(x), gate_up_swiglu_triton(x, gate, up))
