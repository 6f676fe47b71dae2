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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hymba.config import HymbaConfig
from hymba.errors import HymbaError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "tokenizer.model")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None, config: HymbaConfig | None = None,
                  device: torch.device | None = None) -> torch.dtype:
    """A torch dtype from a dtype, a name ('bf16', 'float32', ...), 'auto' (the checkpoint's own), or None.

    None is float32 on the CPU and the checkpoint's own dtype elsewhere, the rule the `hymba` command uses too:
    CPU bf16 matmuls are slow, and their results depend on the batch a row is in (see the README).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None and device is not None and device.type == "cpu":
        dtype = "float32"
    if dtype in (None, "auto"):
        dtype = (config.torch_dtype if config else None) or "float32"
    if dtype not in DTYPES:
        raise HymbaError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return DTYPES[dtype]


def resolve_device(device: torch.device | str | None) -> torch.device:
    """A torch device from a name, refusing device types we do not run on and CUDA where there is none."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise HymbaError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise HymbaError(f"device {device} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HymbaError(f"device {device} asked for, but PyTorch sees no CUDA device; use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise HymbaError(f"device {device} asked for, but there are {torch.cuda.device_count()} CUDA devices")
    return device


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
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HymbaError(f"{index_path} is not valid JSON ({exc}); re-download or re-save the checkpoint") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise HymbaError(f"{index_path} has no weight_map of tensor names to files; re-download or re-save "
                             "the checkpoint")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise HymbaError(f"{index_path} names shard(s) that are not there: {', '.join(missing)}; re-download "
                             "the checkpoint")
        return files
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
    device = resolve_device(device or "cpu")
    dtype = resolve_dtype(dtype, config, device)
    with torch.device("meta"):
        model = HymbaForCausalLM(config)
    expected = expected_tensors(model)

    state, wrong_shape = {}, []
    for file in _weight_files(directory):
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    if name in expected and tensor.shape != expected[name]:
                        wrong_shape.append(f"{name} {tuple(tensor.shape)} (expected {tuple(expected[name])})")
                    state[name] = tensor.to(dtype)
        except SafetensorError as exc:  # truncated, empty or not safetensors at all
            raise HymbaError(f"{file} is not a readable safetensors file ({exc}); re-download or re-save the "
                             "checkpoint") from None
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
    # Weights of an earlier save in another layout (shards, or one file) would be left behind, unused but loaded
    # by tools that glob *.safetensors; they go once the new weights (and index) are in place.
    for stale in [*directory.glob("model-*-of-*.safetensors"), directory / WEIGHTS_NAME]:
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    _atomic_write(directory / "config.json", config.to_json)

    copy_side_files(copy_side_files_from or getattr(model, "checkpoint_dir", None), directory)


def copy_side_files(source: str | os.PathLike | None, directory: str | os.PathLike) -> None:
    """Copy the tokenizer and generation files that `source` has into `directory` (nothing when they are one)."""
    if source is not None and Path(source).resolve() != Path(directory).resolve():
        for name in SIDE_FILES:
            if (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, Path(directory) / name)
