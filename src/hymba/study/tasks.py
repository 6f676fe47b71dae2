"""Tasks that separate the study's designs at small scale: corpus perplexity and two synthetic recall tasks.

Recall tasks use a tokenizer-free integer vocabulary (`RecallVocab`): ids 0-3 are PAD (also Zoology's filler
token), SEP (":"), NEWLINE and QUERY ("?"), ids 4-13 the digits 0-9, and the rest is split into key symbols and
value symbols. Every generator is a pure function of a numpy Generator, so a seed fixes its output.

- MQAR, multi-query associative recall (Arora et al., Zoology): key-value pairs `k1 v1 k2 v2 ...`, then a query
  section of filler tokens in which every key appears once at a random slot; the model must predict, at each
  query key, its value. Scored on the value positions only. Zoology places queries by a power law that keeps
  them near the pairs; here `alpha=1` (uniform) is the default, so query-to-key distances span the whole
  context and exceed a sliding window, which is what separates windowed, recurrent and global designs.
- Phonebook lookup (Jelassi et al., "Repeat After Me"): lines `name : number NEWLINE` (names are `name_len`
  key symbols, numbers `number_len` digits), then `QUERY name :`; the model must produce the number. Scored as
  the exact match of the greedily generated number, through the cached generation engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hymba.errors import HymbaError

PAD, SEP, NEWLINE, QUERY = 0, 1, 2, 3
DIGIT0 = 4
NUM_SPECIAL = DIGIT0 + 10
IGNORE_INDEX = -100


@dataclass(frozen=True)
class RecallVocab:
    """The integer vocabulary of the recall tasks: specials and digits, then key symbols, then value symbols."""

    size: int

    def __post_init__(self) -> None:
        if self.size < NUM_SPECIAL + 4:
            raise HymbaError(f"a recall vocabulary needs at least {NUM_SPECIAL + 4} ids, got {self.size}")

    @property
    def num_keys(self) -> int:
        return (self.size - NUM_SPECIAL) // 2

    @property
    def key_start(self) -> int:
        return NUM_SPECIAL

    @property
    def value_start(self) -> int:
        return NUM_SPECIAL + self.num_keys

    @property
    def num_values(self) -> int:
        return self.size - self.value_start


def _distinct(rng: np.random.Generator, rows: int, population: int, k: int, weights: np.ndarray | None = None):
    """(rows, k) distinct draws from range(population) per row, optionally weighted (Efraimidis-Spirakis keys)."""
    if k > population:
        raise HymbaError(f"cannot draw {k} distinct items from {population}")
    scores = rng.random((rows, population))
    if weights is not None:
        scores = np.log(scores) / weights  # the top-k of u^(1/w) is a weighted draw without replacement
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


# ---------------------------------------------------------------------------------------------------------------------
# MQAR


def mqar_pairs(seq_len: int, ratio: int = 16) -> int:
    """The number of key-value pairs at a context length: one pair per `ratio` tokens (Zoology's 16 at 256)."""
    return max(2, seq_len // ratio)


def mqar_batch(rng: np.random.Generator, vocab: RecallVocab, batch: int, seq_len: int, num_pairs: int,
               alpha: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-token targets (batch, seq_len) int64; targets are IGNORE_INDEX except at query keys.

    Layout as Zoology's `multiquery_ar`: 2 * num_pairs tokens of pairs, then a query section of PAD fillers with
    each key at an even slot `2 * gap` (gaps drawn without replacement with weight (gap + 1) ** (alpha - 1)).
    """
    context = 2 * num_pairs
    space = (seq_len - context) // 2
    if num_pairs > vocab.num_keys or num_pairs > vocab.num_values:
        raise HymbaError(f"{num_pairs} pairs need {num_pairs} keys and values; the vocabulary has {vocab.num_keys}")
    if space < num_pairs:
        raise HymbaError(f"seq_len {seq_len} is too short for {num_pairs} pairs (needs {4 * num_pairs})")
    keys = vocab.key_start + _distinct(rng, batch, vocab.num_keys, num_pairs)
    values = vocab.value_start + _distinct(rng, batch, vocab.num_values, num_pairs)
    gaps = _distinct(rng, batch, space, num_pairs, np.arange(1, space + 1, dtype=np.float64) ** (alpha - 1))

    example = np.full((batch, seq_len + 1), PAD, dtype=np.int64)
    example[:, 0:context:2], example[:, 1:context:2] = keys, values
    query_at = context + 2 * gaps  # (batch, num_pairs) positions of the query keys
    np.put_along_axis(example, query_at, keys, axis=1)
    labels = np.full((batch, seq_len + 1), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(labels, query_at + 1, values, axis=1)
    return example[:, :-1], labels[:, 1:]


# ---------------------------------------------------------------------------------------------------------------------
# Phonebook


@dataclass(frozen=True)
class PhonebookFormat:
    name_len: int = 2
    number_len: int = 4

    @property
    def entry_len(self) -> int:  # name : digits NEWLINE
        return self.name_len + self.number_len + 2

    @property
    def query_len(self) -> int:  # QUERY name : digits NEWLINE
        return self.entry_len + 1

    def entries(self, seq_len: int, queries: int) -> int:
        """How many phonebook lines fit in `seq_len` tokens next to `queries` answered queries."""
        n = (seq_len - queries * self.query_len) // self.entry_len
        if n < max(queries, 2):
            raise HymbaError(f"seq_len {seq_len} is too short for a phonebook with {queries} queries")
        return n


def _phonebooks(rng: np.random.Generator, vocab: RecallVocab, fmt: PhonebookFormat, batch: int, entries: int):
    """Distinct names (batch, entries, name_len) of key symbols and numbers (batch, entries, number_len) of digits."""
    ids = np.stack([rng.choice(vocab.num_keys ** fmt.name_len, entries, replace=False) for _ in range(batch)])
    digits = vocab.num_keys ** np.arange(fmt.name_len - 1, -1, -1)
    names = vocab.key_start + (ids[..., None] // digits) % vocab.num_keys
    numbers = DIGIT0 + rng.integers(0, 10, (batch, entries, fmt.number_len))
    lines = np.concatenate([names, np.full((batch, entries, 1), SEP), numbers, np.full((batch, entries, 1), NEWLINE)],
                           axis=2)
    return names, numbers, lines.reshape(batch, -1)


def phonebook_queries(seq_len: int) -> int:
    """Answered lookups per training row: one per 64 tokens, so the share of scored tokens is the same at every
    length (as MQAR's pairs)."""
    return max(1, seq_len // 64)


def phonebook_batch(rng: np.random.Generator, vocab: RecallVocab, batch: int, seq_len: int,
                    fmt: PhonebookFormat = PhonebookFormat()) -> tuple[np.ndarray, np.ndarray]:
    """Training rows (batch, seq_len): a phonebook, then `phonebook_queries(seq_len)` answered lookups, PAD to the end.

    Targets are the digits of the answers (teacher-forced); everything else is IGNORE_INDEX.
    """
    queries = phonebook_queries(seq_len)
    entries = fmt.entries(seq_len, queries)
    names, numbers, book = _phonebooks(rng, vocab, fmt, batch, entries)
    asked = _distinct(rng, batch, entries, queries)  # (batch, queries) entry indices
    rows = np.arange(batch)[:, None]
    q_names, q_numbers = names[rows, asked], numbers[rows, asked]  # (batch, queries, len)
    lookups = np.concatenate([np.full((batch, queries, 1), QUERY), q_names, np.full((batch, queries, 1), SEP),
                              q_numbers, np.full((batch, queries, 1), NEWLINE)], axis=2).reshape(batch, -1)
    example = np.full((batch, seq_len + 1), PAD, dtype=np.int64)
    used = book.shape[1] + lookups.shape[1]
    example[:, :used] = np.concatenate([book, lookups], axis=1)
    labels = np.full((batch, seq_len + 1), IGNORE_INDEX, dtype=np.int64)
    first_digit = book.shape[1] + fmt.name_len + 2 + fmt.query_len * np.arange(queries)  # within each lookup line
    for d in range(fmt.number_len):
        labels[:, first_digit + d] = example[:, first_digit + d]
    return example[:, :-1], labels[:, 1:]


def phonebook_prompts(rng: np.random.Generator, vocab: RecallVocab, batch: int, seq_len: int,
                      fmt: PhonebookFormat = PhonebookFormat()) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation prompts (batch, P): the phonebook of a `seq_len` training row, then `QUERY name :`.

    Returns (prompts, answers (batch, number_len)). The book has as many lines as in training at `seq_len`.
    """
    entries = fmt.entries(seq_len, phonebook_queries(seq_len))
    names, numbers, book = _phonebooks(rng, vocab, fmt, batch, entries)
    asked = rng.integers(0, entries, batch)
    rows = np.arange(batch)
    query = np.concatenate([np.full((batch, 1), QUERY), names[rows, asked], np.full((batch, 1), SEP)], axis=1)
    return np.concatenate([book, query], axis=1).astype(np.int64), numbers[rows, asked].astype(np.int64)


def recall_batch(rng: np.random.Generator, vocab: RecallVocab, rows: int, seq_len: int, pairs_ratio: int = 16,
                 alpha: float = 1.0, phonebook: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A recall training batch as (x, y) int64 tensors: the first half of the rows MQAR, the rest phonebook (all
    MQAR when `phonebook` is False)."""
    book_rows = rows // 2 if phonebook else 0
    parts = [mqar_batch(rng, vocab, rows - book_rows, seq_len, mqar_pairs(seq_len, pairs_ratio), alpha)]
    if book_rows:
        parts.append(phonebook_batch(rng, vocab, book_rows, seq_len))
    return tuple(torch.from_numpy(np.concatenate(arrays)) for arrays in zip(*parts))


# ---------------------------------------------------------------------------------------------------------------------
# Scorers


def position_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, scored) argmax predictions at the positions whose label is not IGNORE_INDEX."""
    scored = labels != IGNORE_INDEX
    correct = (logits.argmax(dim=-1) == labels) & scored
    return int(correct.sum()), int(scored.sum())


def exact_match(generated: torch.Tensor, answers: torch.Tensor) -> tuple[int, int]:
    """(rows whose generated tokens equal the answer exactly, rows)."""
    return int((generated == answers).all(dim=1).sum()), answers.shape[0]


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation drivers


def _autocast(device: torch.device):
    # The same numerics as training: bf16 autocast on CUDA, plain float32 elsewhere.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def eval_mqar(model, vocab: RecallVocab, seq_len: int, examples: int, batch: int, seed: int,
              pairs_ratio: int = 16, alpha: float = 1.0) -> float:
    """MQAR accuracy over the value positions of `examples` fresh sequences (teacher-forced, as in Zoology)."""
    rng = np.random.default_rng(seed)
    correct = total = 0
    for start in range(0, examples, batch):
        x, y = mqar_batch(rng, vocab, min(batch, examples - start), seq_len, mqar_pairs(seq_len, pairs_ratio), alpha)
        c, t = teacher_forced(model, torch.from_numpy(x), torch.from_numpy(y))
        correct, total = correct + c, total + t
    return correct / total


@torch.no_grad()
def teacher_forced(model, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(correct, scored) next-token predictions of `model` on inputs `x` at the positions `y` scores."""
    with _autocast(model.device):
        logits = model(x.to(model.device)).logits
    return position_accuracy(logits, y.to(model.device))


@torch.no_grad()
def eval_phonebook(model, vocab: RecallVocab, seq_len: int, examples: int, batch: int, seed: int,
                   fmt: PhonebookFormat = PhonebookFormat()) -> float:
    """Share of lookups whose greedily generated number (cached engine, `generate`) is exactly right."""
    from hymba.generate import generate

    rng = np.random.default_rng(seed)
    correct = total = 0
    for start in range(0, examples, batch):
        prompts, answers = phonebook_prompts(rng, vocab, min(batch, examples - start), seq_len, fmt=fmt)
        ids = torch.from_numpy(prompts).to(model.device)
        # A handful of steps: capturing a CUDA graph for them would cost more than it saves.
        out = generate(model, ids, max_new_tokens=fmt.number_len, cuda_graph=False)
        c, t = exact_match(out[:, ids.shape[1]:].cpu(), torch.from_numpy(answers))
        correct, total = correct + c, total + t
    return correct / total


@torch.no_grad()
def corpus_perplexity(model, data_dir: str | Path, block_size: int, batch: int, max_tokens: int | None = None,
                      split: str = "val") -> dict[str, float]:
    """Next-token loss and perplexity over consecutive non-overlapping windows of a token folder's split.

    Every window starts fresh (no carried context), as in training; `max_tokens` caps the windows read.
    """
    from hymba.train.data import TokenDataset

    data = TokenDataset(data_dir).tokens(split)
    windows = (len(data) - 1) // block_size
    if max_tokens is not None:
        windows = min(windows, max(1, max_tokens // block_size))
    if windows < 1:
        raise HymbaError(f"the {split} split of {data_dir} is shorter than one window of {block_size} tokens")
    loss, count = 0.0, 0
    for first in range(0, windows, batch):
        rows = np.stack([np.asarray(data[w * block_size:(w + 1) * block_size + 1], dtype=np.int64)
                         for w in range(first, min(first + batch, windows))])
        rows = torch.from_numpy(rows).to(model.device)
        with _autocast(model.device):
            logits = model(rows[:, :-1]).logits
        loss += F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten(), reduction="sum").item()
        count += rows[:, 1:].numel()
    mean = loss / count
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": count}
