"""The training loop: optimizer groups, schedules, gradients, loss falling, MFU accounting, exact resume, CLI."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo
from conftest import rel_err
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from hymba.config import HymbaConfig
from hymba.errors import HymbaError
from hymba.model import HymbaForCausalLM
from hymba.train import trainer
from hymba.train.data import FORMAT, META_FILE
from hymba.train.optim import decayed_parameter_names, lr_at
from hymba.train.trainer import Runtime, TrainConfig

VOCAB = 64
CPU = Runtime(rank=0, world_size=1, device=torch.device("cpu"), amp_dtype=None)


def write_tokens(directory: Path, train: np.ndarray, val: np.ndarray, vocab: int = VOCAB) -> Path:
    """A token folder in hymba.train.data's format, with synthetic ids (no tokenizer needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, ids in (("train", train), ("val", val)):
        ids.astype(np.uint16).tofile(directory / f"{split}.bin")
    meta = {"format": FORMAT, "dtype": "uint16", "vocab_size": vocab, "bos_id": 1, "eos_id": 2,
            "train_tokens": len(train), "val_tokens": len(val)}
    (directory / META_FILE).write_text(json.dumps(meta))
    return directory


@pytest.fixture
def cycle_data(tmp_path: Path) -> Path:
    """A fixed permutation of the vocabulary, repeated: each token determines the next, so loss can fall to ~0."""
    cycle = np.random.default_rng(0).permutation(VOCAB)
    return write_tokens(tmp_path / "tokens", np.tile(cycle, 60), np.tile(cycle, 4))


def tiny_config(data_dir: Path, out_dir: Path, **overrides) -> TrainConfig:
    settings = dict(data_dir=str(data_dir), out_dir=str(out_dir), progress=False, model_overrides={"vocab_size": VOCAB},
                    batch_size=4, block_size=32)
    return TrainConfig.from_json("tiny-cpu", **{**settings, **overrides})


def tiny_model(seed: int = 0, **overrides) -> HymbaForCausalLM:
    model = HymbaForCausalLM(HymbaConfig.preset("tiny", vocab_size=VOCAB, **overrides))
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer and schedule


def test_weight_decay_only_on_weight_matrices():
    model = tiny_model()
    decayed = set(decayed_parameter_names(model))
    names = {name for name, _ in model.named_parameters()}
    assert "model.layers.0.mamba.in_proj.weight" in decayed
    assert "model.layers.0.moe.experts.0.gate_proj.weight" in decayed
    assert "model.embed_tokens.weight" in decayed
    for never in ("model.memory_tokens", "model.layers.0.mamba.A_log.0", "model.layers.0.mamba.D.0",
                  "model.layers.0.mamba.dt_proj.0.bias", "model.layers.0.mamba.conv1d.bias",
                  "model.layers.0.mamba.pre_avg_layernorm1.weight", "model.final_layernorm.weight"):
        assert never in names and never not in decayed
    assert all(dict(model.named_parameters())[n].dim() >= 2 for n in decayed)


