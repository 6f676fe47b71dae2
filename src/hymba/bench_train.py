"""`hymba bench train`: training throughput, MFU and peak memory of `hymba train`'s step, on random tokens.

Each case builds the model, optimizer and runtime exactly as `hymba train` does (float32 master weights, bf16
autocast and fused AdamW on a GPU), then runs the trainer's own `optimizer_step` on one random batch:
`--warmup-steps` untimed (FlexAttention and the Triton kernels compile for the shape), then `--steps` timed with
CUDA events. Data loading is left out. On out-of-memory the batch is halved until it fits.

The default cases on a GPU: the Hymba-1.5B shape at 2,048 and 8,192 tokens per row with and without activation
checkpointing, the packaged default-small model the same way, all at 16,384 tokens per step, and Hymba-1.5B with
LoRA adapters (rank 16 on the default targets) at 2,048 for the peak memory of LoRA against full fine-tuning.
Without CUDA the same code runs the `tiny` shape on the CPU, so the command is testable.

MFU is the model's training FLOPs per second over the device's dense bf16 peak (`MFU_FORMULA`; what `hymba train`
logs). Activation checkpointing's recomputed forward is not counted: it is work the model does not need.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hymba.errors import HymbaError

MFU_FORMULA = ("MFU = training FLOPs per second / the device's dense bf16 peak; FLOPs per row = 6 x parameters x "
               "positions (meta tokens included; the LM head over the text only) + attention, 6 x (d_qk + d_v) per "
               "head per visible (query, key) pair; the selective scan's elementwise work (~1%) is not counted. "
               "LoRA: 4 per frozen parameter (no weight gradient) + 6 per adapter parameter.")
GPU_DEFAULTS = dict(models="hymba-1.5b,default-small", seqs="2048,8192", tokens_per_step=16384, steps=10,
                    warmup_steps=3, lora_r=16)
CPU_DEFAULTS = dict(models="tiny", seqs="32,64", tokens_per_step=128, steps=2, warmup_steps=1, lora_r=4)
# TrainConfig names a data source; the benchmark feeds random tokens instead and never reads it.
RANDOM_TOKENS = "(random tokens)"


@dataclass
class TrainRow:
    model: str
    seq_len: int
    batch: int  # rows asked for
    activation_checkpointing: bool
    lora_r: int
    compile: bool
    batch_ran: int | None = None  # after halving on out-of-memory; None: not even one row fit
    steps: int = 0
    step_ms: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None  # weights, gradients, optimizer state and activations
    flops_per_token: float | None = None
    params: int | None = None
    trained_params: int | None = None
    loss: float | None = None  # mean loss of the last timed step (about ln(vocab) on random tokens)


@dataclass
class TrainBenchOptions:
    models: list[str]
    seqs: list[int]
    tokens_per_step: int
    checkpointing: list[bool]
    lora_r: int
    steps: int
    warmup_steps: int
    device: Any
    compile: bool = False
    residual_dtype: str = "auto"
    peak_flops: float | None = None
    seed: int = 0

    def cases(self) -> list[TrainRow]:
        """Every model x length x checkpointing, then LoRA on the first model at the first length."""
        rows = [TrainRow(m, s, max(1, self.tokens_per_step // s), ckpt, 0, self.compile)
                for m in self.models for s in self.seqs for ckpt in self.checkpointing]
        if self.lora_r:
            s = self.seqs[0]
            rows.append(TrainRow(self.models[0], s, max(1, self.tokens_per_step // s), False, self.lora_r,
                                 self.compile))
        return rows


def train_config(row: TrainRow, o: TrainBenchOptions):
    """The TrainConfig of `hymba train` for this case: a preset, or the model of a packaged train config."""
    from hymba.config import PRESETS
    from hymba.train.trainer import CONFIG_DIR, TrainConfig

    settings = dict(data_dir=RANDOM_TOKENS, batch_size=row.batch, block_size=row.seq_len,
                    activation_checkpointing=row.activation_checkpointing, compile=row.compile,
                    residual_dtype=o.residual_dtype, device=str(o.device), dtype="auto", peak_flops=o.peak_flops,
                    seed=o.seed, progress=False)
    if row.model in PRESETS:
        return TrainConfig(model=row.model, **settings)
    if (CONFIG_DIR / f"{row.model}.json").is_file():
        packaged = TrainConfig.from_json(row.model)
        return TrainConfig(model=packaged.model, model_overrides=packaged.model_overrides, **settings)
    raise HymbaError(f"unknown model {row.model!r}; use a preset ({', '.join(PRESETS)}) or a packaged train config "
                     f"({', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.json')))})")


def training_step(row: TrainRow, o: TrainBenchOptions, batch: int):
    """(cfg, runtime, model, step) for one case at `batch` rows: `step()` is one `hymba train` optimizer step on a
    fixed batch of random tokens, returning (summed loss, grad norm)."""
    import dataclasses

    import torch

    from hymba.train import trainer

    cfg = dataclasses.replace(train_config(row, o), batch_size=batch)
    rt = trainer.setup_runtime(cfg)
    model = trainer.build_model(cfg, rt.device)
    if row.lora_r:
        from hymba.train.lora import DEFAULT_TARGETS, add_adapters

        model = add_adapters(model, row.lora_r, 2 * row.lora_r, 0.0, list(DEFAULT_TARGETS))
    wrapped = trainer.wrap_model(model, cfg, rt)
    optimizer = trainer.make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps, rt.device.type)
    tokens = torch.randint(0, model.config.vocab_size, (batch, row.seq_len + 1),
                           generator=torch.Generator().manual_seed(o.seed))
    micro_batches = [(tokens[:, :-1].to(rt.device), tokens[:, 1:].to(rt.device))]

    def step():
        return trainer.optimizer_step(wrapped, model, optimizer, micro_batches, batch * row.seq_len, rt,
                                      cfg.grad_clip)

    return cfg, rt, model, step


def run_case(row: TrainRow, o: TrainBenchOptions, note) -> TrainRow:
    """Measure one case in place (halving its batch on out-of-memory) and return it."""
    from hymba.bench import free_memory, peak_gib, reset_peak, run_halving, timed
    from hymba.train import trainer

    def attempt(batch: int) -> dict[str, Any]:
        cfg, rt, model, step = training_step(row, o, batch)
        n_targets = batch * row.seq_len
        reset_peak(rt.device)
        for _ in range(o.warmup_steps):
            step()
        with timed(rt.device) as seconds:
            for _ in range(o.steps):
                loss, _ = step()
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        adapter_params = trained if row.lora_r else None
        return dict(seconds=seconds[0], peak_gib=peak_gib(rt.device), loss=loss.item() / n_targets,
                    params=model.num_parameters(), trained=trained,
                    peak=trainer.device_peak_flops(cfg, rt.device),
                    flops_per_row=trainer.flops_per_row(model.config, row.seq_len, adapter_params))

    label = (f"{row.model} seq {row.seq_len}{' checkpointed' if row.activation_checkpointing else ''}"
             f"{f' LoRA r{row.lora_r}' if row.lora_r else ''}")
    ran, result = run_halving(attempt, row.batch, o.device, note, label)
    free_memory(o.device)
    row.batch_ran = ran
    if ran is None:
        return row
    row.steps = o.steps
    row.step_ms = result["seconds"] / o.steps * 1e3
    row.tokens_per_s = ran * row.seq_len * o.steps / result["seconds"]
    row.flops_per_token = result["flops_per_row"] / row.seq_len
    if result["peak"]:
        row.mfu = row.flops_per_token * row.tokens_per_s / result["peak"]
    row.peak_gib, row.loss = result["peak_gib"], result["loss"]
    row.params, row.trained_params = result["params"], result["trained"]
    return row


# ---------------------------------------------------------------------------------------------- report
COLUMNS = ["model", "seq", "batch", "act. ckpt", "LoRA", "tokens/s", "MFU", "step ms", "peak GiB"]


def table_lines(rows: list[TrainRow]) -> list[str]:
    """The rows as a Markdown table (pasteable into docs/)."""
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] * 5 + ["---:"] * 4) + "|"]
    for r in rows:
        batch = str(r.batch) if r.batch_ran == r.batch else f"{r.batch}→{r.batch_ran or 'OOM'}"
        cells = [r.model, str(r.seq_len), batch, "yes" if r.activation_checkpointing else "no",
                 f"r{r.lora_r}" if r.lora_r else "-", fmt(r.tokens_per_s, ",.0f"),
                 fmt(r.mfu, ".1%"), fmt(r.step_ms, ",.0f"), fmt(r.peak_gib, ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report(rows: list[TrainRow], o: TrainBenchOptions, notes: list[str]) -> dict[str, Any]:
    import torch

    from hymba.bench import device_name

    precision = "float32"
    if o.device.type == "cuda":
        stream = "float32" if o.residual_dtype in ("float32", "fp32") else "bf16"
        precision = f"bf16 autocast, float32 master weights, fused AdamW, a {stream} residual stream"
    return dict(device=device_name(o.device), device_type=o.device.type, torch_version=torch.__version__,
                precision=precision, steps=o.steps, warmup_steps=o.warmup_steps, tokens_per_step=o.tokens_per_step,
                compile=o.compile, residual_dtype=o.residual_dtype, mfu_formula=MFU_FORMULA, notes=notes,
                rows=[asdict(r) for r in rows])


def run_bench_train(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from hymba.bench import _int_list, write_json_atomic

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HymbaError(f"--device {args.device} asked for, but PyTorch sees no CUDA device; use --device cpu")
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    o = TrainBenchOptions(
        models=[m.strip() for m in (args.models or defaults["models"]).split(",") if m.strip()],
        seqs=_int_list(args.seqs or defaults["seqs"], "seqs"),
        tokens_per_step=args.tokens_per_step or defaults["tokens_per_step"], checkpointing=checkpointing,
        lora_r=defaults["lora_r"] if args.lora_r is None else args.lora_r,
        steps=args.steps or defaults["steps"],
        warmup_steps=defaults["warmup_steps"] if args.warmup_steps is None else args.warmup_steps,
        device=device, compile=args.compile, residual_dtype=args.residual_dtype, peak_flops=args.peak_flops,
        seed=args.seed)
    for row in o.cases():
        train_config(row, o)  # an unknown model fails here, before anything runs
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        tqdm.write(f"note: {text}", file=sys.stderr)

    rows: list[TrainRow] = []
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # toy shapes: intra-op threads cost more than they save (as in `hymba bench`)
    try:
        for row in tqdm(o.cases(), desc="bench train", unit="case", file=sys.stderr, dynamic_ncols=True):
            rows.append(run_case(row, o, note))
            tqdm.write(table_lines(rows)[-1], file=sys.stderr)
            if args.json:  # rewritten after every case: a run that is stopped keeps its finished rows
                write_json_atomic(Path(args.json), report(rows, o, notes))
    finally:
        torch.set_num_threads(threads)
    data = report(rows, o, notes)
    print(f"hymba bench train on {data['device']}, torch {data['torch_version']}, {data['precision']}; "
          f"{o.warmup_steps} warm-up + {o.steps} timed steps per case, random tokens")
    print("\n".join(table_lines(rows)))
    print(MFU_FORMULA)
    if args.json:
        print(f"wrote {args.json}")
    return 0


def add_parser(subparsers) -> None:
    """Register `hymba bench train` (under `hymba bench`, whose own options keep measuring inference)."""
    parser = subparsers.add_parser(
        "train", help="training tokens/s, MFU and peak memory of `hymba train`'s step (random tokens)",
        description="Time `hymba train`'s optimizer step on random tokens: tokens/s, MFU and peak memory for "
                    "Hymba-1.5B at 2,048 and 8,192 tokens per row with and without activation checkpointing, the "
                    "default-small model, and LoRA. Without CUDA it runs the tiny shape on the CPU. " + MFU_FORMULA)
    parser.add_argument("--models", help="comma-separated presets or packaged train configs (default on GPU: "
                        f"{GPU_DEFAULTS['models']}; on CPU: {CPU_DEFAULTS['models']})")
    parser.add_argument("--seqs", help="tokens per row (default 2048,8192 on GPU, 32,64 on CPU)")
    parser.add_argument("--tokens-per-step", type=int,
                        help="rows per step = this / seq, halved on out-of-memory (default 16384 on GPU, 128 on CPU)")
    parser.add_argument("--checkpointing", choices=["off", "on", "both"], default="both",
                        help="activation checkpointing in the cases (default both)")
    parser.add_argument("--lora-r", type=int, help="rank of the LoRA case on the first model at the first length; "
                        "0 leaves it out (default 16 on GPU, 4 on CPU)")
    parser.add_argument("--steps", type=int, help="timed steps per case (default 10 on GPU, 2 on CPU)")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps first (default 3 on GPU, 1 on CPU)")
    parser.add_argument("--compile", action="store_true", help="as `hymba train --compile`")
    parser.add_argument("--residual-dtype", choices=["auto", "float32", "bf16"], default="auto",
                        help="as `hymba train --residual-dtype`: the residual stream's dtype under bf16 autocast "
                        "(auto: bf16)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--peak-flops", type=float, help="the device's peak FLOP/s for MFU (default: by GPU name)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and tokens")
    parser.add_argument("--json", metavar="PATH", help="write the rows, device, versions and MFU formula as JSON")
    parser.set_defaults(func=run_bench_train)
