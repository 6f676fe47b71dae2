"""LoRA fine-tuning through the `peft` library (`pip install -e ".[lora]"`).

    hymba train --config default-model --init-from nvidia/Hymba-1.5B-Base --sft-data chat.jsonl --lora-r 16 --merge

The base model's weights stay frozen; peft wraps the target linears (by default every layer's mixer `in_proj`
and `out_proj` - the attention and SSM heads' shared input and fused output projections - and the MLP's gate,
up and down projections) with trainable low-rank matrices. Checkpoints hold the adapters in peft's format
(`adapter_config.json` + `adapter_model.safetensors`, loadable with `PeftModel.from_pretrained`), and `merge`
writes the base with the adapters folded into its weights as a plain checkpoint in the released format.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

from hymba.checkpoint import copy_side_files
from hymba.errors import HymbaError

DEFAULT_TARGETS = ("in_proj", "out_proj", "gate_proj", "up_proj", "down_proj")
# The SSM reads these modules' weights directly (the fused dt/B/C projections and the conv kernel), so an adapter
# on them would never run: refused rather than trained to no effect.
DIRECT_WEIGHT_MODULES = ("x_proj", "dt_proj", "conv1d")


def _peft():
    try:
        import peft
    except ImportError:
        raise HymbaError("LoRA needs the peft library: pip install 'hymba[lora]' (or pip install peft)") from None
    return peft


def add_adapters(model: nn.Module, r: int, alpha: float, dropout: float, targets: list[str],
                 adapters_from: str | os.PathLike | None = None) -> nn.Module:
    """`model` wrapped by peft with fresh LoRA adapters (rank r, scale alpha / r) on `targets`, or with the trainable
    adapters saved in `adapters_from` (resuming); every other weight frozen."""
    peft = _peft()
    if adapters_from is not None:
        wrapped = peft.PeftModel.from_pretrained(model, str(adapters_from), is_trainable=True)
    else:
        config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                                 bias="none")
        try:
            wrapped = peft.get_peft_model(model, config)
        except ValueError as exc:  # peft's "Target modules {...} not found in the base model"
            raise HymbaError(f"lora_targets {list(targets)}: {exc}") from None
    ignored = sorted({name for name, module in wrapped.named_modules() if isinstance(module, peft.tuners.lora.LoraLayer)
                      and set(name.split(".")) & set(DIRECT_WEIGHT_MODULES)})
    if ignored:
        raise HymbaError(f"LoRA on {ignored[0]} would never run: the SSM reads the weights of "
                         f"{', '.join(DIRECT_WEIGHT_MODULES)} directly; choose other lora_targets")
    return wrapped


def save_adapters(model: nn.Module, directory: Path, side_files_from: str | os.PathLike) -> None:
    """peft's adapter files, plus the tokenizer files, into `directory` (the trainer writes it whole, then renames).

    Adapters only: the base's embeddings are never resized here, so peft need not save them (its check for that
    would read the base's config through transformers)."""
    model.save_pretrained(str(directory), save_embedding_layers=False)
    copy_side_files(side_files_from, directory)


def write_merged(model: nn.Module, directory: Path, side_files_from: str | os.PathLike) -> Path:
    """Fold the adapters into the base weights and write a plain checkpoint (what `from_pretrained` and the released
    code load) at `directory`, atomically: written beside it, then renamed over any older one.

    Merging rewrites `model`'s weights in place and removes its adapters: call it when training is over."""
    merged = model.merge_and_unload()
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp), copy_side_files_from=side_files_from)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory
