"""`hymba study`: the paper's controlled architecture comparison, reproducible on one GPU.

    hymba study --preset small --device cuda --out out/study --seeds 2 --workers 6
    hymba study --preset small --out out/study --set lm_steps=400 --set shape.hidden_size=320
    hymba study --out out/study --report-only --report-dir docs/study   # tables and plots only, for the docs

Protocol (the same for every variant; `hymba.study.variants.VARIANTS` lists them):

1. Size. All variants of a study share one `ModelShape`; each variant's MLP width is solved so that its
   non-embedding parameter count matches hymba-base's (within a fraction of a percent).
2. Language modelling. Each (variant, seed) is trained from scratch with `hymba.train.trainer.train` on the token
   folder (default `data/tokens`) with the preset's hyperparameters. The seed fixes both the initialisation and
   the data order, so at one seed every variant sees exactly the same token windows in the same order. Reported:
   the trainer's validation-loss curve, and the final loss / perplexity over consecutive windows of the whole
   validation split.
3. Recall. Separately, a fresh model of the same architecture (with the integer recall vocabulary instead of the
   tokenizer's, a larger embedding init and Mamba's dt init: `init_recall_model`) is trained on synthetic recall
   data only - MQAR rows for the first `recall_mqar_only_steps`, then half MQAR, half phonebook rows per batch,
   the context length cycling through the preset's `recall_lengths` (joining shortest first, `recall_length`) at
   a fixed number of tokens per step - with the same optimizer and schedule as step 2, until held-out accuracy reaches
   `recall_stop_accuracy` at every length or `recall_steps` run out. Batches depend only on (seed, step), so again
   all variants see the same data. It is then evaluated on fresh examples (fixed evaluation seeds, disjoint from
   training) at every length: MQAR accuracy over the value positions (teacher-forced, as Zoology scores it) and
   phonebook exact match of the greedily generated number (cached generation engine). The lengths exceed the
   sliding window, so a windowed layer alone cannot reach most keys. Training recall separately keeps it learnable
   at small scale (a corpus-trained model of this size does not learn in-context lookup) without contaminating
   step 2.
4. Efficiency. Cache bytes per sequence at 1K and 8K tokens as the engine allocates them (bf16 K/V and conv
   state, float32 SSM state); decode throughput of the LM model with the cached engine, alone on the device
   (`prefill`, then the decode step as a CUDA graph on GPU), in bf16 on GPU.
5. Attention sinks (hymba.study.attention_sink): per layer, the share of attention on the first token and on
   the meta tokens, on validation windows.

Resuming: each (variant, seed) run has three parts, LM, recall and decode (the LM architecture's throughput), each
ending by atomically writing `runs/<variant>-seed<k>/{lm,recall,decode}.json` with its result and the settings it
depends on. A rerun skips every part finished with the current settings and redoes the rest from scratch (an
interrupted part starts over), so changing only recall settings (`--set recall_steps=...`) retrains only the
recall models. Reports include only runs whose parts match the current settings; `study.json` records the settings
of the latest invocation for `--report-only`.

Parallel runs: `--workers N` trains and evaluates N runs at once in separate processes on the same device (models
this small leave a GPU idle between kernel launches). Decode throughput is measured afterwards, one run at a time
in the study's own process, so no timing is taken while other runs share the device.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hymba.errors import HymbaError
from hymba.study.variants import VARIANTS, ModelShape, body_parameters, describe, get_variant, variant_config

if TYPE_CHECKING:
    import torch

    from hymba.config import HymbaConfig

BETAS = (0.9, 0.95)
EVAL_SEED = 20_241_113  # evaluation examples come from here, never from a training seed
CHECK_SEED = EVAL_SEED - 1  # the held-out rows early stopping reads
CACHE_LENGTHS = (1024, 8192)
DECODE_WARMUP = 4
STUDY_FILE = "study.json"


@dataclass(frozen=True)
class StudyPreset:
    """Everything a study's numbers depend on besides the seeds and the data (override with --set KEY=VALUE)."""

    name: str
    shape: ModelShape
    # Shared optimisation (AdamW, warmup-stable-decay to lr / 10, as the trainer's defaults for Hymba).
    warmup_steps: int
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Language modelling on the corpus.
    lm_block_size: int = 512
    lm_batch_size: int = 32
    lm_steps: int = 200
    lm_lr: float = 2e-3
    lm_eval_interval: int = 25
    lm_eval_iters: int = 4
    val_max_tokens: int | None = None  # cap on the tokens of the final validation pass (None: the whole split)
    sink_rows: int = 4  # validation windows for the attention-sink shares
    # Recall (MQAR + phonebook, integer vocabulary).
    recall_vocab_size: int = 512
    recall_lengths: tuple[int, ...] = (128, 256, 512, 1024)
    recall_tokens_per_step: int = 8192
    recall_steps: int = 300
    recall_lr: float = 1e-3
    recall_log_interval: int = 25  # also how often early stopping checks the held-out accuracy
    # What differs from the LM arm, and why (measured in docs/study/README.md): the embedding of the integer
    # vocabulary starts larger (None: the released 0.02), the first steps are MQAR only, the lengths join short to
    # long, and training stops once the held-out accuracy reaches this at every length (None: never).
    recall_embedding_std: float | None = 1.0
    recall_tie_embeddings: bool = False  # the release ties them (and the LM arm keeps that)
    # The SSM heads' step sizes: Mamba's init draws dt log-uniform in this range (dt_proj's bias = softplus^-1(dt)).
    # None keeps the release's init, which zeroes the bias: every channel starts at dt = softplus(0) = 0.69, forgets
    # within a few tokens, and Mamba-only stayed at chance on MQAR at every length with it (H200, session 20).
    recall_ssm_dt_range: tuple[float, float] | None = (0.001, 0.1)
    recall_mqar_only_steps: int = 0
    recall_curriculum_steps: int = 0
    recall_stop_accuracy: float | None = 0.99
    mqar_pairs_ratio: int = 16  # one key-value pair per this many tokens
    mqar_alpha: float = 1.0  # query placement: 1 uniform over the query section (Zoology: 0.01, near the pairs)
    recall_eval_examples: int = 256
    recall_eval_batch: int = 64
    # Decode throughput (cached engine).
    decode_batch: int = 16
    decode_prompt: int = 1024
    decode_tokens: int = 128
    notes: str = ""

    @property
    def max_positions(self) -> int:
        longest = max(self.lm_block_size, *self.recall_lengths,
                      self.decode_prompt + DECODE_WARMUP + self.decode_tokens + 1)
        return longest + self.shape.num_memory_tokens

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudyPreset:
        """The inverse of `to_dict` (JSON lists become tuples again)."""
        tuples = lambda d: {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}  # noqa: E731
        return cls(**{**tuples(data), "shape": ModelShape(**tuples(data["shape"]))})

    def with_overrides(self, overrides: dict[str, Any]) -> StudyPreset:
        """A copy with fields replaced; `shape.<field>` keys replace fields of the model shape."""
        top = {f.name for f in dataclasses.fields(self)}
        shape_fields = {f.name for f in dataclasses.fields(ModelShape)}
        changes, shape_changes = {}, {}
        for key, value in overrides.items():
            name = key.removeprefix("shape.")
            known = shape_fields if key.startswith("shape.") else top - {"shape"}
            if name not in known:
                raise HymbaError(f"unknown study setting {key!r}; known: {', '.join(sorted(known))} and "
                                 f"shape.<{'|'.join(sorted(shape_fields))}>")
            (shape_changes if key.startswith("shape.") else changes)[name] = tuple(value) if isinstance(
                value, list) else value
        return dataclasses.replace(self, shape=dataclasses.replace(self.shape, **shape_changes), **changes)


