"""`hymba train`: pre-train or fine-tune a Hymba model in one readable loop.

    hymba data build-corpus --out data/corpus && hymba data tokenize data/corpus/corpus.jsonl --out data/tokens
    hymba train --config default-small --data-dir data/tokens --out out/small
    hymba train --config my.json --max-steps 200 --resume          # continue from out_dir/latest
    torchrun --nproc_per_node 8 -m hymba.cli train --config default-small   # DDP (or "distributed": "fsdp")

A `TrainConfig` (JSON; every field can be overridden on the command line) names the model (a preset plus
overrides, or `init_from` a checkpoint), the data (token files from `hymba data`, or a chat JSONL for SFT), the
optimizer and schedule, and the run. Every step draws one global batch, identical on every process, and each
process trains on its own rows of it, so the run's arithmetic does not depend on how it is split into
processes or gradient-accumulation steps - and resuming only needs the data sampler's position.

Checkpoints are `from_pretrained` directories (safetensors weights, config, tokenizer files) plus
`trainer_state.pt` (optimizer, step, RNG states, sampler position), written to a temporary directory and renamed
into place; `out_dir/latest` names the newest. Resuming reproduces the uninterrupted run exactly (bit for bit on
CPU; GPU kernels need not be deterministic).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pickle
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hymba.config import HymbaConfig
from hymba.errors import HymbaError, did_you_mean
from hymba.model import HymbaForCausalLM
from hymba.train.lora import DEFAULT_TARGETS
from hymba.train.optim import SCHEDULES, decayed_parameter_names, lr_at, make_optimizer
from hymba.train.sft import IGNORE_INDEX, SFTBatches, load_conversations

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
STATE_FILE = "trainer_state.pt"
LATEST_FILE = "latest"
# Dense bf16 tensor-core peak per device, for MFU (H200 has H100's compute, only more memory).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


# What each TrainConfig field means: the `hymba train --help` text of its override flag.
FIELD_HELP = {
    'model': 'a preset name (hymba-1.5b, tiny, ...) or a config.json path, trained from scratch',
    'model_overrides': 'JSON object of HymbaConfig keys to change in the preset',
    'init_from': 'a checkpoint directory or hub id to fine-tune instead of training from scratch',
    'tokenizer': "tokenizer files copied into checkpoints; default: init_from's, else packaged",
    'data_dir': 'token files from `hymba data tokenize` (train.bin, val.bin, meta.json)',
    'data_order': 'token files: "random" windows (nanoGPT) or "sequential" epochs over every token',
    'sft_data': 'chat JSONL ({"messages": [...]}) for supervised fine-tuning; loss on assistant tokens only',
    'sft_val_data': 'chat JSONL for validation during SFT',
    'sft_packing': '"pack" (rows of exactly block_size) or "pad" (one conversation per row)',
    'batch_size': 'rows per micro-batch per process',
    'block_size': 'tokens per training row',
    'grad_accum': 'micro-batches per optimizer step',
    'lr': 'peak learning rate',
    'min_lr': 'learning rate at the end of the schedule',
    'weight_decay': 'AdamW weight decay (>= 2-D weights only; not norms, biases, meta tokens, A_log, D)',
    'betas': 'AdamW betas, as JSON [b1, b2]',
    'eps': 'AdamW epsilon',
    'warmup_steps': 'linear warmup steps',
    'schedule': '"wsd" (warmup-stable-decay, Hymba\'s), "cosine" or "constant"',
    'decay_fraction': 'wsd: share of max_steps spent decaying to min_lr',
    'max_steps': 'optimizer steps to train',
    'grad_clip': 'clip the gradient norm to this (0 disables)',
    'eval_interval': 'steps between validation passes',
    'eval_iters': 'batches per validation pass',
    'log_interval': 'steps between log lines',
    'checkpoint_interval': 'steps between checkpoints',
    'keep_checkpoints': 'how many checkpoints to keep',
    'out_dir': 'output directory',
    'log_file': 'JSONL log path (default: out_dir/log.jsonl)',
    'seed': 'seed for initialisation and data order',
    'device': '"auto": cuda if available, else cpu',
    'dtype': '"bf16" (autocast on CUDA, float32 master weights) or "float32"; auto: bf16 on CUDA',
    'residual_dtype': 'the residual stream between layers under bf16 autocast: "bf16" (as Megatron and torchtitan '
                      'train: no float32 adds, and no casts into and out of each projection; 4%% faster for the 1.5B '
                      'shape on an H200) or "float32" (as nanoGPT and transformers keep it); auto: bf16 where the '
                      'step runs under bf16 autocast, else float32',
    'lora_r': 'LoRA rank: train low-rank adapters on a frozen init_from model through peft (0: all weights)',
    'lora_alpha': 'LoRA scale numerator (adapters are scaled by alpha / r); default 2 * lora_r',
    'lora_dropout': 'dropout on the LoRA adapters\' input',
    'lora_targets': 'comma-separated module names to adapt (default: in_proj,out_proj,gate_proj,up_proj,down_proj)',
    'merge': 'LoRA: at the end, also write out_dir/merged, the adapters folded into a plain checkpoint',
    'activation_checkpointing': 'recompute each layer in backward to save memory',
    'compile': 'torch.compile each decoder layer on its own (regional compilation), not the model as one graph',
    'distributed': 'under torchrun: "ddp" or "fsdp" (FSDP2 fully_shard per layer: sharded weights and Adam state)',
    'peak_flops': 'per-device peak for MFU; None: looked up from the GPU name',
    'progress': 'show a progress bar',
}


@dataclass
class TrainConfig:
    """One training run. Paths are relative to the working directory."""

    # Model: a preset (or a config.json path) with overrides, trained from scratch; or a checkpoint to fine-tune.
    model: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    tokenizer: str | None = None
    # Data: token files (train.bin / val.bin / meta.json from `hymba data`), or chat JSONL for SFT.
    data_dir: str | None = None
    data_order: str = "random"
    sft_data: str | None = None
    sft_val_data: str | None = None
    sft_packing: str = "pack"
    # LoRA (through peft) on a frozen init_from model; 0 trains every weight.
    lora_r: int = 0
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    merge: bool = False
    batch_size: int = 8
    block_size: int = 256
    grad_accum: int = 1
    # Optimizer and schedule.
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "wsd"
    decay_fraction: float = 0.2
    max_steps: int = 1000
    grad_clip: float = 1.0
    # Evaluation, logging, checkpoints.
    eval_interval: int = 100
    eval_iters: int = 20
    log_interval: int = 10
    checkpoint_interval: int = 500
    keep_checkpoints: int = 2
    out_dir: str = "out/train"
    log_file: str | None = None
    # Runtime.
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    residual_dtype: str = "auto"
    activation_checkpointing: bool = False
    compile: bool = False
    distributed: str = "ddp"
    peak_flops: float | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.lora_targets, str):  # the command line's comma-separated form
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        # Types first (a JSON file or a command line can hold anything), so the checks below can compare values.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not (value is None and f.default is None) and not _has_type(value, _field_type(f)):
                raise HymbaError(f"train config `{f.name}` must be {_KIND_NAMES[_field_type(f)]}, got {value!r}")
        known = {f.name for f in dataclasses.fields(HymbaConfig)} - {"extra"}
        for key in self.model_overrides:
            if key not in known:
                raise HymbaError(f"train config `model_overrides`: {key!r} is not a HymbaConfig key"
                                 f"{did_you_mean(key, known)}")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise HymbaError(f"train config `betas` must be two numbers in [0, 1), e.g. [0.9, 0.95]; got "
                             f"{list(self.betas)}")
        self.betas = tuple(self.betas)
        if self.lora_r < 0 or (self.lora_r and not self.lora_targets):
            raise HymbaError("lora_r must be >= 0 (0: train every weight), with at least one lora_target")
        if self.lora_r and self.init_from is None:
            raise HymbaError("lora_r needs init_from: LoRA adapts an existing model's frozen weights")
        if self.lora_r and self.distributed == "fsdp":
            raise HymbaError("LoRA trains a few million weights: run it with distributed 'ddp', not 'fsdp'")
        if self.merge and not self.lora_r:
            raise HymbaError("merge folds LoRA adapters into the base model; it needs lora_r > 0")
        if (self.data_dir is None) == (self.sft_data is None):
            raise HymbaError("set exactly one of data_dir (token files for pre-training) and sft_data (chat JSONL)")
        for key in ("batch_size", "block_size", "grad_accum", "max_steps", "eval_interval", "log_interval",
                    "checkpoint_interval", "keep_checkpoints"):
            if getattr(self, key) <= 0:
                raise HymbaError(f"train config `{key}` must be positive, got {getattr(self, key)}")
        choices = {"data_order": ("random", "sequential"), "sft_packing": ("pack", "pad"), "schedule": SCHEDULES,
                   "distributed": ("ddp", "fsdp"), "dtype": ("auto", "bf16", "bfloat16", "float32", "fp32"),
                   "residual_dtype": ("auto", "float32", "fp32", "bf16", "bfloat16")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise HymbaError(f"train config `{key}` is {getattr(self, key)!r}; use one of {', '.join(allowed)}")
        if self.residual_dtype in ("bf16", "bfloat16") and self.dtype in ("float32", "fp32"):
            raise HymbaError(f"residual_dtype {self.residual_dtype!r} needs bf16 autocast; use dtype 'bf16' (or "
                             f"'auto' on a GPU), or residual_dtype 'float32'")

    @property
    def residual_in_bf16(self) -> bool:
        """Whether the residual stream is bf16 where the step runs under bf16 autocast (without it, float32 anyway)."""
        return self.residual_dtype in ("auto", "bf16", "bfloat16")

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a config file (or a packaged config by name, e.g. 'default-small'), then apply `overrides`."""
        path = resolve_config_path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise HymbaError(f"{path} is not valid JSON ({exc})") from None
        # Naming one data source on top of a file that names the other switches source (pre-training <-> SFT).
        for source, other in (("data_dir", "sft_data"), ("sft_data", "data_dir")):
            if overrides.get(source) is not None and other not in overrides:
                data.pop(other, None)
        data.update(overrides)
        if not isinstance(data, dict):
            raise HymbaError(f"{path} is not a JSON object of train config keys")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise HymbaError(f"{path}: unknown train config keys {unknown}{did_you_mean(unknown[0], known)}; "
                             f"known keys: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_type(f: dataclasses.Field) -> type:
    """The type of a TrainConfig field's values: its default's (str where the default is None)."""
    if f.name in ("peak_flops", "lora_alpha"):
        return float
    if f.default_factory is not dataclasses.MISSING:
        return type(f.default_factory())
    return type(f.default) if f.default is not None else str


def _has_type(value: Any, kind: type) -> bool:
    if kind is float:  # an int is a number too; a bool is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind in (int, bool):  # exactly: True is no batch size, 1 no switch
        return type(value) is kind
    if kind is tuple:  # JSON has lists
        return isinstance(value, (list, tuple))
    if kind is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, kind)


