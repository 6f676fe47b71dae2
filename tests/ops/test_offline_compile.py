"""The decode step's Triton kernels, and the training scan's segmented walks, compiled for sm_90 (an H100 / H200)
without a GPU (`hymba.ops.offline`), with programmatic dependent launch on as the decode kernels launch there (where
this Triton has it): Triton's interpreter, which the other CPU tests run them through, accepts code its compiler
rejects (a constexpr-guarded early return, for one). Runs in a fresh process, since this one's kernels may be the
interpreter's (`triton_setup`)."""

import json
import os
import subprocess
import sys

import pytest

# Skips without Triton. Imported before Triton itself: Triton's own jitted helpers (tl.sum, ...) are decorated for the
# interpreter only if it is on when Triton is first imported, and the kernels of the test modules collected after
# this one call them.
import triton_setup  # noqa: F401

# Each kernel at Hymba-1.5B's decode shapes (d_inner 3,200, 16 states, dt_rank 100, 25 / 5 heads of 64 / 128), with
# the tiles its launcher picks: (name, kernel, runtime arguments, constexprs, warps, stages). Tensors stand in by
# dtype alone (only the dtype and the alignment are specialised on).
KERNELS = """
import json, sys, torch, triton
from hymba.ops.attention import triton_decode as A
from hymba.ops.conv import triton as CV
from hymba.ops.launch import TRITON_HAS_PDL
from hymba.ops.linear import fused as F, triton as L
from hymba.ops.mlp import triton as M
from hymba.ops.offline import compile_sm90, resource_usage
from hymba.ops.scan import triton as S, triton_step as T

bf, f32, u8 = (lambda dtype: lambda: torch.empty(16, dtype=dtype))(torch.bfloat16), \\
    (lambda: torch.empty(16, dtype=torch.float32)), (lambda: torch.empty(16, dtype=torch.uint8))
D, N, R, P = 3200, 16, 100, 132
cases = []
for norms, swiglu, residual, n, k in [(1, False, False, 8960, 1600), (2, False, True, 1600, 3200),
                                      (1, True, False, 5504, 1600), (0, False, True, 1600, 5504)]:
    for rows in (1, 3):
        elements, warps = F.TILES["swiglu" if swiglu else "default"]
        cases.append((f"fused_rows_linear {n}x{k} rows {rows}", F._fused_rows_linear_kernel,
                      [bf(), bf() if norms else None, bf(), bf() if norms == 2 else None, bf(),
                       bf() if swiglu else None, None, bf() if residual else None, bf(), rows, n, k, 1e-6,
                       k, k, k, k, n, n],
                      dict(NORMS=norms, SWIGLU=swiglu, HAS_BIAS=False, HAS_RESIDUAL=residual,
                           BLOCK_N=F.block_n_for(k, elements), BLOCK_K=triton.next_power_of_2(k)), warps, 3))
for single in (False, True):
    cases.append((f"decode split (single {single})", A._decode_split_kernel,
                  [bf(), bf(), bf(), u8(), f32(), f32(), f32(), bf(), 5, 1153, 10, 0.18,
                   1600, 64, 1, 5 * 1153 * 64, 1153 * 64, 64, 1, 5 * 1153 * 128, 1153 * 128, 128, 1, 1153, 1],
                  dict(GROUP=5, DQK=64, DV=128, BLOCK_G=16, BLOCK_N=32, BLOCK_DQK=64, BLOCK_DV=128, DOT_FP32=False,
                       SINGLE_SPLIT=single), 4, 3))
cases.append(("decode combine", A._decode_combine_kernel, [f32(), f32(), f32(), bf(), 4],
              dict(GROUP=5, DV=128, BLOCK_S=4, BLOCK_DV=128), 4, 3))
cases.append(("conv update", CV._conv_update_kernel, [bf(), bf(), bf(), bf(), bf(), D, 3 * D, 3, 1, 8960, 1, 4, 1],
              dict(HAS_BIAS=True, SILU=True, WIDTH=4, BLOCK_D=128, BLOCK_W=4), 4, 3))
cases.append(("gate/up SwiGLU", M._gate_up_swiglu_kernel, [bf(), bf(), bf(), bf(), 32, 5504, 1600, 1600, 1600, 1600,
              5504], dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, DOT_FP32=False), 4, 4))
cases.append(("small-rows linear (LM head)", L._small_rows_linear_kernel,
              [bf(), bf(), None, bf(), 1, 32001, 1600, 1600, 1600, 1600, 0, 32001],
              dict(HAS_BIAS=False, SPLIT=False, BLOCK_M=16, BLOCK_N=L.BLOCK_N, BLOCK_K=L.BLOCK_K, DOT_FP32=False),
              L.NUM_WARPS, L.NUM_STAGES))
cases.append(("x_proj partials", T._x_proj_partials_kernel, [bf(), bf(), f32(), 32, D, P, D, 1],
              dict(BLOCK_B=16, BLOCK_D=64, BLOCK_P=64, P_BLOCKS=3, DOT_FP32=False), 4, 3))
cases.append(("sum partials", T._sum_partials_kernel, [f32(), bf(), 32, P, 50], dict(BLOCK_BLOCKS=64, BLOCK_P=64),
              4, 3))
cases.append(("dt_proj", T._dt_proj_kernel, [bf(), bf(), bf(), bf(), bf(), bf(), bf(), bf(), 128, D, R, N, 1e-6, R, 1],
              dict(HAS_NORMS=True, BLOCK_B=16, BLOCK_D=128, BLOCK_R=128, BLOCK_N=16, DOT_FP32=False), 4, 3))
cases.append(("conv + x_proj", T._conv_x_proj_kernel, [bf(), bf(), None, bf(), bf(), bf(), bf(), f32(), 1, D, R, P,
              3 * D, 3, 1, 8960, 1, 0, 4, 1, D, 1],
              dict(HAS_BIAS=True, HAS_KEEP=False, WIDTH=4, BLOCK_W=4, BLOCK_D=64, BLOCK_R=128, BLOCK_BC=32), 4, 3))
state = [f32(), bf(), D, 50, R, N, 1e-6, 8960, 1, R, 1, N, 1, D * N, N, 1]
cases.append(("SSM step (1-2 rows)", T._ssm_step_kernel,
              [f32(), bf(), bf(), bf(), f32(), bf(), bf(), bf(), f32(), f32(), *state[:2], 1, *state[2:]],
              dict(HAS_NORMS=True, BLOCK_BLOCKS=64, BLOCK_R=128, BLOCK_N=16, BLOCK_C=16), 4, 3))
cases.append(("dt_proj + state update (rows)", T._dt_proj_state_kernel,
              [bf(), bf(), bf(), bf(), f32(), bf(), bf(), bf(), f32(), f32(), f32(), bf(), 32, D, R, N, 1e-6,
               8960, 1, R, 1, N, 1, D * N, N, 1],
              dict(HAS_NORMS=True, BLOCK_B=16, BLOCK_C=16, BLOCK_R=128, BLOCK_N=16, DOT_FP32=False), 4, 3))
cases.append(("state update", S._state_update_kernel,
              [f32(), bf(), bf(), f32(), bf(), bf(), f32(), bf(), f32(), bf(), D, N, D * N, N, 1, 8960, 1, D, 1, N, 1,
               N, 1, N, 1, 8960, 1],
              dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, A_IS_LOG=True, BLOCK_D=32, BLOCK_N=16), 4, 3))
# The training scan's segmented walks and their states' and carries' walks (batch 8 x 2,176 positions, chunks of 64,
# 5 segments of 7 chunks), which PDL does not reach.
L, CH = 2176, 34
act, bc = [L * D, 1, D], [L * N, 1, N]
cases.append(("scan forward states", S._scan_fwd_states_kernel,
              [bf(), bf(), f32(), bf(), f32(), f32(), f32(), D, N, 7 * 64, *act, *act, N, 1, *bc],
              dict(HAS_BIAS=True, SOFTPLUS=True, BLOCK_D=32, BLOCK_N=16), 1, 3))
cases.append(("segment starts", S._segment_starts_kernel,
              [f32(), f32(), f32(), f32(), f32(), D, N, 5, N, 1, D * N, N, 1],
              dict(HAS_INIT=True, REVERSE=True, BLOCK_D=32, BLOCK_N=16), 1, 3))
cases.append(("scan forward (segmented walk)", S._scan_fwd_kernel,
              [bf(), bf(), f32(), bf(), bf(), f32(), bf(), f32(), None, f32(), bf(), f32(), f32(), D, N, L,
               7 * 64, *act, *act, N, 1, *bc, *bc, *act, 0, 0, 0, *act, D * CH * N, CH * N, N],
              dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, HAS_H0=False, SOFTPLUS=True, SAVE_CKPT=True,
                   SEGMENTED=True, CHUNK=64, BLOCK_D=32, BLOCK_N=16, BLOCK_L=1), 1, 3))
cases.append(("scan backward carries", S._scan_bwd_carries_kernel,
              [bf(), f32(), bf(), bf(), f32(), bf(), f32(), f32(), D, N, L, 7 * 64, *act, N, 1, *bc, *act, *act],
              dict(HAS_Z=True, HAS_BIAS=True, HAS_DOUT=True, SOFTPLUS=True, BLOCK_D=32, BLOCK_N=16), 1, 3))
cases.append(("scan backward (segmented walk)", S._scan_bwd_kernel,
              [bf(), bf(), f32(), bf(), bf(), f32(), bf(), f32(), f32(), bf(), None, f32(), f32(),
               bf(), bf(), bf(), f32(), f32(), f32(), f32(), f32(), f32(), D, N, L, 7,
               *act, *act, N, 1, *bc, *bc, *act, D * CH * N, CH * N, N, *act, 0, 0, 0, *act],
              dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, HAS_DOUT=True, HAS_DHLAST=False, SOFTPLUS=True,
                   SEGMENTED=True, CHUNK=64, BLOCK_D=32, BLOCK_N=16, PARALLEL=False, PREFETCH=True), 1, 3))
results = []
for name, kernel, args, constexprs, warps, stages in cases:
    try:
        pdl = {"USE_PDL": TRITON_HAS_PDL} if "USE_PDL" in kernel.arg_names else {}
        cubin = compile_sm90(kernel, args, {**constexprs, **pdl}, warps, stages)
    except ImportError as e:
        print(json.dumps({"skip": str(e)}))
        sys.exit(0)
    results.append(dict(name=name, **resource_usage(cubin)))
print(json.dumps(results))
"""


def test_decode_and_scan_kernels_compile_for_sm90_without_spilling():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", KERNELS], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    if isinstance(results, dict):
        pytest.skip(results["skip"])
    assert len(results) == 26
    for result in results:
        assert result["stack"] == 0 and result["local"] == 0, result  # no spills