PRESETS: dict[str, StudyPreset] = {
    # CPU, CI: every code path at toy size in a few minutes; the numbers mean nothing.
    "tiny": StudyPreset(
        name="tiny",
        shape=ModelShape(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, global_attn_idx=(0, 3), sliding_window=16, num_memory_tokens=4,
                         mamba_d_state=8, mamba_dt_rank=4),
        warmup_steps=3, lm_block_size=32, lm_batch_size=4, lm_steps=10, lm_lr=3e-3, lm_eval_interval=5,
        lm_eval_iters=1, val_max_tokens=1024, sink_rows=2, recall_vocab_size=64, recall_lengths=(32, 64),
        recall_tokens_per_step=512, recall_steps=10, recall_lr=3e-3, recall_log_interval=5, recall_eval_examples=16,
        recall_eval_batch=16, decode_batch=2, decode_prompt=32, decode_tokens=8,
        notes="CI smoke test on CPU: exercises every code path, results are noise."),
    # ~8.4M non-embedding parameters per variant. Measured on one H200 at --workers 8 (docs/study): the 16 recall
    # parts took 887 s in 2 waves of 8 (early stopping at 0.99 shortens the runs that solve every length), the LM
    # parts 42-127 s each, so the whole study is about 20 minutes.
    "small": StudyPreset(
        name="small",
        shape=ModelShape(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                         intermediate_size=640, global_attn_idx=(0, 4, 7), sliding_window=128, num_memory_tokens=32),
        # Recall: the smallest vocabulary that holds 1024 tokens' 64 distinct keys and values (a larger one delays
        # learning), lengths joining every 300 steps and MQAR alone for the first 1,500 (the attention model solved
        # MQAR at every length by step 1,250 this way on an H200).
        warmup_steps=20, recall_vocab_size=160, recall_lengths=(64, 128, 256, 512, 1024), recall_steps=3000,
        recall_curriculum_steps=300, recall_mqar_only_steps=1500, recall_log_interval=50,
        notes="One GPU: 3.3M corpus tokens and up to 24.6M recall tokens per run (recall time estimated per step)."),
    # ~49M non-embedding parameters, 2 corpus epochs: one H100 for 1-1.5 hours (unmeasured).
    "medium": StudyPreset(
        name="medium",
        shape=ModelShape(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=2,
                         intermediate_size=1280, global_attn_idx=(0, 6, 11), sliding_window=256,
                         num_memory_tokens=64),
        warmup_steps=50, lm_block_size=1024, lm_batch_size=32, lm_steps=300, lm_lr=1.5e-3, lm_eval_interval=25,
        recall_vocab_size=1024, recall_lengths=(256, 512, 1024, 2048), recall_tokens_per_step=16384,
        recall_steps=1500, recall_log_interval=50, decode_batch=32, decode_prompt=2048,
        notes="One H100 for 1-1.5 hours (unmeasured estimate)."),
}


# ---------------------------------------------------------------------------------------------------------------------
# Configs


def lm_config(name: str, preset: StudyPreset, vocab_size: int) -> HymbaConfig:
    return variant_config(name, preset.shape, vocab_size, preset.max_positions)