_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               dict: "a JSON object", tuple: "a JSON list", list: "a list of strings"}


def resolve_config_path(name: str | Path) -> Path:
    """A config file path, or the name of a packaged config in hymba/train/configs."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / str(name), CONFIG_DIR / f"{name}.json"):
        if candidate.is_file():
            return candidate
    packaged = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    raise HymbaError(f"no train config {name}; pass a JSON file or one of the packaged configs {packaged}")


# ---------------------------------------------------------------------------------------------------------------------
# Processes and devices


@dataclass
class Runtime:
    """Where this process runs: rank, world size, device, and the autocast dtype (None: plain float32)."""

    rank: int
    world_size: int
    device: torch.device
    amp_dtype: torch.dtype | None
    owns_process_group: bool = False  # joined it here, so leaves it at the end

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPU) and pick the device."""
    from hymba.checkpoint import resolve_device

    if cfg.device != "auto":
        resolve_device(cfg.device)  # refuses unknown device types, and CUDA without a GPU
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else cfg.device if cfg.device != "auto" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    owns_group = world_size > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    # bf16 autocast only on CUDA: CPU bf16 matmuls are slow, and CPU runs are tests that want exact float32.
    amp = device.type == "cuda" and cfg.dtype in ("auto", "bf16", "bfloat16")
    return Runtime(rank, world_size, device, torch.bfloat16 if amp else None, owns_group)


