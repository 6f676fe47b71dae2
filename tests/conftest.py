"""Shared fixtures: the official-tiny parity checkpoint, tiny configs, and a NaN-failing relative error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hymba.config import HymbaConfig

FIXTURES = Path(__file__).parent / "fixtures"

# The test shapes are tiny: one thread is as fast, and immune to other processes competing for the cores.
torch.set_num_threads(1)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64, for tensors of one shape; NaN or inf anywhere in either tensor makes it inf, so
    comparisons fail rather than slip through. Empty tensors agree (0)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, b = actual.detach().double(), expected.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    if b.numel() == 0:
        return 0.0
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def official_tiny_dir() -> Path:
    """A tiny random checkpoint written by the released code, with its float32 logits (see HYMBA.md)."""
    return FIXTURES / "official-tiny"


@pytest.fixture(scope="session")
def released_config_path() -> Path:
    """Hymba-1.5B's released config.json (no weights)."""
    return FIXTURES / "hymba-1.5b-config.json"


@pytest.fixture
def tiny_config() -> HymbaConfig:
    """The release's design at toy size (meta tokens, global layers, KV groups, window < meta count), vocab 97."""
    return HymbaConfig.preset("tiny", vocab_size=97)
