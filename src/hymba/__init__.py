"""Hymba hybrid-head language models (attention + Mamba heads in parallel) in plain PyTorch.

The top-level names load on first use, so `import hymba` (and `hymba --help`) does not pay for importing torch.
"""

from importlib import import_module

__all__ = ["HymbaCache", "HymbaConfig", "HymbaError", "HymbaForCausalLM", "HymbaTokenizer"]
__version__ = "0.1.0"

_HOMES = {"HymbaCache": "hymba.cache", "HymbaConfig": "hymba.config", "HymbaError": "hymba.errors",
          "HymbaForCausalLM": "hymba.model", "HymbaTokenizer": "hymba.tokenizer"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'hymba' has no attribute {name!r}")
