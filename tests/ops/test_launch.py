"""Programmatic dependent launch: which launches ask for it (`hymba.ops.launch.pdl_launch`)."""

import torch
from triton_setup import gpu_only  # sets TRITON_INTERPRET without CUDA; skips without Triton

import hymba.ops
from hymba.ops.launch import TRITON_HAS_PDL, pdl_launch

OFF = {"USE_PDL": False}


def test_pdl_is_off_for_cpu_tensors_and_the_interpreter(monkeypatch):
    assert pdl_launch(torch.zeros(1)) == OFF
    if torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert pdl_launch(torch.zeros(1, device="cuda")) == OFF


@gpu_only
def test_pdl_on_hopper_unless_switched_off(monkeypatch):
    x = torch.zeros(1, device="cuda")
    hopper = torch.cuda.get_device_capability()[0] >= 9 and torch.version.hip is None
    assert pdl_launch(x) == ({"USE_PDL": True, "launch_pdl": True} if hopper and TRITON_HAS_PDL else OFF)
    assert pdl_launch(x, enabled=False) == OFF
    monkeypatch.setattr(hymba.ops, "PDL", False)
    assert pdl_launch(x) == OFF

