"""`hymba bench train`: the CPU mode runs every case through the trainer's step and reports it. No timing is
asserted; plain `hymba bench` keeps its own options."""

from __future__ import annotations

import json
import math

from hymba import bench, bench_train
from hymba.cli import build_parser, main


def test_bench_train_cpu_reports_every_case(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--device", "cpu", "--steps", "1", "--warmup-steps", "1", "--peak-flops", "1e12",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device_type"] == "cpu" and report["mfu_formula"] == bench_train.MFU_FORMULA
    cases = [(r["model"], r["seq_len"], r["activation_checkpointing"], r["lora_r"]) for r in report["rows"]]
    assert cases == [("tiny", 32, False, 0), ("tiny", 32, True, 0), ("tiny", 64, False, 0), ("tiny", 64, True, 0),
                     ("tiny", 32, False, 4)]
    for row in report["rows"]:
        assert row["batch_ran"] == row["batch"] == 128 // row["seq_len"]
        assert row["tokens_per_s"] > 0 and row["step_ms"] > 0 and 0 < row["mfu"] and row["peak_gib"] is None
        assert math.isfinite(row["loss"]) and row["flops_per_token"] > 6 * row["trained_params"] * 0.9
    full, lora = report["rows"][0], report["rows"][-1]
    assert lora["trained_params"] < full["trained_params"] == full["params"]
    printed = capsys.readouterr().out
    assert "| model | seq | batch |" in printed and bench_train.MFU_FORMULA in printed


def test_plain_bench_keeps_its_options():
    parser = build_parser()
    plain = parser.parse_args(["bench", "--device", "cpu", "--contexts", "16", "--json", "x.json"])
    assert plain.func is bench.run_bench and plain.benchmark is None and plain.contexts == "16"
    train = parser.parse_args(["bench", "train", "--seqs", "16", "--json", "y.json"])
    assert train.func is bench_train.run_bench_train and train.json == "y.json"


def test_unknown_model_fails_before_running(capsys):
    assert main(["bench", "train", "--device", "cpu", "--models", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_gpu_defaults_cover_the_issue_cases():
    """1.5B at 2,048 and 8,192 with and without activation checkpointing, default-small, and LoRA vs full at 2,048."""
    d = bench_train.GPU_DEFAULTS
    o = bench_train.TrainBenchOptions(models=d["models"].split(","), seqs=[int(s) for s in d["seqs"].split(",")],
                                      tokens_per_step=d["tokens_per_step"], checkpointing=[False, True],
                                      lora_r=d["lora_r"], steps=d["steps"], warmup_steps=d["warmup_steps"], device=None)
    rows = [(r.model, r.seq_len, r.batch, r.activation_checkpointing, r.lora_r) for r in o.cases()]
    for model in ("hymba-1.5b", "default-small"):
        for seq, batch in ((2048, 8), (8192, 2)):
            assert (model, seq, batch, False, 0) in rows and (model, seq, batch, True, 0) in rows
    assert rows[-1] == ("hymba-1.5b", 2048, 8, False, 16)
