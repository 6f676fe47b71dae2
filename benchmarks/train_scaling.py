"""Data-parallel training on N GPUs against one: the same global batch under DDP and FSDP2, step by step.

    python benchmarks/train_scaling.py --gpus 2                       # hymba-1.5b, 20 steps, bf16 autocast
    python benchmarks/train_scaling.py --gpus 8 --steps 10 --data-dir data/tokens --activation-checkpointing
    python benchmarks/train_scaling.py --device cpu --gpus 2 --model tiny --block-size 64 --steps 4   # gloo, no GPU

Runs `hymba train` three times on one global batch of gpus x batch_size rows per step: in one process with `gpus`
micro-steps of gradient accumulation (the reference), then `torchrun --nproc_per_node gpus -m hymba.cli train`
with DDP and with FSDP2 (one unit per decoder layer). Prints each step's loss and its relative difference from the
reference, then per run: tokens/s per device (median over the steps after the first few), scaling efficiency (that
over the reference's), and rank 0's peak allocated memory. The FSDP2 and DDP runs' final checkpoints are loaded
with `from_pretrained` on one device (the CPU) and compared with the reference's weights. Everything goes into a
JSON file. Any other flag is passed to every `hymba train` (e.g. `--lr 1e-4`, `--compile`).

Data: `--data-dir` (token files from `hymba data tokenize`), else the repository's own Markdown (README.md, docs/)
tokenized into OUT/tokens: real English text that needs no download; small, so the loss falls as it is learnt.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from hymba.model import HymbaForCausalLM
from hymba.train.data import tokenize

REPO = Path(__file__).resolve().parent.parent
# bf16 keeps 8 significant bits (relative rounding 2^-8 = 0.4%); float32 runs on the CPU agree to rounding.
LOSS_RTOL = {"cuda": 1e-2, "cpu": 1e-6}


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2, help="processes of the DDP and FSDP2 runs (GPUs on CUDA)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--model", default="hymba-1.5b", help="a HymbaConfig preset")
    parser.add_argument("--model-overrides", type=json.loads, default={}, help="JSON object of HymbaConfig keys")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per device and micro-step")
    parser.add_argument("--block-size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--data-dir", help="token files; default: the repository's Markdown, tokenized")
    parser.add_argument("--out", default="out/train-scaling", help="runs, tokens and the JSON go here")
    parser.add_argument("--json", help="result file (default: OUT/train_scaling.json)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep the runs' final checkpoints")
    return parser.parse_known_args()


def write_config(args: argparse.Namespace, data_dir: Path, path: Path) -> None:
    """The TrainConfig every run shares; only the process count, gradient accumulation and wrapping differ."""
    warmup = max(1, args.steps // 4)  # the learning rate is up early, so the runs' weights move apart if they can
    config = {"model": args.model, "model_overrides": args.model_overrides, "data_dir": str(data_dir),
              "batch_size": args.batch_size, "block_size": args.block_size, "grad_accum": 1, "lr": args.lr,
              "min_lr": args.lr / 10, "warmup_steps": warmup, "schedule": "wsd", "max_steps": args.steps,
              "log_interval": 1, "eval_interval": args.steps, "eval_iters": 1, "checkpoint_interval": args.steps,
              "keep_checkpoints": 1, "device": args.device, "dtype": "auto" if args.device == "cuda" else "float32",
              "activation_checkpointing": args.activation_checkpointing, "progress": False}
    path.write_text(json.dumps(config, indent=2) + "\n")


def run_training(name: str, processes: int, config: Path, out: Path, extra: list[str]) -> list[dict]:
    """One `hymba train` (under torchrun when `processes` > 1); returns its log records."""
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    train = ["-m", "hymba.cli", "train", "--config", str(config), "--out", str(run_dir), *extra]
    if processes == 1:
        command = [sys.executable, *train]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   *train]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # torchrun's default, for all
    print(f"$ {' '.join(command)}", flush=True)
    subprocess.run(command, check=True, env=env)
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def latest_checkpoint(run_dir: Path) -> Path:
    return run_dir / (run_dir / "latest").read_text().strip()


def weight_difference(checkpoint: Path, reference: dict[str, torch.Tensor]) -> float:
    """Largest |w - w_ref| over all weights of a checkpoint loaded on one device, relative to max |w_ref|."""
    weights = HymbaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, device="cpu").state_dict()
    if weights.keys() != reference.keys():
        raise SystemExit(f"{checkpoint} holds other tensors than the reference")
    return max(((weights[k] - reference[k]).abs().max() / reference[k].abs().max().clamp(min=1e-12)).item()
               for k in reference)


def summarize(name: str, records: list[dict], processes: int, reference: dict | None) -> dict:
    skip = min(5, len(records) // 2)  # allocator, kernel autotuning and caches warm up in the first steps
    per_device = statistics.median(r["tokens_per_s"] for r in records[skip:]) / processes
    peak = max((r["peak_memory_gib"] for r in records if r.get("peak_memory_gib") is not None), default=None)
    summary = {"run": name, "processes": processes, "tokens_per_s_per_device": per_device, "peak_memory_gib": peak}
    if reference is not None:
        summary["scaling_efficiency"] = per_device / reference["tokens_per_s_per_device"]
    return summary


def main() -> None:
    args, extra = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir) if args.data_dir else out / "tokens"
    if not args.data_dir:
        tokenize([REPO / "README.md", REPO / "docs"], data_dir, val_fraction=0, progress=False)
    config = out / "train_config.json"
    write_config(args, data_dir, config)

    n, rtol = args.gpus, LOSS_RTOL[args.device]
    runs, summaries = {}, {}
    for name, processes, flags in (("one", 1, ["--grad-accum", str(n)]), ("ddp", n, ["--distributed", "ddp"]),
                                   ("fsdp", n, ["--distributed", "fsdp"])):
        records = runs[name] = run_training(name, processes, config, out, [*flags, *extra])
        summary = summaries[name] = summarize(name, records, processes, summaries.get("one"))
        if name != "one":
            summary["loss_rel_diff"] = [abs(r["loss"] - ref["loss"]) / abs(ref["loss"])
                                        for r, ref in zip(records, runs["one"], strict=True)]
            summary["losses_match"] = max(summary["loss_rel_diff"]) <= rtol
        print(f"{name}: loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}, "
              f"{summary['tokens_per_s_per_device']:,.0f} tok/s per device", flush=True)  # in case a later run fails

    reference = HymbaForCausalLM.from_pretrained(latest_checkpoint(out / "one"), dtype=torch.float32,
                                                 device="cpu").state_dict()
    for mode in ("ddp", "fsdp"):
        summaries[mode]["final_weights_max_rel_diff"] = weight_difference(latest_checkpoint(out / mode), reference)
    if not args.keep_checkpoints:  # 18 GB a run for hymba-1.5b (float32 weights and Adam state)
        for name in runs:
            for checkpoint in (out / name).glob("step-*"):
                shutil.rmtree(checkpoint)
            (out / name / "latest").unlink()

    print(f"\nlosses (relative difference from one process, tolerance {rtol:g})")
    print(f"{'step':>4} {'one':>10} {'ddp':>10} {'fsdp':>10} {'ddp diff':>9} {'fsdp diff':>9}")
    for i, (ref, ddp, fsdp) in enumerate(zip(runs["one"], runs["ddp"], runs["fsdp"], strict=True)):
        print(f"{ref['step']:>4} {ref['loss']:>10.5f} {ddp['loss']:>10.5f} {fsdp['loss']:>10.5f} "
              f"{summaries['ddp']['loss_rel_diff'][i]:>9.1e} {summaries['fsdp']['loss_rel_diff'][i]:>9.1e}")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\n{n} x {device_name}, {args.model}, {n * args.batch_size} x {args.block_size} tokens per step")
    print(f"{'run':<5} {'procs':>5} {'tok/s/device':>13} {'scaling':>8} {'peak GiB':>9} {'losses':>7} {'weights':>9}")
    for s in summaries.values():
        scaling = f"{s['scaling_efficiency']:.1%}" if "scaling_efficiency" in s else "-"
        peak = f"{s['peak_memory_gib']:.1f}" if s["peak_memory_gib"] is not None else "n/a"
        match = ("ok" if s["losses_match"] else "DIFFER") if "losses_match" in s else "-"
        weights = f"{s['final_weights_max_rel_diff']:.1e}" if "final_weights_max_rel_diff" in s else "-"
        print(f"{s['run']:<5} {s['processes']:>5} {s['tokens_per_s_per_device']:>13,.0f} {scaling:>8} {peak:>9} "
              f"{match:>7} {weights:>9}")

    result = {"device": device_name, "processes": n, "torch": torch.__version__, "args": vars(args),
              "extra_train_flags": extra, "loss_rtol": rtol, "summary": list(summaries.values()),
              "losses": {name: [r["loss"] for r in records] for name, records in runs.items()}, "logs": runs}
    json_path = Path(args.json) if args.json else out / "train_scaling.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {json_path}")
    if not all(s.get("losses_match", True) for s in summaries.values()):
        raise SystemExit("the multi-process losses differ from the one-process run's beyond the tolerance")


if __name__ == "__main__":
    main()
