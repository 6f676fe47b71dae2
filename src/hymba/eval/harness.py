"""Scoring documents with a Hymba model: batched log-likelihoods, batched greedy generation, per-task results.

Every task asks one of two things of the model: the log-likelihood of a continuation after a context (and whether
greedy decoding would produce it), or the greedy completion of a prompt. `ModelScorer` answers both for many
requests at once through the model's padded batch forward; `evaluate_docs` turns a task's documents into such
requests, scores them with any object that answers the two questions (tests pass a fake whose log-likelihoods
they set) and aggregates the metrics of `hymba.eval.scorers`.

Log-likelihoods follow lm-eval-harness's Hugging Face model. Context and continuation are tokenized as its
`_encode_pair` does: trailing spaces move from the context to the continuation, the context+continuation text is
encoded whole, and the continuation's tokens are what follows the context's own encoding. The input is the last
`max_length + 1` tokens minus the final one (left truncation); requests run longest first. Unlike lm-eval, a batch
is left-padded, so every row's continuation ends in the last column and the LM head runs only on the last
(longest continuation) positions; the model gives each left-padded row the logits it has alone. Log-probabilities
are taken in float32 whatever the model's dtype (lm-eval uses the model's dtype; the same in float32).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm import tqdm

from hymba.errors import HymbaError
from hymba.eval import scorers
from hymba.eval.tasks import Doc, Task
from hymba.generate import complete, left_pad, pad_token_id


class Scorer(Protocol):
    """What `evaluate_docs` needs from a language model."""

    def loglikelihood(self, requests: Sequence[tuple[str, str]], desc: str = "") -> list[tuple[float, bool]]:
        """(summed log-probability of the continuation, whether greedy decoding gives it) per request."""

    def generate(self, prompts: Sequence[str], stop: Sequence[str], max_new_tokens: int, desc: str = "") -> list[str]:
        """The greedy completion of each prompt, cut at the first stop string."""


class ModelScorer:
    """Batched log-likelihoods and completions from a Hymba model and its tokenizer.

    `add_bos`: None encodes as the tokenizer is configured (Hymba's adds BOS, as lm-eval's HF model does by default
    since it follows the tokenizer); False scores without BOS, as older lm-eval releases did.
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, add_bos: bool | None = None, progress: bool = True):
        if batch_size < 1:
            raise HymbaError(f"batch size must be >= 1, got {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.add_bos, self.progress = batch_size, add_bos, progress
        config = model.config
        self.max_length = config.max_position_embeddings - config.num_memory_tokens  # positions left for text
        self.pad_id = pad_token_id(config)

    def encode_pairs(self, requests: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """(context ids, continuation ids) of each (context, continuation), exactly as lm-eval's `_encode_pair`."""
        moved = []
        for context, continuation in requests:
            spaces = len(context) - len(context.rstrip())
            if spaces:  # " Paris" is one token; "France is" + " " + "Paris" would split the space off
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            if not context:
                raise HymbaError("every log-likelihood request needs a non-blank context")
            moved.append((context, continuation))
        contexts = self.tokenizer.encode_batch([c for c, _ in moved], add_bos=self.add_bos)
        wholes = self.tokenizer.encode_batch([c + t for c, t in moved], add_bos=self.add_bos)
        return [(c, w[len(c):]) for c, w in zip(contexts, wholes)]

    def loglikelihood(self, requests: Sequence[tuple[str, str]], desc: str = "") -> list[tuple[float, bool]]:
        """(log-likelihood, is greedy) of each continuation given its context."""
        return self.loglikelihood_tokens(self.encode_pairs(requests), desc)

    @torch.inference_mode()
    def loglikelihood_tokens(self, pairs: Sequence[tuple[list[int], list[int]]],
                             desc: str = "") -> list[tuple[float, bool]]:
        """(log-likelihood, is greedy) of each continuation's token ids after its context's token ids."""
        inputs, targets = [], []
        for context, continuation in pairs:
            if not continuation or len(continuation) > self.max_length:
                raise HymbaError(f"a continuation must have 1 to {self.max_length} tokens, got {len(continuation)}")
            inputs.append((list(context) + list(continuation))[-(self.max_length + 1):-1])
            targets.append(list(continuation))
        # Longest first: the first batch shows at once whether the batch size fits, and the time estimate is high.
        order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        with tqdm(total=len(pairs), desc=desc or "log-likelihoods", disable=not self.progress) as bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                ids, mask = left_pad([inputs[i] for i in batch], self.pad_id, self.model.device)
                keep = max(len(targets[i]) for i in batch)
                logits = self.model(ids, attention_mask=mask, logits_to_keep=keep).logits.float()  # (b, keep, vocab)
                wanted = torch.full((len(batch), keep), -1, dtype=torch.long)
                for row, i in enumerate(batch):
                    wanted[row, keep - len(targets[i]):] = torch.tensor(targets[i])
                wanted = wanted.to(logits.device)
                scored = wanted >= 0  # (b, keep): False left of a shorter continuation
                token_logprobs = logits.gather(-1, wanted.clamp(min=0)[..., None])[..., 0] - logits.logsumexp(-1)
                loglikelihood = torch.where(scored, token_logprobs, 0.0).sum(-1)
                greedy = ((logits.argmax(-1) == wanted) | ~scored).all(-1)
                for row, i in enumerate(batch):
                    results[i] = (float(loglikelihood[row]), bool(greedy[row]))
                bar.update(len(batch))
        return results

    def generate(self, prompts: Sequence[str], stop: Sequence[str], max_new_tokens: int, desc: str = "",
                 **sampling) -> list[str]:
        """Completion of each prompt (greedy unless `sampling` says otherwise), cut at EOS and the stop strings.

        Prompts are left-truncated so prompt + new tokens fit the model, as lm-eval does.
        """
        room = self.max_length - max_new_tokens
        if room < 1:
            raise HymbaError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in {self.max_length} tokens")
        encoded = [ids[-room:] for ids in self.tokenizer.encode_batch(list(prompts), add_bos=self.add_bos)]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        completions = [""] * len(prompts)
        with tqdm(total=len(prompts), desc=desc or "generation", disable=not self.progress) as bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                texts = complete(self.model, self.tokenizer, [encoded[i] for i in batch], stop_strings=list(stop),
                                 max_new_tokens=max_new_tokens, **sampling)
                for i, text in zip(batch, texts):
                    completions[i] = text
                bar.update(len(batch))
        return completions


@dataclass
class TaskResult:
    """One task's aggregate metrics (with standard errors), per-group metrics and per-document samples."""

    task: str
    num_fewshot: int
    docs: int
    metrics: dict[str, float]
    stderr: dict[str, float | None]
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        """Everything but the samples."""
        return {"num_fewshot": self.num_fewshot, "docs": self.docs, "metrics": self.metrics, "stderr": self.stderr,
                "groups": self.groups}


def _aggregate(metrics: Sequence[str], samples: list[dict]) -> tuple[dict[str, float], dict[str, float | None]]:
    values, stderr = {}, {}
    for metric in metrics:
        if metric == "perplexity":
            values[metric], stderr[metric] = scorers.perplexity([s["loglikelihood"] for s in samples]), None
        else:
            column = [s[metric] for s in samples]
            values[metric], stderr[metric] = scorers.mean(column), scorers.mean_stderr(column)
    return values, stderr


def score_samples(scorer: Scorer, task: Task, docs: Sequence[Doc]) -> list[dict]:
    """Per-document scores: every metric the task's kind defines, plus what they were computed from."""
    if task.kind == "choice":
        requests = [request for doc in docs for request in doc.requests]
        scores = iter(scorer.loglikelihood(requests, desc=task.name))
        samples = []
        for doc in docs:
            lls = [next(scores)[0] for _ in doc.requests]
            samples.append({"loglikelihoods": lls, "gold": doc.gold,
                            **scorers.choice_scores(lls, doc.gold, doc.choice_lengths)})
        return samples
    if task.kind == "target":
        targets = [(doc.context, doc.continuation) for doc in docs]
        return [{"loglikelihood": ll, "acc": float(greedy)}
                for ll, greedy in scorer.loglikelihood(targets, desc=task.name)]
    completions = scorer.generate([doc.prompt for doc in docs], task.stop, task.max_new_tokens, desc=task.name)
    return [{"completion": text, "answers": doc.answers, "exact_match": scorers.exact_match(text, doc.answers),
             "f1": scorers.f1(text, doc.answers), "contains": scorers.contains(text, doc.answers)}
            for text, doc in zip(completions, docs)]


def evaluate_docs(scorer: Scorer, task: Task, docs: Sequence[Doc], num_fewshot: int) -> TaskResult:
    """Score `docs` of `task` and aggregate its metrics overall and per group."""
    if not docs:
        raise HymbaError(f"{task.name} has no documents to score")
    samples = score_samples(scorer, task, docs)
    metrics, stderr = _aggregate(task.metrics, samples)
    groups = {}
    for group in sorted({doc.group for doc in docs if doc.group}):
        groups[group] = _aggregate(task.metrics, [s for s, d in zip(samples, docs) if d.group == group])[0]
    return TaskResult(task.name, num_fewshot, len(docs), metrics, stderr, groups, samples)


def evaluate(scorer: Scorer, tasks: Sequence[Task], limit: int | None = None,
             num_fewshot: int | None = None) -> list[TaskResult]:
    """Evaluate each task in turn; every task's few-shot count is checked before the first one runs."""
    shots = [task.check_shots(num_fewshot) for task in tasks]
    return [evaluate_docs(scorer, task, task.docs(k, limit), k) for task, k in zip(tasks, shots)]


def markdown_table(results: Sequence[TaskResult]) -> str:
    """A Markdown table with one row per task and metric, as lm-eval prints."""
    lines = ["| Task | Shots | Docs | Metric | Value | Stderr |", "|:-----|------:|-----:|:-------|------:|-------:|"]
    for result in results:
        first = True
        for metric, value in result.metrics.items():
            stderr = result.stderr[metric]
            head = f"| {result.task} | {result.num_fewshot} | {result.docs} |" if first else "| | | |"
            lines.append(f"{head} {metric} | {value:.4f} | {'' if stderr is None else f'{stderr:.4f}'} |")
            first = False
    return "\n".join(lines)
