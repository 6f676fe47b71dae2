"""Kernels compiled for sm_90 (an H100 / H200) without a GPU (`hymba.ops.offline`): Triton's interpreter, which the
other CPU tests run them through, accepts code its compiler rejects. Runs in a fresh process, since this one's
kernels may be the interpreter's (`triton_setup`)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

# The fused decode projections at Hymba-1.5B's shapes, as `fused_rows_linear` launches them by default: the in_proj
# with its norm, out_proj with the branch norms' average and the residual, gate/up with SwiGLU, down_proj with the
# residual; one row, and three (another specialisation of the row loop).
FUSED_PROJECTIONS = """
import json, sys, torch, triton
from hymba.ops.linear import fused
from hymba.ops.offline import compile_sm90, resource_usage

bf16 = lambda: torch.empty(16, dtype=torch.bfloat16)  # only the dtype and the alignment are specialised on
results = []
for norms, swiglu, residual, n, k in [(1, False, False, 8960, 1600), (2, False, True, 1600, 3200),
                                      (1, True, False, 5504, 1600), (0, False, True, 1600, 5504)]:
    for rows in (1, 3):
        args = [bf16(), bf16() if norms else None, bf16(), bf16() if norms == 2 else None, bf16(),
                bf16() if swiglu else None, None, bf16() if residual else None, bf16(),
                rows, n, k, 1e-6, k, k, k, k, n, n]
        elements, warps = fused.TILES["swiglu" if swiglu else "default"]
        constexprs = dict(NORMS=norms, SWIGLU=swiglu, HAS_BIAS=False, HAS_RESIDUAL=residual,
                          BLOCK_N=fused.block_n_for(k, swiglu), BLOCK_K=triton.next_power_of_2(k), USE_PDL=True)
        try:
            cubin = compile_sm90(fused._fused_rows_linear_kernel, args, constexprs, warps)
        except ImportError as e:
            print(json.dumps({"skip": str(e)}))
            sys.exit(0)
        results.append(dict(case=[norms, swiglu, residual, n, k, rows], **resource_usage(cubin)))
print(json.dumps(results))
"""


def test_fused_projections_compile_for_sm90_without_spilling():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", FUSED_PROJECTIONS], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    if isinstance(results, dict):
        pytest.skip(results["skip"])
    assert len(results) == 8
    for result in results:
        assert result["local"] == 0, result  # no spills