def all_reduce_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ---------------------------------------------------------------------------------------------------------------------
# Model and data


def model_config(cfg: TrainConfig) -> HymbaConfig:
    """The model `cfg` asks for: init_from's, or a preset (or a config.json path) with the overrides."""
    if cfg.init_from is not None:
        from hymba.checkpoint import resolve_checkpoint_dir

        return HymbaConfig.from_json(resolve_checkpoint_dir(cfg.init_from))
    if cfg.model.endswith(".json") or Path(cfg.model).is_dir():
        return HymbaConfig.from_dict({**HymbaConfig.from_json(cfg.model).to_dict(), **cfg.model_overrides})
    return HymbaConfig.preset(cfg.model, **cfg.model_overrides)


def check_model_fits(cfg: TrainConfig, config: HymbaConfig) -> None:
    """Rows longer than the model's positions would not train what it can run (and try huge allocations)."""
    if cfg.block_size + config.num_memory_tokens > config.max_position_embeddings:
        raise HymbaError(f"block_size {cfg.block_size} + {config.num_memory_tokens} meta tokens exceed the model's "
                         f"{config.max_position_embeddings} positions; use a block_size of at most "
                         f"{config.max_position_embeddings - config.num_memory_tokens}")


def build_model(cfg: TrainConfig, device: torch.device, checkpoint: str | Path | None = None) -> torch.nn.Module:
    """float32 master weights: from `checkpoint` (resume), `init_from` (fine-tune), or freshly initialised.

    With `lora_r`, the `init_from` model frozen inside a peft wrapper whose adapters are new, or `checkpoint`'s."""
    source = cfg.init_from if cfg.lora_r else checkpoint or cfg.init_from
    if source is not None:
        model = HymbaForCausalLM.from_pretrained(source, dtype=torch.float32, device=device)
    else:
        config = model_config(cfg)
        with torch.device(device):
            model = HymbaForCausalLM(config)
        model.init_weights(torch.Generator(device).manual_seed(cfg.seed))
    model.model.gradient_checkpointing = cfg.activation_checkpointing
    model.model.residual_in_autocast_dtype = cfg.residual_in_bf16  # where the step runs under autocast
    if cfg.lora_r:
        from hymba.train.lora import add_adapters

        model.name_or_path = str(cfg.init_from)  # peft records it as the adapters' base model
        model = add_adapters(model, cfg.lora_r, cfg.lora_alpha or 2 * cfg.lora_r, cfg.lora_dropout, cfg.lora_targets,
                             adapters_from=checkpoint)
    return model.train()


