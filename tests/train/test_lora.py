"""LoRA through peft: only adapters train, checkpoints are peft adapters that resume exactly and reload through
peft, and the merged checkpoint equals base + adapters."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import rel_err
from safetensors.torch import load_file
from test_trainer import VOCAB, cycle_data, micro_batch, tiny_config, tiny_model  # noqa: F401  (cycle_data: fixture)

from hymba.errors import HymbaError
from hymba.model import HymbaForCausalLM
from hymba.train import trainer
from hymba.train.lora import DEFAULT_TARGETS, add_adapters

peft = pytest.importorskip("peft")

CPU = trainer.Runtime(rank=0, world_size=1, device=torch.device("cpu"), amp_dtype=None)


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    path = tmp_path / "base"
    tiny_model(seed=1).save_pretrained(str(path))
    return path


def lora_config(data: Path, out: Path, base: Path, **overrides) -> trainer.TrainConfig:
    settings = dict(init_from=str(base), lora_r=4, lora_dropout=0.0, lr=1e-2, warmup_steps=1)
    return tiny_config(data, out, **{**settings, **overrides})


def test_only_adapters_change(base_dir: Path):
    cfg = tiny_config(Path("unused"), Path("unused"), init_from=str(base_dir), lora_r=4)
    model = trainer.build_model(cfg, torch.device("cpu"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = trainer.make_optimizer(model, 1e-2, 0.1, (0.9, 0.95))
    for _ in range(2):
        trainer.accumulate_gradients(model, [micro_batch()], 48, CPU)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    adapters = {name for name, p in model.named_parameters() if p.requires_grad}
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    assert changed == adapters  # every adapter moved (B starts at zero, A gets gradient once B is not), nothing else
    targets = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in adapters}
    assert targets == set(DEFAULT_TARGETS)
    layers = {name.split(".layers.")[1].split(".")[0] for name in adapters}
    assert layers == {str(i) for i in range(model.config.num_hidden_layers)}


def test_lora_run_saves_peft_adapters_and_the_merged_model_equals_base_plus_adapters(
        cycle_data: Path, base_dir: Path, tmp_path: Path):  # noqa: F811
    out = tmp_path / "out"
    records = trainer.train(lora_config(cycle_data, out, base_dir, max_steps=4, log_interval=1, checkpoint_interval=2,
                                            merge=True))
    assert records[-1]["loss"] < records[0]["loss"]
    step = out / "step-0000004"
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"} <= {p.name for p in step.iterdir()}
    assert not (step / "model.safetensors").exists() and not list(out.glob(".*tmp"))
    adapter_config = json.loads((step / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8
    assert adapter_config["base_model_name_or_path"] == str(base_dir)
    assert all(".lora_A." in k or ".lora_B." in k for k in load_file(step / "adapter_model.safetensors"))

    # The adapters reload through peft onto the base; the merged checkpoint gives the same logits.
    adapted = peft.PeftModel.from_pretrained(HymbaForCausalLM.from_pretrained(base_dir), str(step)).eval()
    merged = HymbaForCausalLM.from_pretrained(out / "merged")
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        expected, got = adapted(ids).logits, merged(ids).logits
        plain = HymbaForCausalLM.from_pretrained(base_dir)(ids).logits
    assert rel_err(got, expected) < 1e-5
    assert rel_err(plain, expected) > 1e-3  # the adapters changed the model

    # Merging rewrote exactly the adapted weights.
    base, merged_state = load_file(base_dir / "model.safetensors"), load_file(out / "merged" / "model.safetensors")
    assert base.keys() == merged_state.keys()
    for name in base:
        adapted_weight = name.endswith(".weight") and name.rsplit(".", 2)[-2] in DEFAULT_TARGETS
        assert torch.equal(base[name], merged_state[name]) != adapted_weight, name


def test_lora_resume_reproduces_the_uninterrupted_run(cycle_data: Path, base_dir: Path, tmp_path: Path):  # noqa: F811
    kw = dict(max_steps=4, log_interval=1, eval_interval=2, checkpoint_interval=2, lora_dropout=0.1)
    full = trainer.train(lora_config(cycle_data, tmp_path / "full", base_dir, **kw))
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "step-0000002", resumed_dir / "step-0000002")
    (resumed_dir / "latest").write_text("step-0000002\n")
    resumed = trainer.train(lora_config(cycle_data, resumed_dir, base_dir, **kw), resume=True)
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        assert (a["loss"], a["grad_norm"], a.get("val_loss")) == (b["loss"], b["grad_norm"], b.get("val_loss"))
    final = [load_file(d / "step-0000004" / "adapter_model.safetensors") for d in (tmp_path / "full", resumed_dir)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_an_adapted_lm_head_trains_through_the_loss():
    """The loss runs a wrapped head as a module; reading its weight would leave the adapter without gradient."""
    model = add_adapters(tiny_model(), 4, 8, 0.0, ["lm_head"])
    x, y = micro_batch()
    model(x, shift_labels=y, return_logits=False).loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if "lm_head.lora_B" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_flops_of_a_lora_step_count_no_base_weight_gradients():
    config = tiny_model().config
    full, frozen = trainer.flops_per_row(config, 32), trainer.flops_per_row(config, 32, adapter_params=0)
    assert frozen < full and trainer.flops_per_row(config, 32, adapter_params=1000) > frozen


def test_lora_options(base_dir: Path, tmp_path: Path):
    parser = argparse.ArgumentParser()
    trainer.add_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "--config", "tiny-cpu", "--init-from", str(base_dir), "--lora-r", "16",
                              "--lora-alpha", "32", "--lora-dropout", "0.05", "--lora-targets", "in_proj,down_proj",
                              "--merge"])
    names = set(trainer.TrainConfig.__dataclass_fields__)
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    cfg = trainer.TrainConfig.from_json(args.config, **overrides)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.merge) == (
        16, 32.0, 0.05, ["in_proj", "down_proj"], True)
    for bad, message in ((dict(lora_r=4), "needs init_from"), (dict(merge=True), "needs lora_r"),
                         (dict(lora_r=4, init_from=str(base_dir), distributed="fsdp"), "ddp")):
        with pytest.raises(HymbaError, match=message):
            trainer.TrainConfig.from_json("tiny-cpu", **bad)
    for targets, message in ((["x_proj.0"], "never run"), (["no_such_module"], "lora_targets")):
        with pytest.raises(HymbaError, match=message):
            add_adapters(tiny_model(), 4, 8, 0.0, targets)


def test_lora_sft_command(tmp_path: Path):
    """`hymba train --init-from CKPT --sft-data chat.jsonl --lora-r R --merge`, with no config file."""
    from test_sft import CONVERSATION

    from hymba.cli import main
    from hymba.config import HymbaConfig
    from hymba.tokenizer import default_tokenizer_dir

    base = tmp_path / "base"  # the tokenizer's vocabulary, which SFT data needs
    model = HymbaForCausalLM(HymbaConfig.preset("tiny"))
    model.init_weights(torch.Generator().manual_seed(0))
    model.save_pretrained(str(base), copy_side_files_from=default_tokenizer_dir())
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": CONVERSATION}) + "\n" for _ in range(4)))
    out = tmp_path / "out"
    assert main(["train", "--init-from", str(base), "--sft-data", str(data), "--lora-r", "4", "--merge",
                 "--max-steps", "2", "--batch-size", "2", "--block-size", "48", "--device", "cpu", "--no-progress",
                 "--out", str(out)]) == 0
    assert (out / "step-0000002" / "adapter_model.safetensors").is_file()
    assert (out / "merged" / "tokenizer.json").is_file()
    assert HymbaForCausalLM.from_pretrained(out / "merged").config.vocab_size == 32001