def recall_config(name: str, preset: StudyPreset) -> HymbaConfig:
    from hymba.study.tasks import NEWLINE, PAD

    config = variant_config(name, preset.shape, preset.recall_vocab_size, preset.max_positions)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = PAD, None, NEWLINE
    config.tie_word_embeddings = preset.recall_tie_embeddings
    return config


def cache_bytes(config: HymbaConfig, tokens: int) -> int:
    """Per sequence, as `HymbaCache` allocates it in bf16 (K/V and conv state bf16, SSM state float32)."""
    import torch

    return config.cache_bytes(tokens, 1, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# One run


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _autocast_dtype(device: torch.device):
    import torch

    return torch.bfloat16 if device.type == "cuda" else None


def train_lm(config: HymbaConfig, preset: StudyPreset, seed: int, data_dir: Path, out_dir: Path,
             device: torch.device) -> tuple[Path, list[dict[str, Any]]]:
    """Train on the corpus through the trainer; returns the final checkpoint directory and the log records."""
    from hymba.train.trainer import TrainConfig, train

    out_dir.mkdir(parents=True, exist_ok=True)
    config.to_json(out_dir / "model_config.json")
    cfg = TrainConfig(model=str(out_dir / "model_config.json"), data_dir=str(data_dir), batch_size=preset.lm_batch_size,
                      block_size=preset.lm_block_size, lr=preset.lm_lr, min_lr=preset.lm_lr / 10,
                      weight_decay=preset.weight_decay, betas=BETAS, warmup_steps=preset.warmup_steps, schedule="wsd",
                      max_steps=preset.lm_steps, grad_clip=preset.grad_clip, eval_interval=preset.lm_eval_interval,
                      eval_iters=preset.lm_eval_iters, log_interval=preset.lm_eval_interval,
                      checkpoint_interval=preset.lm_steps, keep_checkpoints=1, out_dir=str(out_dir), seed=seed,
                      device=device.type, dtype="auto", progress=False)
    records = train(cfg)
    final = out_dir / (out_dir / "latest").read_text().strip()
    # The optimizer state only serves resuming a run mid-way, which the study never does (it reruns the run).
    (final / "trainer_state.pt").unlink(missing_ok=True)
    return final, records


def recall_length(preset: StudyPreset, step: int) -> int:
    """The context length of recall training step `step`: lengths join shortest first, one every
    `recall_curriculum_steps` steps (0: all from the start), and the steps cycle through those that have joined."""
    lengths = preset.recall_lengths
    if preset.recall_curriculum_steps:
        lengths = lengths[:1 + step // preset.recall_curriculum_steps]
    return lengths[step % len(lengths)]


def init_recall_model(config: HymbaConfig, preset: StudyPreset, seed: int, device: torch.device):
    """A fresh recall model: the released init, then the input embedding redrawn as normal(0, `recall_embedding_std`)
    unless that is None, and the SSM heads' dt drawn as Mamba's (`init_ssm_timescales`) unless
    `recall_ssm_dt_range` is None. The output layer keeps the released normal(0, 0.02) unless it is tied to the
    embedding.

    Measured on an H200 (docs/study/README.md): at the small preset's width (8 layers, d=256) the attention model
    with the embedding std 0.3 tied to the output (initial loss ~24 nats: logits of std ~0.3 x sqrt(256)) stayed on
    MQAR's 1/pairs plateau or diverged; std 1.0 with an untied output layer (initial loss ln(vocab)) solved every
    length; Mamba-only stayed at chance at every length until dt was drawn as Mamba's. Only the synthetic-vocabulary
    recall models get this; the LM arm keeps the released init."""
    import torch

    from hymba.model import HymbaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = HymbaForCausalLM(config)
    generator = torch.Generator(device).manual_seed(seed)
    model.init_weights(generator)
    with torch.no_grad():
        if preset.recall_embedding_std is not None:
            model.model.embed_tokens.weight.normal_(0.0, preset.recall_embedding_std, generator=generator)
        if preset.recall_ssm_dt_range is not None:
            init_ssm_timescales(model, *preset.recall_ssm_dt_range, generator=generator)
    return model


def init_ssm_timescales(model, dt_min: float, dt_max: float, generator: torch.Generator | None = None) -> None:
    """Mamba's (Gu & Dao) dt init for every layer with SSM heads: dt_proj's bias set so that softplus(bias) is
    log-uniform in [dt_min, dt_max] per channel (channels that remember for 1/dt_min down to 1/dt_max tokens), and its
    weight uniform in +-dt_rank^-0.5 (unit variance through the dt RMSNorm)."""
    import torch

    from hymba.model import HymbaMixer

    for module in model.modules():
        if isinstance(module, HymbaMixer) and module.use_ssm:
            proj = module.dt_proj[0]
            bound = proj.in_features ** -0.5
            proj.weight.uniform_(-bound, bound, generator=generator)
            fraction = torch.rand(proj.out_features, generator=generator, device=proj.bias.device)
            dt = torch.exp(fraction * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)


def recall_check_batches(preset: StudyPreset) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Held-out rows of the final training mixture (MQAR, and phonebook unless training never reaches it), per
    length, for early stopping; drawn from their own seed, disjoint from training and from the final evaluation."""
    import numpy as np

    from hymba.study.tasks import RecallVocab, recall_batch

    vocab = RecallVocab(preset.recall_vocab_size)
    phonebook = preset.recall_mqar_only_steps < preset.recall_steps
    return {n: recall_batch(np.random.default_rng([CHECK_SEED, n]), vocab, preset.recall_eval_batch, n,
                            preset.mqar_pairs_ratio, preset.mqar_alpha, phonebook) for n in preset.recall_lengths}


def train_recall(config: HymbaConfig, preset: StudyPreset, seed: int,
                 device: torch.device) -> tuple[Any, list[dict[str, Any]]]:
    """Train a fresh recall model (`init_recall_model`) on the recall mixture with the LM run's optimizer and
    schedule; returns (model, log).

    The first `recall_mqar_only_steps` steps train on MQAR alone, the lengths join short to long
    (`recall_length`), and every `recall_log_interval` steps the held-out accuracy at every length is checked: once
    all reach `recall_stop_accuracy`, training stops (the budget, `recall_steps`, is for the designs that never do).
    The trainer's loop reads token files, whose windows cannot mask the unpredictable key/value tokens out of
    the loss, so this loop feeds it masked batches through the trainer's own gradient and optimizer functions.
    """
    import numpy as np
    import torch

    from hymba.study.tasks import RecallVocab, recall_batch, teacher_forced
    from hymba.train.optim import lr_at, make_optimizer
    from hymba.train.trainer import Runtime, accumulate_gradients, count_targets

    rt = Runtime(rank=0, world_size=1, device=device, amp_dtype=_autocast_dtype(device))
    model = init_recall_model(config, preset, seed, device)
    model.train()
    optimizer = make_optimizer(model, preset.recall_lr, preset.weight_decay, BETAS, device_type=device.type)
    vocab = RecallVocab(preset.recall_vocab_size)
    checks = recall_check_batches(preset) if preset.recall_stop_accuracy is not None else {}
    records, window_loss, window_targets, skipped = [], torch.zeros((), device=device), 0, 0
    for step in range(preset.recall_steps):
        lr = lr_at(step, lr=preset.recall_lr, min_lr=preset.recall_lr / 10, warmup_steps=preset.warmup_steps,
                   max_steps=preset.recall_steps, schedule="wsd")
        for group in optimizer.param_groups:
            group["lr"] = lr
        seq_len = recall_length(preset, step)
        x, y = recall_batch(np.random.default_rng([seed, step]), vocab, preset.recall_tokens_per_step // seq_len,
                            seq_len, preset.mqar_pairs_ratio, preset.mqar_alpha,
                            phonebook=step >= preset.recall_mqar_only_steps)
        n_targets = count_targets(y)
        loss = accumulate_gradients(model, [(x.to(device), y.to(device))], n_targets, rt)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), preset.grad_clip or float("inf"))
        # A step with a non-finite gradient is skipped (as a loss scaler skips overflowed steps in mixed precision):
        # bf16 recall runs on an H200 hit NaN mid-training, and one such step turns every weight to NaN.
        if torch.isfinite(grad_norm):
            optimizer.step()
            window_loss += loss
            window_targets += n_targets
        else:
            skipped += 1
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % preset.recall_log_interval == 0 or step + 1 == preset.recall_steps:
            trained = window_targets > 0
            records.append({"step": step + 1, "loss": window_loss.item() / window_targets if trained else math.nan,
                            "lr": lr, "skipped_steps": skipped})
            window_loss.zero_()
            window_targets = 0
            if not trained:  # a whole window of skipped steps: nothing after this would train
                records[-1]["diverged"] = True
                break
            if checks:
                model.eval()
                accuracy = records[-1]["accuracy"] = {}
                for n, (check_x, check_y) in checks.items():
                    correct, scored = teacher_forced(model, check_x, check_y)
                    accuracy[str(n)] = correct / scored
                model.train()
                if min(accuracy.values()) >= preset.recall_stop_accuracy:
                    break
    return model.eval(), records


@dataclass
class _Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    def __call__(self, name: str, start: float) -> None:
        self.seconds[name] = round(time.perf_counter() - start, 2)


def decode_throughput(model, batch: int, prompt_len: int, new_tokens: int, seed: int = 0) -> float:
    """Decoded tokens per second over `new_tokens` greedy steps after a `prompt_len` random prompt (cached engine)."""
    import torch

    from hymba.cache import HymbaCache
    from hymba.generate import CudaGraphDecoder, decode_step, prefill

    device = model.device
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len),
                        generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.inference_mode():
        cache = HymbaCache(model.config, batch, prompt_len + DECODE_WARMUP + new_tokens + 1, device=device,
                           dtype=model.dtype)
        token = prefill(model, cache, ids, None).argmax(-1)
        if device.type == "cuda":
            step = CudaGraphDecoder(model, cache, batch)
        else:
            step = lambda tokens: decode_step(model, cache, tokens)  # noqa: E731
        for _ in range(DECODE_WARMUP):
            token = step(token).argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = step(token).argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return batch * new_tokens / (time.perf_counter() - start)


PART_PREFIXES = {"lm": ("lm_", "val_", "sink_"), "recall": ("recall_", "mqar_"), "decode": ("decode_",)}


def part_settings(preset: StudyPreset, part: str) -> dict[str, Any]:
    """The settings one part (see PART_PREFIXES) of a run depends on: the shape, the shared optimisation, its own."""
    own = PART_PREFIXES[part]
    data = preset.to_dict()
    return {k: v for k, v in data.items()
            if k in ("shape", "warmup_steps", "weight_decay", "grad_clip") or k.startswith(own)}


def run_lm(variant: str, seed: int, preset: StudyPreset, data_dir: Path, out_dir: Path,
           device: torch.device) -> dict[str, Any]:
    """Corpus part of a run: train, then validation perplexity, attention sinks and cache size."""
    import numpy as np
    import torch

    from hymba.model import HymbaForCausalLM
    from hymba.study.attention_sink import sink_shares
    from hymba.study.tasks import corpus_perplexity
    from hymba.train.data import TokenDataset

    timer = _Timer()
    dataset = TokenDataset(data_dir)
    config = lm_config(variant, preset, dataset.vocab_size)
    start = time.perf_counter()
    checkpoint, records = train_lm(config, preset, seed, data_dir, out_dir, device)
    timer("lm_train", start)
    start = time.perf_counter()
    model = HymbaForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32, device=device)
    val = corpus_perplexity(model, data_dir, preset.lm_block_size, preset.lm_batch_size, preset.val_max_tokens)
    sinks = []
    if any(config.has_attention(i) for i in range(config.num_hidden_layers)):
        block = preset.lm_block_size
        rows = np.stack([np.asarray(dataset.tokens("val")[r * block:(r + 1) * block], dtype=np.int64)
                         for r in range(preset.sink_rows)])
        sinks = sink_shares(model, torch.from_numpy(rows).to(device))
    timer("lm_eval", start)
    return {
        "variant": variant, "seed": seed, "design": describe(config), "checkpoint": str(checkpoint.relative_to(
            out_dir.parent)), "params": config.num_parameters(), "body_params": body_parameters(config),
        "cache_bytes": {str(n): cache_bytes(config, n) for n in CACHE_LENGTHS},
        "lm": {"val_loss": val["loss"], "val_ppl": val["ppl"], "val_tokens": val["tokens"],
               "curve": [{k: r[k] for k in ("step", "loss", "val_loss", "tokens_per_s") if k in r} for r in records]},
        "attention_sink": sinks, "seconds": timer.seconds,
    }


def run_decode(variant: str, seed: int, preset: StudyPreset, vocab_size: int, device: torch.device) -> dict[str, Any]:
    """Decode part of a run: decode throughput of the LM part's architecture (bf16 on GPU). Speed does not depend on
    the weights' values, so a freshly initialised model of the same config stands in for the checkpoint (no EOS
    stops the timed steps early). Measured with nothing else on the device: always in the study's own process."""
    import torch

    from hymba.model import HymbaForCausalLM

    start = time.perf_counter()
    with torch.device(device):
        model = HymbaForCausalLM(lm_config(variant, preset, vocab_size))
    model.init_weights(torch.Generator(device).manual_seed(seed))
    model = model.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    tokens_per_s = decode_throughput(model, preset.decode_batch, preset.decode_prompt, preset.decode_tokens)
    return {"decode_tokens_per_s": tokens_per_s, "seconds": {"decode": round(time.perf_counter() - start, 2)}}


def run_recall(variant: str, seed: int, preset: StudyPreset, out_dir: Path, device: torch.device) -> dict[str, Any]:
    """Recall part of a run: train on MQAR + phonebook, evaluate both at every length, keep the model."""
    from hymba.study.tasks import RecallVocab, eval_mqar, eval_phonebook

    timer = _Timer()
    config = recall_config(variant, preset)
    start = time.perf_counter()
    model, records = train_recall(config, preset, seed, device)
    model.save_pretrained(str(out_dir))
    timer("recall_train", start)
    start = time.perf_counter()
    vocab = RecallVocab(preset.recall_vocab_size)
    mqar, phonebook = {}, {}
    for n in preset.recall_lengths:
        mqar[str(n)] = eval_mqar(model, vocab, n, preset.recall_eval_examples, preset.recall_eval_batch,
                                 EVAL_SEED + 2 * n, preset.mqar_pairs_ratio, preset.mqar_alpha)
        phonebook[str(n)] = eval_phonebook(model, vocab, n, preset.recall_eval_examples, preset.recall_eval_batch,
                                           EVAL_SEED + 2 * n + 1)
    timer("recall_eval", start)
    return {"recall": {"mqar": mqar, "phonebook": phonebook, "curve": records},
            "recall_cache_bytes": {str(n): cache_bytes(config, n) for n in preset.recall_lengths},
            "seconds": timer.seconds}


# ---------------------------------------------------------------------------------------------------------------------
# The study


def run_dir_for(out: Path, variant: str, seed: int) -> Path:
    return out / "runs" / f"{variant}-seed{seed}"


def _data_identity(data_dir: Path) -> dict[str, Any]:
    from hymba.train.data import TokenDataset

    meta = TokenDataset(data_dir).meta
    return {k: meta.get(k) for k in ("train_tokens", "val_tokens", "vocab_size", "tokenizer_sha256")}


def _load_part(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """A finished part computed with exactly these settings, else None."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved["result"] if saved["settings"] == settings else None


def _prepare_device(device: torch.device) -> None:
    if device.type == "cuda":
        from hymba.ops.attention import allow_many_recompiles

        allow_many_recompiles()  # a study goes through dozens of shapes


def _train_parts(name: str, seed: int, preset: StudyPreset, data_dir: Path, run_dir: Path, device: torch.device,
                 settings: dict[str, dict[str, Any]]) -> tuple[list[str], dict[str, Any], float]:
    """The LM and recall parts of one run that are not finished with these settings; returns (parts that ran, the
    merged LM + recall record, seconds). Runs in the study's process or in a worker process."""
    start = time.perf_counter()
    _prepare_device(device)
    parts, ran = {}, []
    for part in ("lm", "recall"):
        parts[part] = _load_part(run_dir / f"{part}.json", settings[part])
        if parts[part] is None:
            # A part starts over from nothing, so its logs and weights are its own.
            shutil.rmtree(run_dir / part, ignore_errors=True)
            parts[part] = (run_lm(name, seed, preset, data_dir, run_dir / part, device) if part == "lm" else
                           run_recall(name, seed, preset, run_dir / part, device))
            _write_json_atomic(run_dir / f"{part}.json", {"settings": settings[part], "result": parts[part]})
            ran.append(part)
    return ran, merge_parts(parts["lm"], parts["recall"]), time.perf_counter() - start


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_study(preset: StudyPreset, out: str | Path, seeds: int = 2, device: str = "auto",
              data_dir: str | Path = "data/tokens", variants: list[str] | None = None,
              report_dir: str | Path | None = None, log=print, workers: int = 1) -> dict[str, Any]:
    """Train and evaluate every (variant, seed) part not yet finished in `out` with these settings, then write the
    reports into `report_dir` (default `out`) and return the summary. `device` "auto" takes CUDA when available.

    `workers` > 1 trains and evaluates that many runs at once in separate processes on the same device (small models
    leave a GPU mostly idle between kernel launches); decode throughput is then measured one run at a time."""
    import torch

    out, data_dir = Path(out), Path(data_dir)
    variants = list(variants or VARIANTS)
    for name in variants:
        get_variant(name)
    if seeds < 1:
        raise HymbaError(f"--seeds must be >= 1, got {seeds}")
    if workers < 1:
        raise HymbaError(f"--workers must be >= 1, got {workers}")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HymbaError("--device cuda but no CUDA device is available; use --device cpu (with --preset tiny)")
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(out / STUDY_FILE, {"preset": preset.to_dict(), "variants": variants, "seeds": seeds})
    settings = {"lm": {**part_settings(preset, "lm"), "data": _data_identity(data_dir)},
                "recall": part_settings(preset, "recall"), "decode": part_settings(preset, "decode")}
    jobs = [(seed, name) for seed in range(seeds) for name in variants]
    longest = str(preset.recall_lengths[-1])

    def report(index: int, seed: int, name: str, ran: list[str], result: dict[str, Any], seconds: float) -> None:
        if not ran:
            log(f"[{index}/{len(jobs)}] {name} seed {seed}: done, skipped")
            return
        log(f"[{index}/{len(jobs)}] {name} seed {seed} ({' + '.join(ran)}): val ppl {result['lm']['val_ppl']:.2f}, "
            f"MQAR@{longest} {result['recall']['mqar'][longest]:.3f}, phonebook@{longest} "
            f"{result['recall']['phonebook'][longest]:.3f} ({seconds:.0f} s)")

    args = [(name, seed, preset, data_dir, run_dir_for(out, name, seed), dev, settings) for seed, name in jobs]
    if workers == 1:
        for index, (job, arg) in enumerate(zip(jobs, args), 1):
            report(index, *job, *_train_parts(*arg))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: a forked child cannot use a CUDA context, and the parent may hold one.
        with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _worker_init,
                                 (max(1, (os.cpu_count() or 1) // workers),)) as pool:
            futures = {pool.submit(_train_parts, *arg): job for job, arg in zip(jobs, args)}
            for index, future in enumerate(as_completed(futures), 1):
                report(index, *futures[future], *future.result())
    _prepare_device(dev)
    for seed, name in jobs:
        run_dir = run_dir_for(out, name, seed)
        if _load_part(run_dir / "decode.json", settings["decode"]) is None:
            result = run_decode(name, seed, preset, settings["lm"]["data"]["vocab_size"], dev)
            _write_json_atomic(run_dir / "decode.json", {"settings": settings["decode"], "result": result})
            log(f"decode {name} seed {seed}: {result['decode_tokens_per_s']:,.0f} tok/s")
    return write_reports(out, preset, report_dir, log)


# ---------------------------------------------------------------------------------------------------------------------
# Reports


def merge_parts(*parts: dict[str, Any]) -> dict[str, Any]:
    """One run's record: every part's fields, and all parts' timings."""
    return {k: v for part in parts for k, v in part.items()} | {
        "seconds": {k: v for part in parts for k, v in part["seconds"].items()}}


def load_results(out: Path, preset: StudyPreset) -> list[dict[str, Any]]:
    """Every run in `out` whose parts all finished with `preset`'s settings, in the study's variant order, then by
    seed. (Which data the LM part was trained on is checked when the study runs, not here.)"""
    results = []
    for run_dir in sorted((out / "runs").glob("*-seed*")):
        paths = {part: run_dir / f"{part}.json" for part in PART_PREFIXES}
        if not all(p.is_file() for p in paths.values()):
            continue
        saved = {part: json.loads(p.read_text()) for part, p in paths.items()}
        saved["lm"]["settings"].pop("data", None)
        if all(saved[part]["settings"] == part_settings(preset, part) for part in PART_PREFIXES):
            results.append(merge_parts(*(saved[part]["result"] for part in PART_PREFIXES)))
    order = {name: i for i, name in enumerate(VARIANTS)}
    return sorted(results, key=lambda r: (order.get(r["variant"], len(order)), r["seed"]))


def mean_spread(values: list[float]) -> dict[str, float]:
    """Mean and spread (half the min-max range: with two seeds, both lie at mean +- spread) across seeds."""
    return {"mean": sum(values) / len(values), "spread": (max(values) - min(values)) / 2, "n": len(values)}


def run_metrics(result: dict[str, Any], lengths: tuple[int, ...]) -> dict[str, float]:
    """The scalar metrics of one run, by name (`mqar@256`, ...), in table order."""
    metrics = {"val_loss": result["lm"]["val_loss"], "val_ppl": result["lm"]["val_ppl"],
               "decode_tokens_per_s": result["decode_tokens_per_s"],
               "recall_steps": result["recall"]["curve"][-1]["step"]}  # fewer than recall_steps: stopped early
    for task in ("mqar", "phonebook"):
        metrics.update({f"{task}@{n}": result["recall"][task][str(n)] for n in lengths})
    return metrics


def summarize(results: list[dict[str, Any]], preset: StudyPreset) -> dict[str, Any]:
    """Per variant (in the study's order): design, size, cache, and every metric as mean +- spread over seeds."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    summary = {}
    for name in [v for v in VARIANTS if v in by_variant]:
        runs = sorted(by_variant[name], key=lambda r: r["seed"])
        first = runs[0]
        per_run = [run_metrics(r, preset.recall_lengths) for r in runs]
        steps = [c["step"] for c in first["lm"]["curve"] if "val_loss" in c]
        curve = [{"step": s, **mean_spread([c["val_loss"] for r in runs for c in r["lm"]["curve"]
                                            if c["step"] == s and "val_loss" in c])} for s in steps]
        sinks = [{"layer": s["layer"], "window": s["window"],
                  **{k: sum(r["attention_sink"][i][k] for r in runs) / len(runs)
                     for k in ("meta", "first_token", "other", "total")}}
                 for i, s in enumerate(first["attention_sink"])]
        summary[name] = {
            "description": VARIANTS[name].description, "design": first["design"], "seeds": [r["seed"] for r in runs],
            "params": first["params"], "body_params": first["body_params"], "cache_bytes": first["cache_bytes"],
            "recall_cache_bytes": first["recall_cache_bytes"],
            "recall_diverged": [r["seed"] for r in runs if r["recall"]["curve"][-1].get("diverged")],
            "metrics": {k: {**mean_spread([m[k] for m in per_run]), "values": [m[k] for m in per_run]}
                        for k in per_run[0]},
            "val_loss_curve": curve, "attention_sink": sinks,
        }
    return summary


def _fmt(stat: dict[str, float], digits: int) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['spread']:.{digits}f}"


def format_markdown(summary: dict[str, Any], preset: StudyPreset, plots: list[str]) -> str:
    """results.md: the protocol in brief, the two result tables, the plots and the exact settings."""
    from hymba.study.tasks import PhonebookFormat, mqar_pairs, phonebook_queries

    seeds = max((len(s["seeds"]) for s in summary.values()), default=0)
    lines = [f"# Hymba architecture study (preset `{preset.name}`)", "",
             f"{len(summary)} variants x {seeds} seeds; every cell is the mean ± half the min-max range across "
             "seeds. All variants have the same non-embedding parameter count (MLP width solved per variant), train "
             "on the same tokens in the same order at each seed, with the same hyperparameters. LM: trained on the "
             "corpus, perplexity over the whole validation split. Recall: a separate model of the same architecture "
             "trained on MQAR + phonebook rows (integer vocabulary) at the context lengths below, evaluated on fresh "
             "examples at each length (MQAR: accuracy on value positions; phonebook: exact match of the generated "
             f"number); `steps` is how long it trained (at most {preset.recall_steps}: it stops once held-out "
             f"accuracy reaches {preset.recall_stop_accuracy} at every length). The sliding window is "
             f"{preset.shape.sliding_window} tokens. See `hymba.study.run` for the full protocol.", "",
             "## Language modelling and efficiency", "",
             "| variant | layers | meta | attention | KV groups | params (M) | non-emb. (M) | val loss | val ppl "
             "| cache @1K (KiB) | cache @8K (KiB) | decode tok/s |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in summary.items():
        d, m = s["design"], s["metrics"]
        lines.append(f"| {name} | {d['layers']} | {d['meta_tokens']} | {d['attention']} | {len(d['kv_groups'])} "
                     f"| {s['params'] / 1e6:.2f} | {s['body_params'] / 1e6:.2f} | {_fmt(m['val_loss'], 3)} "
                     f"| {_fmt(m['val_ppl'], 1)} | {s['cache_bytes']['1024'] / 1024:,.0f} "
                     f"| {s['cache_bytes']['8192'] / 1024:,.0f} | {_fmt(m['decode_tokens_per_s'], 0)} |")
    lengths = preset.recall_lengths
    lines += ["", "## Recall", "",
              "| variant | steps | " + " | ".join(f"MQAR @{n}" for n in lengths) + " | "
              + " | ".join(f"phonebook @{n}" for n in lengths) + " |",
              "|---|---:|" + "---:|" * (2 * len(lengths))]
    for name, s in summary.items():
        cells = [_fmt(s["metrics"]["recall_steps"], 0)]
        cells += [_fmt(s["metrics"][f"{task}@{n}"], 3) for task in ("mqar", "phonebook") for n in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    pairs = [mqar_pairs(n, preset.mqar_pairs_ratio) for n in lengths]
    entries = [PhonebookFormat().entries(n, phonebook_queries(n)) for n in lengths]
    lines += ["", "Reference points: a model that knows which values occur in its context, but not which key each "
              "belongs to, scores 1/pairs on MQAR (" + ", ".join(f"1/{p} at {n}" for p, n in zip(pairs, lengths))
              + "); copying a random number of the book scores 1/entries on the phonebook ("
              + ", ".join(f"1/{e}" for e in entries) + ")."]
    diverged = [f"{name} seed {seed}" for name, s in summary.items() for seed in s.get("recall_diverged", [])]
    if diverged:
        lines += ["", "**Recall training diverged (a non-finite loss; it stopped there, and the run's recall cells "
                  f"are of the diverged model): {', '.join(diverged)}.**"]
    if all(s["metrics"][f"mqar@{n}"]["mean"] < 2 / p for s in summary.values() for n, p in zip(lengths, pairs)):
        # MQAR is learnt abruptly after a plateau at 1/pairs; a budget that ends on the plateau compares nothing.
        lines += ["", f"**No variant rose above twice the 1/pairs reference on MQAR: recall training ended on its "
                  f"plateau, so the recall table does not separate the designs. Rerun with more steps, e.g. "
                  f"`--set recall_steps={4 * preset.recall_steps}` and the same --out: only the recall parts rerun.**"]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    lines += ["", "## Settings", "", "```json", json.dumps(preset.to_dict(), indent=2), "```", ""]
    return "\n".join(lines)


def load_preset(out: str | Path) -> StudyPreset:
    """The preset a study directory was run with (from its study.json)."""
    path = Path(out) / STUDY_FILE
    if not path.is_file():
        raise HymbaError(f"{out} is not a study directory (no study.json); run `hymba study --out {out}` first")
    return StudyPreset.from_dict(json.loads(path.read_text())["preset"])


def write_reports(out: str | Path, preset: StudyPreset, report_dir: str | Path | None = None,
                  log=print) -> dict[str, Any]:
    """results.json, results.csv (one row per run), results.md and the plots, from the finished runs in `out`,
    written to `report_dir` (default `out`; the reports hold no weights, so a docs folder can take them)."""
    results = load_results(Path(out), preset)
    if not results:
        raise HymbaError(f"no runs in {out}/runs finished with these settings; run the study first")
    out = Path(report_dir or out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results, preset)
    _write_json_atomic(out / "results.json", {"preset": preset.to_dict(), "variants": summary, "runs": results})
    rows = [{"variant": r["variant"], "seed": r["seed"], "params": r["params"], "body_params": r["body_params"],
             "intermediate_size": r["design"]["intermediate_size"], "cache_bytes_1k": r["cache_bytes"]["1024"],
             "cache_bytes_8k": r["cache_bytes"]["8192"], **run_metrics(r, preset.recall_lengths),
             "seconds": r["seconds"].get("total")} for r in results]
    with (out / ".results.csv.tmp").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(out / ".results.csv.tmp", out / "results.csv")
    from hymba.study.plots import make_plots

    plots = make_plots(summary, preset, out)
    if not plots:
        log("hymba study: matplotlib is not installed, so no plots (pip install 'hymba[plot]')")
    (out / "results.md").write_text(format_markdown(summary, preset, [str(p) for p in plots]))
    log(f"hymba study: {len(results)} runs summarised in {out / 'results.md'}")
    return summary


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise HymbaError(f"--set takes KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def add_parser(subparsers) -> None:
    """Register `hymba study`."""
    parser = subparsers.add_parser(
        "study", help="train and compare architecture variants (attention, Mamba, sequential, Hymba ablations)",
        description="The paper's controlled comparison: every variant at the same size, trained on the same tokens "
                    "with the same hyperparameters for >= 2 seeds, evaluated on validation perplexity, MQAR and "
                    "phonebook recall, cache size and decode throughput. Resumable: finished runs in --out are "
                    "skipped. Writes results.md, results.json, results.csv and plots to --out (or --report-dir).")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="tiny: CPU smoke test (minutes); small: about 20 minutes on one H200 with --workers 8 "
                        "(measured; --workers 6 on an 80 GB GPU); medium: 1-1.5 hours (estimated)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    parser.add_argument("--out", required=True, help="study directory (resumed when it exists)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per variant (0..N-1)")
    parser.add_argument("--data-dir", default="data/tokens", help="token folder from `hymba data` (train/val.bin)")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs trained side by side on the device (small models leave a GPU mostly idle, so "
                        "several at once finish sooner; at preset small each needs 10-13 GiB of GPU memory, so 6 fit "
                        "on 80 GB); decode throughput is still measured one run at a time")
    parser.add_argument("--variants", default=None, help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset setting (JSON value), e.g. lm_steps=400 or shape.hidden_size=320")
    parser.add_argument("--report-dir", default=None,
                        help="where results.md/json/csv and the plots go (default --out), e.g. docs/study")
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite the reports from the finished runs in --out (with their own settings)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.report_only:
        write_reports(args.out, load_preset(args.out), args.report_dir)
        return 0
    preset = PRESETS[args.preset].with_overrides(dict(_parse_override(o) for o in args.overrides))
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else None
    run_study(preset, args.out, args.seeds, args.device, args.data_dir, variants, args.report_dir,
              workers=args.workers)
    return 0
