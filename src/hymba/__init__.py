"""Hymba hybrid-head language models (attention + Mamba heads in parallel) in plain PyTorch."""

from hymba.cache import HymbaCache
from hymba.config import HymbaConfig
from hymba.errors import HymbaError
from hymba.model import HymbaForCausalLM
from hymba.tokenizer import HymbaTokenizer

__all__ = ["HymbaCache", "HymbaConfig", "HymbaError", "HymbaForCausalLM", "HymbaTokenizer"]
__version__ = "0.1.0"