def tokenizer_dir(cfg: TrainConfig) -> Path:
    from hymba.tokenizer import default_tokenizer_dir

    if cfg.tokenizer:
        return Path(cfg.tokenizer)
    if cfg.init_from and (Path(cfg.init_from) / "tokenizer.json").is_file():
        return Path(cfg.init_from)
    return default_tokenizer_dir()


class TokenBatches:
    """Global batches of windows from a token folder, through the data module's resumable samplers.

    The sampler is asked for the whole global batch (as rank 0 of 1), so every process draws the same rows.
    """

    def __init__(self, cfg: TrainConfig, split: str, rows: int, seed: int, vocab_size: int):
        from hymba.train.data import RandomBatchSampler, SequentialBatchSampler, TokenDataset

        dataset = TokenDataset(cfg.data_dir)
        if dataset.vocab_size > vocab_size:
            raise HymbaError(f"{cfg.data_dir} was tokenized with a vocabulary of {dataset.vocab_size} but the "
                             f"model has {vocab_size} embeddings; use the model's tokenizer")
        # meta.json can be wrong (files written by other tools): an id past the embeddings would fail mid-run
        # (IndexError on the CPU, a device assert on a GPU). One pass over the memory-mapped file finds it.
        tokens = dataset.tokens(split)
        largest = int(tokens.max()) if len(tokens) else -1
        if largest >= vocab_size:
            raise HymbaError(f"{Path(cfg.data_dir) / f'{split}.bin'} holds token id {largest} but the model has "
                             f"{vocab_size} embeddings; tokenize the data with the model's tokenizer")
        if cfg.data_order == "sequential" and split == "train":
            self.sampler = SequentialBatchSampler(dataset, split, rows, cfg.block_size)
        else:
            self.sampler = RandomBatchSampler(dataset, split, rows, cfg.block_size, seed=seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self.sampler)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class ChatBatches:
    """Global batches of SFT conversations (see hymba.train.sft), with the same interface as TokenBatches."""

    def __init__(self, cfg: TrainConfig, path: str, rows: int, seed: int):
        from hymba.tokenizer import HymbaTokenizer

        tokenizer = HymbaTokenizer.from_pretrained(tokenizer_dir(cfg))
        examples = load_conversations(path, tokenizer, cfg.block_size + 1)
        self.batches = SFTBatches(examples, cfg.block_size, tokenizer.pad_token_id, cfg.sft_packing, seed)
        self.rows = rows

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches.next_batch(self.rows)

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)


def make_batches(cfg: TrainConfig, split: str, rows: int, seed: int, vocab_size: int):
    """The train or val source of (x, y) global batches of `rows` rows; None when there is no validation data."""
    if cfg.data_dir is not None:
        from hymba.train.data import TokenDataset

        if split == "val" and TokenDataset(cfg.data_dir).num_tokens("val") <= cfg.block_size:
            return None
        return TokenBatches(cfg, split, rows, seed, vocab_size)
    path = cfg.sft_data if split == "train" else cfg.sft_val_data
    return None if path is None else ChatBatches(cfg, path, rows, seed)


def rows_for(batch: tuple[torch.Tensor, torch.Tensor], micro: int, rt: Runtime, batch_size: int):
    """This process's rows of micro-step `micro` in a global batch laid out [micro][rank][row].

    To a GPU through pinned memory, without blocking: a copy from pageable memory makes the host wait until the GPU
    has finished all the work queued before it, so the next step could not be queued while this one runs."""
    start = (micro * rt.world_size + rt.rank) * batch_size
    rows = (t[start:start + batch_size] for t in batch)
    if rt.device.type == "cuda":
        return tuple(t.pin_memory().to(rt.device, non_blocking=True) for t in rows)
    return tuple(t.to(rt.device) for t in rows)


def count_targets(y: torch.Tensor) -> int:
    return int((y != IGNORE_INDEX).sum())