def test_schedules():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=100)
    assert lr_at(0, **kw, schedule="wsd") == pytest.approx(0.1)
    assert lr_at(9, **kw, schedule="wsd") == 1.0
    assert lr_at(79, **kw, schedule="wsd", decay_fraction=0.2) == 1.0  # stable until the last 20 steps
    assert lr_at(80, **kw, schedule="wsd", decay_fraction=0.2) < 1.0
    assert lr_at(99, **kw, schedule="wsd", decay_fraction=0.2) == pytest.approx(0.1)
    assert lr_at(10, **kw, schedule="cosine") == 1.0
    assert lr_at(55, **kw, schedule="cosine") == pytest.approx(0.55)
    assert lr_at(100, **kw, schedule="cosine") == 0.1
    lrs = [lr_at(s, **kw, schedule="cosine") for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


# ---------------------------------------------------------------------------------------------------------------------
# Gradients


def micro_batch(rows: int = 2, T: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, VOCAB, (rows, T + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def gradients(model: HymbaForCausalLM, micro_batches, n_targets: int) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    trainer.accumulate_gradients(model, micro_batches, n_targets, CPU)
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_every_parameter_learns():
    """Meta tokens, both fusion norms (beta1, beta2), A_log and D included, in every layer."""
    grads = gradients(tiny_model(), [micro_batch()], 2 * 24)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, f"{name} receives no gradient"
    for key in ("memory_tokens", "pre_avg_layernorm1", "pre_avg_layernorm2", "A_log", "D.0"):
        assert any(key in name for name in grads), key


def test_micro_batches_and_unequal_targets_give_the_global_mean_gradient():
    """Gradient accumulation over micro-batches with different target counts == one batch of all rows."""
    model = tiny_model()
    x, y = micro_batch(rows=4)
    y = y.clone()
    y[0, :20] = -100  # SFT-like: rows with few targets must weigh by their tokens, not as whole rows
    y[3, 5:] = -100
    n = int((y != -100).sum())
    whole = gradients(model, [(x, y)], n)
    split = gradients(model, [(x[:1], y[:1]), (x[1:], y[1:])], n)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-7)


def test_residual_dtype_reaches_the_model_and_trains_under_autocast(tmp_path):
    """`residual_dtype` bf16 (and auto, the default) sets the model's switch, float32 clears it; a bf16-autocast step
    then trains through the bf16 stream and gives gradients within bf16 rounding of the float32 stream's (CPU
    autocast stands in for the GPU's)."""
    def switch(**overrides):
        cfg = tiny_config(tmp_path / "tokens", tmp_path / "out", **overrides)
        return trainer.build_model(cfg, torch.device("cpu")).model.residual_in_autocast_dtype

    assert switch() and switch(residual_dtype="auto", dtype="float32")  # no autocast there: float32 anyway
    assert not switch(residual_dtype="float32")
    model = trainer.build_model(tiny_config(tmp_path / "tokens", tmp_path / "out", residual_dtype="bf16",
                                            dtype="bf16"), torch.device("cpu"))
    assert model.model.residual_in_autocast_dtype
    amp = Runtime(rank=0, world_size=1, device=torch.device("cpu"), amp_dtype=torch.bfloat16)
    batch = [micro_batch()]
    grads = {}
    for bf16_stream in (False, True):
        model.model.residual_in_autocast_dtype = bf16_stream
        model.zero_grad(set_to_none=True)
        trainer.accumulate_gradients(model, batch, 48, amp)
        grads[bf16_stream] = {name: p.grad.clone() for name, p in model.named_parameters()}
    for name in grads[False]:
        assert rel_err(grads[True][name], grads[False][name]) < 5e-2, name


def test_activation_checkpointing_keeps_gradients():
    model = tiny_model()
    batch = [micro_batch()]
    plain = gradients(model, batch, 48)
    model.model.gradient_checkpointing = True
    checkpointed = gradients(model, batch, 48)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_compiled_layers_give_eager_gradients_and_compile_once():
    """`--compile` (each layer compiled) equals eager, and a second step runs the graphs of the first.

    The backend runs dynamo, AOT autograd, the decompositions and the forward/backward partition that inductor
    gets, without inductor's code generation (minutes of C++ compilation on a CPU); float32, so the tolerance is
    a few ulps of the gradients' norm."""
    # One layer of each kind: global, windowed producer, windowed KV reuser.
    model = tiny_model(num_hidden_layers=3, global_attn_idx=[0], kv_reuse_group=[[1, 2]])
    batch = [micro_batch()]
    eager = gradients(model, batch, 48)
    torch._dynamo.reset()
    try:
        trainer.compile_layers(model, backend="aot_eager_decomp_partition")
        compiled = gradients(model, batch, 48)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 3  # every layer ran compiled
        again = gradients(model, batch, 48)
        assert counters["stats"]["unique_graphs"] == graphs  # no recompilation at the next step
    finally:
        torch._dynamo.reset()
    for name in eager:
        assert rel_err(compiled[name], eager[name]) < 1e-5, name
        assert torch.equal(again[name], compiled[name]), name


# ---------------------------------------------------------------------------------------------------------------------
# The loop


def test_loss_falls_on_repetitive_text(cycle_data: Path, tmp_path: Path):
    cfg = tiny_config(cycle_data, tmp_path / "out", max_steps=60, log_interval=10, eval_interval=60,
                      checkpoint_interval=60)
    records = trainer.train(cfg)
    assert records[0]["loss"] > 3.5  # ~ln(64) at the start
    assert records[-1]["loss"] < 0.5 and records[-1]["val_loss"] < 0.5
    assert records[-1]["val_ppl"] == pytest.approx(math.exp(records[-1]["val_loss"]))
    logged = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [10, 20, 30, 40, 50, 60]
    assert all(r["mfu"] is None and r["peak_memory_gib"] is None and r["tokens_per_s"] > 0
               for r in logged)  # no MFU or CUDA memory on CPU


def test_resume_reproduces_the_uninterrupted_run_exactly(cycle_data: Path, tmp_path: Path):
    kw = dict(max_steps=6, log_interval=1, eval_interval=3, checkpoint_interval=3, warmup_steps=2)
    full = trainer.train(tiny_config(cycle_data, tmp_path / "full", **kw))

    # The run died after logging step 6 but before its last checkpoint: step 3 is the latest on disk.
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "step-0000003", resumed_dir / "step-0000003")
    (resumed_dir / "latest").write_text("step-0000003\n")
    shutil.copy(tmp_path / "full" / "log.jsonl", resumed_dir / "log.jsonl")
    resumed = trainer.train(tiny_config(cycle_data, resumed_dir, **kw), resume=True)

    assert [r["step"] for r in resumed] == [4, 5, 6]
    for a, b in zip(full[3:], resumed):
        for key in ("loss", "lr", "grad_norm", "val_loss"):
            assert a.get(key) == b.get(key), key
    logged = [json.loads(line)["step"] for line in (resumed_dir / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]
    final_full = load_file(tmp_path / "full" / "step-0000006" / "model.safetensors")
    final_resumed = load_file(resumed_dir / "step-0000006" / "model.safetensors")
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)


def test_checkpoints_load_with_from_pretrained(cycle_data: Path, tmp_path: Path):
    from hymba.tokenizer import HymbaTokenizer

    out = tmp_path / "out"
    trainer.train(tiny_config(cycle_data, out, max_steps=3, checkpoint_interval=1, keep_checkpoints=2))
    assert sorted(p.name for p in out.glob("step-*")) == ["step-0000002", "step-0000003"]
    assert (out / "latest").read_text().strip() == "step-0000003"
    assert not list(out.glob(".*tmp"))
    checkpoint = out / "step-0000003"
    model = HymbaForCausalLM.from_pretrained(checkpoint)
    assert model.config.vocab_size == VOCAB
    assert HymbaTokenizer.from_pretrained(checkpoint).eos_token_id == 2
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    assert state["step"] == 3 and set(state["rng"]) >= {"python", "numpy", "torch"}
    assert state["sampler"]["step"] == 3


def test_flops_per_row_matches_hand_count():
    """All-global, no meta tokens: 6 N T + 6 (d_qk + d_v) heads layers T(T+1)/2 (nanoGPT's formula, causal)."""
    config = HymbaConfig.preset("tiny", num_memory_tokens=0, sliding_window=None, kv_reuse_group=None)
    T = 40
    n = config.num_parameters()
    attention = 6 * (config.qk_head_dim + config.value_head_dim) * config.num_attention_heads * 7 * T * (T + 1) / 2
    assert trainer.flops_per_row(config, T) == pytest.approx(6 * n * T + attention)
    windowed = HymbaConfig.preset("tiny")  # windows and meta tokens: more rows, fewer visible keys per row
    assert trainer.flops_per_row(windowed, T) > 6 * windowed.num_parameters() * T


def test_default_small_config():
    cfg = TrainConfig.from_json("default-small")
    config = HymbaConfig.preset(cfg.model, **cfg.model_overrides)
    assert 20e6 <= config.num_parameters() <= 60e6
    assert config.num_memory_tokens > 0 and len(config.global_attn_idx) == 3 and config.kv_reuse_group
    assert config.vocab_size == 32001


def test_cli_overrides(tmp_path: Path):
    parser = argparse.ArgumentParser()
    trainer.add_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "--config", "tiny-cpu", "--max-steps", "7", "--out", str(tmp_path),
                              "--lr", "0.01", "--betas", "[0.9, 0.99]", "--activation-checkpointing", "--resume"])
    assert args.func is trainer.run and args.resume is True
    names = {f for f in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig.from_json(args.config, **{k: v for k, v in vars(args).items() if k in names and v is not None})
    assert (cfg.max_steps, cfg.out_dir, cfg.lr, cfg.betas, cfg.activation_checkpointing) == (
        7, str(tmp_path), 0.01, (0.9, 0.99), True)
    with pytest.raises(Exception, match="unknown train config keys"):
        TrainConfig.from_json("tiny-cpu", not_a_key=1)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input and damaged files: one HymbaError, nothing written or lost


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path]:
    """(token folder, out_dir) of a 2-step run with a checkpoint at each step, to copy and resume."""
    root = tmp_path_factory.mktemp("run")
    cycle = np.random.default_rng(0).permutation(VOCAB)
    data = write_tokens(root / "tokens", np.tile(cycle, 20), np.tile(cycle, 2))
    trainer.train(tiny_config(data, root / "out", max_steps=2, log_interval=1, checkpoint_interval=1))
    return data, root / "out"


