"""`hymba study` end to end at toy size on CPU: every variant trained, evaluated and reported; resuming; the CLI."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hymba.cli import build_parser, main
from hymba.errors import HymbaError
from hymba.model import HymbaForCausalLM
from hymba.study.run import PRESETS, load_preset, load_results, run_dir_for, run_study
from hymba.train.data import FORMAT, META_FILE

# The tiny preset cut to the bone: the same code paths, a few steps each.
MICRO = PRESETS["tiny"].with_overrides({
    "name": "micro", "lm_steps": 4, "lm_eval_interval": 2, "val_max_tokens": 256, "recall_tokens_per_step": 256,
    "recall_steps": 4, "recall_log_interval": 2, "recall_eval_examples": 4, "recall_eval_batch": 4,
    "decode_prompt": 16, "decode_tokens": 4, "warmup_steps": 2,
})
VARIANTS = ["mamba", "hymba"]  # no attention at all, and every Hymba switch on


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A token folder of random ids (vocabulary 64), in hymba.train.data's format."""
    directory = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4000), ("val", 600)):
        rng.integers(3, 64, n).astype(np.uint16).tofile(directory / f"{split}.bin")
    (directory / META_FILE).write_text(json.dumps({"format": FORMAT, "dtype": "uint16", "vocab_size": 64, "bos_id": 1,
                                                   "eos_id": 2, "train_tokens": 4000, "val_tokens": 600}))
    return directory


@pytest.fixture(scope="module")
def study(tmp_path_factory, data_dir) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("study")
    logs: list[str] = []
    run_study(MICRO, out, seeds=2, device="cpu", data_dir=data_dir, variants=VARIANTS, log=logs.append)
    return out, logs


def _metrics(result: dict) -> tuple:
    """Everything a run measured except timings."""
    curve = [{k: v for k, v in c.items() if k != "tokens_per_s"} for c in result["lm"]["curve"]]
    return result["lm"]["val_loss"], curve, result["recall"], result["attention_sink"]


def test_study_writes_every_report(study):
    out, logs = study
    assert sum("seed" in line and "val ppl" in line for line in logs) == 4
    results = json.loads((out / "results.json").read_text())
    assert list(results["variants"]) == VARIANTS and len(results["runs"]) == 4
    hymba = results["variants"]["hymba"]
    assert hymba["seeds"] == [0, 1] and hymba["metrics"]["mqar@64"]["n"] == 2
    assert 0 <= hymba["metrics"]["phonebook@32"]["mean"] <= 1 and hymba["metrics"]["val_ppl"]["mean"] > 1
    assert [c["step"] for c in hymba["val_loss_curve"]] == [2, 4]
    assert len(hymba["attention_sink"]) == 4 and results["variants"]["mamba"]["attention_sink"] == []
    assert hymba["cache_bytes"]["8192"] > hymba["cache_bytes"]["1024"] > 0
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {"val_ppl", "mqar@32", "phonebook@64", "cache_bytes_1k"} <= set(rows[0])
    md = (out / "results.md").read_text()
    assert "| hymba |" in md and "MQAR @64" in md and "±" in md and "1/4 at 64" in md
    pytest.importorskip("matplotlib")
    for name in ("val_loss", "recall_vs_length", "recall_vs_cache", "attention_sink"):
        assert (out / f"{name}.png").stat().st_size > 0 and f"({name}.png)" in md


def test_runs_keep_loadable_models(study):
    out, _ = study
    run = run_dir_for(out, "hymba", 1)
    lm = HymbaForCausalLM.from_pretrained(str(run / "lm" / "step-0000004"))
    recall = HymbaForCausalLM.from_pretrained(str(run / "recall"))
    assert lm.config.vocab_size == 64 and recall.config.vocab_size == MICRO.recall_vocab_size
    assert lm.config.num_memory_tokens == MICRO.shape.num_memory_tokens
    assert not (run / "lm" / "step-0000004" / "trainer_state.pt").exists()


def test_resume_redoes_only_unfinished_or_changed_parts(study, data_dir, tmp_path):
    out = tmp_path / "study"
    shutil.copytree(study[0], out)
    before = load_results(out, MICRO)
    (run_dir_for(out, "hymba", 1) / "recall.json").unlink()  # as if the study had stopped inside this part
    logs: list[str] = []
    run_study(MICRO, out, seeds=2, device="cpu", data_dir=data_dir, variants=VARIANTS, log=logs.append)
    assert sum("skipped" in line for line in logs) == 3 and sum("hymba seed 1 (recall)" in line for line in logs) == 1
    assert [_metrics(r) for r in load_results(out, MICRO)] == [_metrics(r) for r in before]  # a seed fixes a run

    lm_files = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/lm.json")}
    changed = MICRO.with_overrides({"recall_steps": 3})
    logs.clear()
    run_study(changed, out, seeds=2, device="cpu", data_dir=data_dir, variants=VARIANTS, log=logs.append)
    assert sum("(recall)" in line for line in logs) == 4  # new recall settings: only the recall parts rerun
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/lm.json")} == lm_files
    assert load_results(out, MICRO) == [] and len(load_results(out, changed)) == 4
    assert load_preset(out) == changed


def test_cli(study, capsys, tmp_path):
    out, _ = study
    args = build_parser().parse_args(["study", "--preset", "small", "--device", "cuda", "--out", "x", "--seeds", "3",
                                      "--set", "lm_steps=5", "--set", "shape.hidden_size=64"])
    assert (args.preset, args.device, args.seeds, args.overrides) == ("small", "cuda", 3,
                                                                      ["lm_steps=5", "shape.hidden_size=64"])
    (out / "results.md").unlink()
    assert main(["study", "--out", str(out), "--report-only"]) == 0
    assert (out / "results.md").is_file() and load_preset(out) == MICRO
    docs = tmp_path / "docs" / "study"
    assert main(["study", "--out", str(out), "--report-only", "--report-dir", str(docs)]) == 0
    assert {p.name for p in docs.iterdir()} >= {"results.md", "results.json", "results.csv"}
    assert main(["study", "--out", str(out), "--set", "bogus=1"]) == 2
    assert "unknown study setting 'bogus'" in capsys.readouterr().err


def test_preset_overrides():
    preset = PRESETS["small"].with_overrides({"lm_steps": 7, "recall_lengths": [64, 128], "shape.hidden_size": 128})
    assert (preset.lm_steps, preset.recall_lengths, preset.shape.hidden_size) == (7, (64, 128), 128)
    assert preset.max_positions >= preset.decode_prompt + preset.decode_tokens + preset.shape.num_memory_tokens
    with pytest.raises(HymbaError, match="unknown study setting"):
        PRESETS["small"].with_overrides({"shape.depth": 3})


def test_workers_give_the_same_results(study, data_dir, tmp_path):
    """Runs trained in worker processes are the runs trained in the study's own process (a seed fixes a run)."""
    out = tmp_path / "study"
    logs: list[str] = []
    run_study(MICRO, out, seeds=1, device="cpu", data_dir=data_dir, variants=VARIANTS, log=logs.append, workers=2)
    assert sum("val ppl" in line for line in logs) == 2 and sum(line.startswith("decode ") for line in logs) == 2
    serial = [r for r in load_results(study[0], MICRO) if r["seed"] == 0]
    assert [_metrics(r) for r in load_results(out, MICRO)] == [_metrics(r) for r in serial]