def loss_sum(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Summed next-token cross-entropy of a micro-batch (targets -100 are skipped).

    Through the model's forward (so DDP and FSDP see the call), which computes it from the hidden states a chunk
    of tokens at a time (`hymba.ops.cross_entropy`) and returns no logits: the full float32 logits of the batch
    are never in memory."""
    with rt.autocast():
        return model(x, shift_labels=y, loss_reduction="sum", return_logits=False).loss


# ---------------------------------------------------------------------------------------------------------------------
# Parallelism


def compile_layers(model: torch.nn.Module, **options: Any) -> None:
    """Regional compilation: `torch.compile` each decoder layer in place (names and checkpoints are unchanged).

    Compiling the whole model traces all its layers into one graph, which took longer than 170 s at the 1.5B shape
    before a step ran. Layer by layer, dynamo traces each layer once (its guards name the layer's index and kind)
    and the compiler's graph cache serves the layers of one kind (global, windowed, KV-reusing) from one compiled
    graph. The embedding, the meta tokens, the attention plans and the loss stay eager. `options` go to
    `torch.compile` (the tests pick a backend that needs no C++ compiler)."""
    from hymba.model import HymbaDecoderLayer
    from hymba.ops.attention import allow_many_recompiles

    allow_many_recompiles()  # one compiled entry per layer; dynamo's default limit is 8 per function
    for module in model.modules():
        if isinstance(module, HymbaDecoderLayer):
            module.compile(**options)


def wrap_model(model: HymbaForCausalLM, cfg: TrainConfig, rt: Runtime) -> torch.nn.Module:
    """Compile each layer if asked (`compile_layers`), then DDP or FSDP2 across processes (nothing when alone)."""
    if cfg.compile:
        compile_layers(model)
    if rt.world_size > 1 and cfg.distributed == "fsdp":
        import warnings

        from torch.distributed.fsdp import fully_shard

        # One FSDP unit per decoder layer, and the root (embeddings, meta tokens, final norm) for the rest:
        # parameters, gradients and optimizer state live sharded, and a layer's weights are gathered only while it
        # runs forward or backward. KV-reusing layers get their producer's K,V as a layer argument, which FSDP wraps
        # for its backward hooks like any other input.
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        # A producer returns its V as a view of in_proj's output. FSDP warns of views leaving a unit, since an
        # in-place op on one would skip the unit's backward hook; nothing changes K,V in place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPHymbaDecoderLayer\) returned a view")
    elif rt.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return model


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """Skip the gradient all-reduce on all but the last accumulation micro-step."""
    if hasattr(model, "require_backward_grad_sync"):  # DDP
        model.require_backward_grad_sync = sync
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)


def accumulate_gradients(model: torch.nn.Module, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
                         n_targets: int, rt: Runtime) -> torch.Tensor:
    """Backward over this process's micro-batches; returns their summed loss (detached).

    Each micro-batch's summed loss is divided by the global batch's target count and multiplied by the world size
    (DDP and FSDP average gradients over processes), so the final gradient is that of the mean loss over every
    target token of the global batch, however the rows are split - also when SFT rows hold unequal numbers.
    """
    total = torch.zeros((), device=rt.device)
    for micro, (x, y) in enumerate(micro_batches):
        set_gradient_sync(model, micro == len(micro_batches) - 1)
        loss = loss_sum(model, x, y, rt)
        (loss * (rt.world_size / n_targets)).backward()
        total += loss.detach()
    return total


def optimizer_step(model: torch.nn.Module, raw_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   micro_batches: list[tuple[torch.Tensor, torch.Tensor]], n_targets: int, rt: Runtime,
                   grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step (what `hymba bench train` times): gradients over the micro-batches, the norm clipped to
    `grad_clip` (0: not clipped, still measured for the log), AdamW. Returns the summed loss and the gradient norm
    as device tensors, so nothing here waits for the GPU."""
    loss = accumulate_gradients(model, micro_batches, n_targets, rt)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip or math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, cfg: TrainConfig, rt: Runtime) -> float:
    """Mean loss per target token over `eval_iters` global batches of the validation source (split as in training,
    so the rows evaluated do not depend on the number of processes)."""
    model.eval()
    loss, count = torch.zeros((), device=rt.device), 0
    for _ in range(cfg.eval_iters):
        batch = batches.next_batch()
        for micro in range(cfg.grad_accum):
            loss += loss_sum(model, *rows_for(batch, micro, rt, cfg.batch_size), rt)
        count += count_targets(batch[1])
    model.train()
    if hasattr(model, "reshard"):  # FSDP keeps the root's gathered weights after a forward with no backward
        model.reshard()
    return all_reduce_sum(loss, rt).item() / max(count, 1)


# ---------------------------------------------------------------------------------------------------------------------
# Throughput


def flops_per_row(config: HymbaConfig, seq_len: int, adapter_params: int | None = None) -> float:
    """Training FLOPs (forward + backward) for one row of `seq_len` tokens.

    6 per parameter per position (the layers also run over the meta tokens; the LM head only over text), plus
    attention: 6 * (d_qk + d_v) per head per visible (query, key) pair, counting the window and meta-token rule.
    The selective scan's elementwise work (~1% here) is left out, as nanoGPT leaves out softmax.
    With `adapter_params` (LoRA), the base weights are frozen: 4 per base parameter (forward, and the gradient of
    its input; none for the weight) plus 6 per adapter parameter.
    """
    with torch.device("meta"):
        model = HymbaForCausalLM(config)
    head = config.vocab_size * config.hidden_size
    memory = config.num_memory_tokens * config.hidden_size
    embed = head if config.tie_word_embeddings else 2 * head
    body = model.num_parameters() - embed - memory
    M, T = config.num_memory_tokens, seq_len
    per_weight = 6 if adapter_params is None else 4
    flops = per_weight * (body * (M + T) + head * T) + 6 * (adapter_params or 0) * (M + T)
    i = np.arange(M + T, dtype=np.float64)  # query index over [meta, text]
    per_head_pair = 6 * (config.qk_head_dim + config.value_head_dim)
    for layer in range(config.num_hidden_layers):
        if not config.has_attention(layer):
            continue
        window = config.window(layer)
        visible = i + 1 if window is None else np.minimum(i + 1, window + 1) + np.clip(i - window, 0, M)
        flops += per_head_pair * config.num_attention_heads * visible.sum()
    return float(flops)


def device_peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of one device: the config's value, else looked up by GPU name; None on CPU or unknown."""
    if cfg.peak_flops:
        return cfg.peak_flops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_state(model: HymbaForCausalLM, optimizer: torch.optim.Optimizer, rt: Runtime,
                     fsdp: bool) -> tuple[HymbaForCausalLM | None, dict]:
    """A saveable model and the full optimizer state for rank 0; under FSDP every process must call this (it
    gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    # Keyed by parameter name, not position, so a checkpoint resumes under DDP, FSDP or one process alike.
    options = StateDictOptions(full_state_dict=True, cpu_offload=fsdp)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    if not fsdp:
        return model, optim_state
    full = get_model_state_dict(model, options=options)  # gathered on rank 0 only, the others get {}
    if not rt.master:
        return None, optim_state
    with torch.device("meta"):
        saveable = HymbaForCausalLM(model.config)
    saveable.load_state_dict(full, assign=True)
    if model.config.tie_word_embeddings:
        saveable.lm_head.weight = saveable.model.embed_tokens.weight
    return saveable, optim_state


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, step: int, model: HymbaForCausalLM, trainer_state: dict, cfg: TrainConfig) -> Path:
    """Write out_dir/step-NNNNNNN atomically (temp dir + rename), point `latest` at it, keep the newest N."""
    name = f"step-{step:07d}"
    final, tmp = out_dir / name, out_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.lora_r:
        from hymba.train.lora import save_adapters

        save_adapters(model, tmp, tokenizer_dir(cfg))
    else:
        model.save_pretrained(str(tmp), copy_side_files_from=tokenizer_dir(cfg))
    torch.save(trainer_state, tmp / STATE_FILE)
    (tmp / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    if final.exists():  # the same step saved again (a resumed run re-reaching it): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = out_dir / f".{LATEST_FILE}.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, out_dir / LATEST_FILE)
    for old in sorted(out_dir.glob("step-*"))[:-cfg.keep_checkpoints]:
        shutil.rmtree(old)
    return final


def find_checkpoint(resume: str | bool, out_dir: Path) -> Path | None:
    """The checkpoint to resume: a given directory, or out_dir's latest (None when there is none yet)."""
    pointer = out_dir / LATEST_FILE
    if not isinstance(resume, str) and not pointer.is_file():
        return None
    path = Path(resume) if isinstance(resume, str) else out_dir / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise HymbaError(f"{path} is not a training checkpoint (no {STATE_FILE}); pass a step-* directory")
    return path


# Resuming keeps these: the model is the checkpoint's, and so are the RNG states and the training data order.
KEPT_ON_RESUME = ("model", "model_overrides", "init_from", "seed")


def check_resume(cfg: TrainConfig, checkpoint: Path) -> tuple[list[str], list[str]]:
    """Refuse to resume a different model. Returns the settings changed since the checkpoint was saved, as
    'key old -> new': those that apply from now on, and those that resuming keeps as they were."""
    saved_path = checkpoint / "train_config.json"
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        saved = None
    now = json.loads(json.dumps(cfg.to_dict()))
    if (checkpoint / "config.json").is_file():
        saved_model = HymbaConfig.from_json(checkpoint).to_dict()
        asked = json.loads(json.dumps(model_config(cfg).to_dict()))  # as the checkpoint's JSON holds it (lists)
    else:  # a LoRA checkpoint holds adapters only: its model is the frozen init_from model with these adapters
        structure = ("init_from", "lora_r", "lora_targets")
        saved_model = {k: saved.get(k) for k in structure} if isinstance(saved, dict) else {}
        asked = {k: now[k] for k in structure}
    # torch_dtype is bookkeeping: checkpoints hold float32 master weights whatever the preset names.
    differ = sorted(k for k in saved_model.keys() | asked.keys()
                    if k != "torch_dtype" and saved_model.get(k) != asked.get(k))
    if differ:
        shown = ", ".join(f"{k} {saved_model.get(k)!r} -> {asked.get(k)!r}" for k in differ[:6])
        raise HymbaError(f"{checkpoint} holds another model than the config asks for ({shown}"
                         f"{', ...' if len(differ) > 6 else ''}); resume with the model it was trained with, or "
                         "start a new run in another --out")
    if not isinstance(saved, dict):
        return [f"(unknown: {saved_path} is missing or damaged)"], []
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now if k in saved and saved[k] != now[k]]
    return ([c for c in changed if c.split()[0] not in KEPT_ON_RESUME],
            [c for c in changed if c.split()[0] in KEPT_ON_RESUME])


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / STATE_FILE
    try:
        # Our own file (optimizer tensors, RNG tuples): the one place full unpickling is needed and trusted.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # truncated, empty, not a torch file
        raise HymbaError(f"{path} is damaged ({str(exc).split('. ')[0]}); resume from an earlier checkpoint "
                         "(--resume OUT/step-N)") from None
    if not isinstance(state, dict) or not {"step", "optimizer", "sampler", "rng"} <= state.keys():
        raise HymbaError(f"{path} is not a trainer state; resume from an earlier checkpoint (--resume OUT/step-N)")
    return state


