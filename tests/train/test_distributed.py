"""Data-parallel training (DDP and FSDP2) on 2 CPU processes (gloo) equals one process on the same global batch.

FSDP2 shards every decoder layer as its own unit, so the K,V a producer layer hands to the reusing layers of its
group cross unit boundaries - also when each layer is recomputed in backward (activation checkpointing).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_trainer import VOCAB, tiny_config, tiny_model, write_tokens
from torch.distributed.fsdp import FSDPModule

from hymba.model import HymbaForCausalLM
from hymba.train import trainer
from hymba.train.trainer import Runtime

WORLD = 2
ROWS = 2  # per process and micro-step
T = 16
STEPS = 4
MODES = {"ddp": dict(distributed="ddp"), "fsdp": dict(distributed="fsdp"),
         "fsdp-checkpointing": dict(distributed="fsdp", activation_checkpointing=True)}


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with unequal target counts, so the per-token loss normalisation across processes is exercised."""
    seq = torch.randint(0, VOCAB, (WORLD * ROWS, T + 1), generator=torch.Generator().manual_seed(5))
    x, y = seq[:, :-1], seq[:, 1:].clone()
    y[0, :12] = -100
    y[3, 4:] = -100
    return x, y


def gradients(model: torch.nn.Module, rt: Runtime, micro_steps: int) -> dict[str, torch.Tensor]:
    batch = global_batch()
    micro_batches = [trainer.rows_for(batch, m, rt, ROWS) for m in range(micro_steps)]
    trainer.accumulate_gradients(model, micro_batches, trainer.count_targets(batch[1]), rt)
    inner = getattr(model, "module", model)
    grads = {}
    for name, p in inner.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # FSDP2 holds DTensor shards
        grads[name] = grad.detach().clone()
    return grads


def worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    rt = Runtime(rank, WORLD, torch.device("cpu"), None)
    tmp = Path(tmp)
    for mode, settings in MODES.items():
        cfg = loop_config(tmp, mode, **settings)
        model = tiny_model()
        model.model.gradient_checkpointing = cfg.activation_checkpointing
        model = trainer.wrap_model(model, cfg, rt)
        if cfg.distributed == "fsdp":
            assert all(isinstance(layer, FSDPModule) for layer in model.model.layers)  # one unit per layer
        grads = gradients(model, rt, micro_steps=1)
        if rank == 0:
            torch.save(grads, tmp / f"{mode}-grads.pt")
        trainer.train(cfg)  # the whole loop: data split, loss logging, evaluation, checkpoints (FSDP: gathered)
    dist.destroy_process_group()


def loop_config(tmp: Path, name: str, **overrides) -> trainer.TrainConfig:
    return tiny_config(tmp / "tokens", tmp / name, batch_size=ROWS, block_size=T, max_steps=STEPS, log_interval=1,
                       eval_interval=STEPS, eval_iters=1, checkpoint_interval=STEPS, **overrides)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path: Path):
    tokens = np.random.default_rng(1).integers(0, VOCAB, 2000)
    write_tokens(tmp_path / "tokens", tokens[:1800], tokens[1800:])
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    # One process, the same global batch as WORLD micro-steps of gradient accumulation.
    alone = Runtime(0, 1, torch.device("cpu"), None)
    expected = gradients(tiny_model(), alone, micro_steps=WORLD)
    single = trainer.train(loop_config(tmp_path, "one", grad_accum=WORLD))
    last = f"step-{STEPS:07d}"
    final_single = HymbaForCausalLM.from_pretrained(tmp_path / "one" / last, device="cpu").state_dict()
    for mode in MODES:
        grads = torch.load(tmp_path / f"{mode}-grads.pt")
        for name in expected:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-6, msg=f"{mode} {name}")
        logged = [json.loads(line) for line in (tmp_path / mode / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in logged] == [r["step"] for r in single] == list(range(1, STEPS + 1))
        for a, b in zip(single, logged, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=0, abs=1e-6), (mode, a["step"])
        assert single[-1]["val_loss"] == pytest.approx(logged[-1]["val_loss"], rel=0, abs=1e-6)
        # The checkpoint (under FSDP gathered from the shards) is a plain one-device model.
        final = HymbaForCausalLM.from_pretrained(tmp_path / mode / last, device="cpu").state_dict()
        assert final.keys() == final_single.keys()
        for name in final_single:
            torch.testing.assert_close(final[name], final_single[name], rtol=0, atol=1e-6, msg=f"{mode} {name}")


@pytest.mark.slow
def test_scaling_benchmark_on_cpu(tmp_path: Path):
    """benchmarks/train_scaling.py's CPU mode (gloo): one process, then DDP and FSDP2 under torchrun; the table,
    the JSON, equal losses, checkpoints that load on one device - and removed afterwards."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "train_scaling.py"
    out = tmp_path / "scaling"
    done = subprocess.run([sys.executable, str(script), "--device", "cpu", "--gpus", str(WORLD), "--model", "tiny",
                           "--batch-size", "2", "--block-size", "32", "--steps", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tok/s/device" in done.stdout and "scaling" in done.stdout
    result = json.loads((out / "train_scaling.json").read_text())
    runs = {s["run"]: s for s in result["summary"]}
    assert runs.keys() == {"one", "ddp", "fsdp"}
    for mode in ("ddp", "fsdp"):
        assert runs[mode]["processes"] == WORLD and runs[mode]["losses_match"]
        assert runs[mode]["final_weights_max_rel_diff"] < 1e-4 and runs[mode]["scaling_efficiency"] > 0
        assert len(result["losses"][mode]) == 2
    assert not list(out.glob("*/step-*"))