def copy_of(finished_run, tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    """A copy of the finished run: (data, out_dir, every file's bytes, to check nothing changed)."""
    data, out = finished_run
    shutil.copytree(out, tmp_path / "out")
    return data, tmp_path / "out", snapshot(tmp_path / "out")


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("overrides, message", [
    (dict(model_overrides={"vocab_size": VOCAB, "hidden_size": 128, "v_head_dim": 64}), "hidden_size 64 -> 128"),
    (dict(model="llama-3.2-3b", model_overrides={}), "hidden_size 64 -> 3072"),
])
def test_resume_refuses_another_model(finished_run, tmp_path, overrides, message):
    data, out, before = copy_of(finished_run, tmp_path)
    with pytest.raises(HymbaError, match="holds another model") as info:
        trainer.train(tiny_config(data, out, max_steps=3, **overrides), resume=True)
    assert message in str(info.value)
    assert snapshot(out) == before


def test_resume_says_which_settings_apply(finished_run, tmp_path, capsys):
    data, out, _ = copy_of(finished_run, tmp_path)
    records = trainer.train(tiny_config(data, out, max_steps=3, lr=0.01, seed=5, log_interval=1), resume=True)
    printed = capsys.readouterr().out
    assert "changed settings that apply from step 2: lr 0.003 -> 0.01, max_steps 2 -> 3" in printed
    assert "not applied" in printed and "seed 1337 -> 5" in printed
    cfg = tiny_config(data, out, max_steps=3, lr=0.01)
    assert [r["step"] for r in records] == [3] and records[0]["lr"] == lr_at(
        2, lr=0.01, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, max_steps=3, schedule=cfg.schedule,
        decay_fraction=cfg.decay_fraction)


def test_resume_past_max_steps_is_an_error_and_at_it_says_so(finished_run, tmp_path, capsys):
    data, out, before = copy_of(finished_run, tmp_path)
    with pytest.raises(HymbaError, match="at step 2, past max_steps 1"):
        trainer.train(tiny_config(data, out, max_steps=1, log_interval=1, checkpoint_interval=1), resume=True)
    assert snapshot(out) == before
    assert trainer.train(tiny_config(data, out, max_steps=2, log_interval=1, checkpoint_interval=1), resume=True) == []
    assert "already at max_steps 2, nothing to train" in capsys.readouterr().out


def test_resume_drops_a_half_written_log_line(finished_run, tmp_path):
    data, out, _ = copy_of(finished_run, tmp_path)
    with (out / "log.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # what a kill -9 during the write leaves
    trainer.train(tiny_config(data, out, max_steps=3, log_interval=1, checkpoint_interval=1), resume=True)
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("damage", [lambda b: b[:len(b) // 2], lambda b: b"", lambda b: b"\x80\x04K\x01."])
def test_damaged_trainer_state_is_one_line(finished_run, tmp_path, damage):
    data, out, _ = copy_of(finished_run, tmp_path)
    state = out / "step-0000002" / trainer.STATE_FILE
    state.write_bytes(damage(state.read_bytes()))
    before = snapshot(out)
    with pytest.raises(HymbaError, match="trainer_state.pt (is damaged|is not a trainer state)"):
        trainer.train(tiny_config(data, out, max_steps=3), resume=True)
    assert snapshot(out) == before


BAD_TRAIN_CONFIGS = {
    "misspelt model key": (dict(model_overrides={"hidden_sise": 3}), "did you mean 'hidden_size'"),
    "overrides not an object": (dict(model_overrides=[1]), "`model_overrides` must be a JSON object"),
    "one beta": (dict(betas=[0.9]), "`betas` must be two numbers in [0, 1)"),
    "betas above 1": (dict(betas=[2, 3]), "`betas` must be two numbers in [0, 1)"),
    "lr a string": (dict(lr="1e-3"), "`lr` must be a number"),
    "batch size a bool": (dict(batch_size=True), "`batch_size` must be an integer"),
    "residual dtype unknown": (dict(residual_dtype="half"), "`residual_dtype` is 'half'; use one of auto, float32"),
    "bf16 residual without autocast": (dict(residual_dtype="bf16", dtype="float32"), "needs bf16 autocast"),
}


@pytest.mark.parametrize("overrides, message", BAD_TRAIN_CONFIGS.values(), ids=BAD_TRAIN_CONFIGS.keys())
def test_bad_train_config_is_one_line(tmp_path, overrides, message):
    with pytest.raises(HymbaError) as info:
        tiny_config(tmp_path / "tokens", tmp_path / "out", **overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("overrides, message", [
    (dict(device="tpu"), "unknown device 'tpu'"),
    pytest.param(dict(device="cuda"), "no CUDA device", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="needs a machine without CUDA")),
    (dict(block_size=300), "block_size 300 + 8 meta tokens exceed the model's 256 positions"),
    (dict(model_overrides={"vocab_size": 40}), "train.bin holds token id 63 but the model has 40 embeddings"),
])
def test_what_cannot_run_fails_before_training(tmp_path, overrides, message):
    """Each failed (an allocation, an IndexError or a device assert) only once the run was under way."""
    cycle = np.random.default_rng(0).permutation(VOCAB)
    data = write_tokens(tmp_path / "tokens", np.tile(cycle, 20), np.tile(cycle, 2), vocab=32)  # meta.json is wrong
    with pytest.raises(HymbaError) as info:
        trainer.train(tiny_config(data, tmp_path / "out", max_steps=1, **overrides))
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()
