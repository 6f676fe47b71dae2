"""Checkpoints in the released format: `config.json` + `model.safetensors` (or shards with an index).

Weights are read with safetensors only (never unpickled) and loaded into a model built on the meta device,
so a checkpoint's tensors are allocated once, directly in the requested dtype and device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hymba.config import HymbaConfig
from hymba.errors import HymbaError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "tokenizer.model")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None, config: HymbaConfig | None = None) -> torch.dtype:
    """A torch dtype from a dtype, a name ('bf16', 'float32', ...), or None/'auto' (the checkpoint's own)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        dtype = (config.torch_dtype if config else None) or "float32"
    if dtype not in DTYPES:
        raise HymbaError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return DTYPES[dtype]


def resolve_checkpoint_dir(path_or_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory as is; otherwise a Hugging Face hub id fetched (or found in the cache) by snapshot_download."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise HymbaError(f"no checkpoint directory at {name}; pass a directory with config.json and "
                         "model.safetensors, or a hub id like nvidia/Hymba-1.5B-Base")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "tokenizer.model"]))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise HymbaError(f"could not fetch {name} from the Hugging Face hub ({type(exc).__name__}); check the id "
                         "and your connection, or download it and pass the local directory") from None


def _weight_files(directory: Path) -> list[Path]:
    if (directory / INDEX_NAME).is_file():
        index = json.loads((directory / INDEX_NAME).read_text())
        return [directory / name for name in sorted(set(index["weight_map"].values()))]
    if (directory / WEIGHTS_NAME).is_file():
        return [directory / WEIGHTS_NAME]
    raise HymbaError(f"{directory} has no {WEIGHTS_NAME} or {INDEX_NAME}; only safetensors checkpoints are read "
                     "(convert .bin files with safetensors first)")


def expected_tensors(model: torch.nn.Module) -> dict[str, torch.Size]:
    """Checkpoint tensor names and shapes; a tied LM head is stored once, as the embedding."""
    shapes = {name: t.shape for name, t in model.state_dict(keep_vars=True).items()}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def load_pretrained(path_or_id: str | os.PathLike, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None, revision: str | None = None):
    """Build a `HymbaForCausalLM` from a checkpoint directory or hub id (see `HymbaForCausalLM.from_pretrained`)."""
    from hymba.model import HymbaForCausalLM

    directory = resolve_checkpoint_dir(path_or_id, revision)
    config = HymbaConfig.from_json(directory / "config.json")
    dtype = resolve_dtype(dtype, config)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = HymbaForCausalLM(config)
    expected = expected_tensors(model)

    state, wrong_shape = {}, []
    for file in _weight_files(directory):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if name in expected and tensor.shape != expected[name]:
                    wrong_shape.append(f"{name} {tuple(tensor.shape)} (expected {tuple(expected[name])})")
                state[name] = tensor.to(dtype)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected or wrong_shape:
        problems = [f"{label}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
                    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong_shape))
                    if items]
        raise HymbaError(f"{directory} does not match its config.json ({'; '.join(problems)}); "
                         "the weights and config come from different models")
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.checkpoint_dir = directory
    return model.eval()


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, then rename: a crash never leaves half a file.

    The file gets the permissions of any file the user creates (umask), not the owner-only 0600 that mkstemp
    and safetensors' writer give, so a saved checkpoint can be shared.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.touch(exist_ok=False)
        mode = stat.S_IMODE(tmp.stat().st_mode)
        write(str(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_pretrained(model, directory: str | os.PathLike, max_shard_bytes: int = 5 * 1024**3,
                    copy_side_files_from: str | os.PathLike | None = None) -> None:
    """Write config.json and safetensors weights (sharded above `max_shard_bytes`) in the released format.

    Tokenizer and generation files are copied from `copy_side_files_from`, or from the checkpoint the model
    was loaded from, so a saved directory is complete on its own.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    config = dataclasses.replace(model.config, torch_dtype=str(model.dtype).removeprefix("torch."))

    shards, current, size = [], {}, 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = state[name]
        size += nbytes
    shards.append(current)

    names = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        _atomic_write(directory / name, lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {t: n for n, shard in zip(names, shards) for t in shard}}
        _atomic_write(directory / INDEX_NAME, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
    elif (directory / INDEX_NAME).exists():
        (directory / INDEX_NAME).unlink()
    _atomic_write(directory / "config.json", config.to_json)

    copy_side_files(copy_side_files_from or getattr(model, "checkpoint_dir", None), directory)


def copy_side_files(source: str | os.PathLike | None, directory: str | os.PathLike) -> None:
    """Copy the tokenizer and generation files that `source` has into `directory` (nothing when they are one)."""
    if source is not None and Path(source).resolve() != Path(directory).resolve():
        for name in SIDE_FILES:
            if (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, Path(directory) / name)