def _logged_lines(log_path: Path, last_step: int) -> list[str]:
    """The log's lines up to `last_step`; a line a killed run left half-written is dropped like later ones."""
    kept = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, TypeError, KeyError):
            continue
        if isinstance(step, int) and step <= last_step:
            kept.append(line)
    return kept


# ---------------------------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, resume: str | bool = False) -> list[dict[str, Any]]:
    """Run training; returns the log records (also appended to the JSONL log file by the first process).

    `resume=True` continues from out_dir's latest checkpoint when there is one; a path resumes from that one.
    """
    from tqdm import tqdm

    rt = setup_runtime(cfg)
    out_dir = Path(cfg.out_dir)
    checkpoint = find_checkpoint(resume, out_dir) if resume else None
    applied, kept = check_resume(cfg, checkpoint) if checkpoint is not None else ([], [])
    # A LoRA checkpoint holds adapters, not a config: its model is init_from's.
    has_config = checkpoint is not None and (checkpoint / "config.json").is_file()
    check_model_fits(cfg, HymbaConfig.from_json(checkpoint) if has_config else model_config(cfg))
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    raw_model = build_model(cfg, rt.device, checkpoint)
    config = raw_model.config
    model = wrap_model(raw_model, cfg, rt)
    fsdp = rt.world_size > 1 and cfg.distributed == "fsdp"
    optimizer = make_optimizer(raw_model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps, rt.device.type)
    rows_per_step = cfg.batch_size * cfg.grad_accum * rt.world_size
    train_batches = make_batches(cfg, "train", rows_per_step, cfg.seed, config.vocab_size)
    val_batches = make_batches(cfg, "val", rows_per_step, cfg.seed + 1, config.vocab_size)
    val_start = val_batches.state_dict() if val_batches is not None else None
    step = 0
    if checkpoint is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = load_trainer_state(checkpoint)
        if state["step"] > cfg.max_steps:
            raise HymbaError(f"{checkpoint} is at step {state['step']}, past max_steps {cfg.max_steps}; raise "
                             "--max-steps to train on (a run cannot go back)")
        set_optimizer_state_dict(raw_model, optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        train_batches.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        step = state["step"]

    peak = device_peak_flops(cfg, rt.device)
    adapter_params = sum(p.numel() for p in raw_model.parameters() if p.requires_grad) if cfg.lora_r else None
    log_path = Path(cfg.log_file) if cfg.log_file else out_dir / "log.jsonl"
    if rt.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if log_path.is_file():  # drop what an interrupted run logged after the checkpoint it resumes from
            log_path.write_text("".join(line + "\n" for line in _logged_lines(log_path, step)))
        n_params = raw_model.num_parameters()
        trained = f", {adapter_params / 1e6:.2f}M of them LoRA adapters, trained" if cfg.lora_r else ""
        print(f"hymba train: {n_params / 1e6:.2f}M parameters{trained} ({len(decayed_parameter_names(raw_model))} "
              f"decayed tensors), {rows_per_step * cfg.block_size:,} tokens per step on {rt.world_size} x "
              f"{rt.device.type}"
              f"{f', resuming at step {step} from {checkpoint}' if checkpoint else ''}")
        if checkpoint is not None:
            print("hymba train: " + (f"changed settings that apply from step {step}: {', '.join(applied)}"
                                     if applied else "the settings are those the checkpoint was saved with"))
        if kept:
            print(f"hymba train: not applied, resuming keeps the checkpoint's model, RNG states and data order: "
                  f"{', '.join(kept)}")
        if step == cfg.max_steps:
            print(f"hymba train: already at max_steps {cfg.max_steps}, nothing to train; raise --max-steps to go on")

    records: list[dict[str, Any]] = []
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (rt.master and cfg.progress), dynamic_ncols=True)
    window_loss, window_targets, window_tokens, window_flops = torch.zeros((), device=rt.device), 0, 0, 0.0
    window_start = time.perf_counter()
    row_flops: dict[int, float] = {}  # by row length (SFT "pad" rows vary)
    while step < cfg.max_steps:
        lr = lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                   schedule=cfg.schedule, decay_fraction=cfg.decay_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr

        batch = train_batches.next_batch()
        n_targets = count_targets(batch[1])
        micro_batches = [rows_for(batch, m, rt, cfg.batch_size) for m in range(cfg.grad_accum)]
        loss, grad_norm = optimizer_step(model, raw_model, optimizer, micro_batches, n_targets, rt, cfg.grad_clip)
        window_loss += loss
        step += 1
        bar.update(1)
        window_targets += n_targets
        window_tokens += batch[0].numel()
        T = batch[0].shape[1]
        window_flops += row_flops.setdefault(T, flops_per_row(config, T, adapter_params)) * batch[0].shape[0]

        evaluating = step % cfg.eval_interval == 0 or step == cfg.max_steps
        if step % cfg.log_interval == 0 or evaluating:
            loss = all_reduce_sum(window_loss, rt).item() / window_targets  # .item() waits for the GPU
            elapsed = time.perf_counter() - window_start
            if hasattr(grad_norm, "full_tensor"):  # FSDP: a replicated DTensor
                grad_norm = grad_norm.full_tensor()
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm.item(),
                      "tokens_per_s": window_tokens / elapsed,
                      "mfu": window_flops / elapsed / (peak * rt.world_size) if peak else None,
                      # The most tensor memory this process has held (the log shows rank 0's): FSDP's saving.
                      "peak_memory_gib": torch.cuda.max_memory_allocated(rt.device) / 2**30
                      if rt.device.type == "cuda" else None}
            if evaluating and val_batches is not None:
                val_batches.load_state_dict(val_start)  # the same validation rows at every evaluation
                record["val_loss"] = evaluate(model, val_batches, cfg, rt)
                record["val_ppl"] = math.exp(min(record["val_loss"], 50.0))
            records.append(record)
            if rt.master:
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} tok/s {record['tokens_per_s']:,.0f} mfu "
                                    + (f"{record['mfu']:.1%}" if peak else "n/a")
                                    + (f" val {record['val_loss']:.4f}" if "val_loss" in record else ""))
            window_loss.zero_()
            window_targets, window_tokens, window_flops = 0, 0, 0.0
            window_start = time.perf_counter()

        if step % cfg.checkpoint_interval == 0 or step == cfg.max_steps:
            saving_since = time.perf_counter()
            saveable, optim_state = checkpoint_state(raw_model, optimizer, rt, fsdp)
            if rt.master:
                state = {"step": step, "optimizer": optim_state, "sampler": train_batches.state_dict(),
                         "rng": rng_state(), "schedule": {"lr": cfg.lr, "schedule": cfg.schedule}}
                save_checkpoint(out_dir, step, saveable, state, cfg)
            if rt.world_size > 1:
                dist.barrier()  # nobody runs ahead (or exits) before the checkpoint is on disk
            window_start += time.perf_counter() - saving_since  # saving is not training time
    bar.close()
    if cfg.merge and rt.master:
        from hymba.train.lora import write_merged

        print(f"hymba train: merged model written to {write_merged(raw_model, out_dir / 'merged', tokenizer_dir(cfg))}")
    if rt.owns_process_group:
        dist.destroy_process_group()
    return records


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def _override_type(f: dataclasses.Field):
    """argparse type for a TrainConfig field: JSON for dicts/tuples, else the field's type."""
    kind = _field_type(f)
    # A list (lora_targets) is given comma-separated, as one string.
    return json.loads if kind in (dict, tuple) else str if kind is list else kind


def add_parser(subparsers) -> None:
    """Register `hymba train`."""
    parser = subparsers.add_parser(
        "train", help="pre-train or fine-tune (SFT, all weights or LoRA) a Hymba model",
        description="Train a Hymba model from a TrainConfig JSON file; any config field can be overridden, "
                    "e.g. --max-steps 100 --out out/run. Under torchrun it trains with DDP (or FSDP). "
                    "--lora-r R fine-tunes LoRA adapters (peft) on the frozen --init-from model.",
    )
    parser.add_argument("--config", help="a TrainConfig JSON file or a packaged config name "
                        f"({', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.json')))}); default: TrainConfig's "
                        "defaults, e.g. for `--init-from CKPT --sft-data chat.jsonl --lora-r 16`")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="continue from out_dir's latest checkpoint (when there is one), or from CHECKPOINT")
    parser.add_argument("--out", dest="out_dir", default=None, help="output directory (config key out_dir)")
    group = parser.add_argument_group("config overrides")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "out_dir":
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=FIELD_HELP.get(f.name))
        else:
            group.add_argument(flag, dest=f.name, type=_override_type(f), default=None, metavar=f.name.upper(),
                               help=FIELD_HELP.get(f.name))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    cfg = TrainConfig.from_json(args.config, **overrides) if args.config else TrainConfig(**overrides)
    train(cfg, resume=args.resume)
    return 0
