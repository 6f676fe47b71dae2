"""Recall generators and scorers against known answers; perplexity against a model with a known loss."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hymba.errors import HymbaError
from hymba.study.tasks import (
    DIGIT0,
    IGNORE_INDEX,
    NEWLINE,
    PAD,
    QUERY,
    SEP,
    PhonebookFormat,
    RecallVocab,
    corpus_perplexity,
    eval_mqar,
    exact_match,
    mqar_batch,
    mqar_pairs,
    phonebook_batch,
    phonebook_prompts,
    phonebook_queries,
    position_accuracy,
    recall_batch,
)
from hymba.train.data import FORMAT, META_FILE

VOCAB = RecallVocab(64)


def test_vocab_layout():
    assert (VOCAB.key_start, VOCAB.num_keys, VOCAB.value_start, VOCAB.num_values) == (14, 25, 39, 25)
    assert DIGIT0 + 9 < VOCAB.key_start
    with pytest.raises(HymbaError):
        RecallVocab(10)


def test_mqar_answers_are_the_bound_values():
    x, y = mqar_batch(np.random.default_rng(0), VOCAB, 8, 64, 6)
    assert x.shape == y.shape == (8, 64)
    for row_x, row_y in zip(x, y):
        keys, values = row_x[0:12:2], row_x[1:12:2]
        assert len(set(keys)) == 6 and all(VOCAB.key_start <= k < VOCAB.value_start for k in keys)
        assert all(VOCAB.value_start <= v < VOCAB.size for v in values)
        binding = dict(zip(keys, values))
        scored = np.flatnonzero(row_y != IGNORE_INDEX)
        # Every key is queried exactly once, after the pairs, and the target there is its value.
        assert sorted(row_x[scored]) == sorted(keys) and (scored >= 12).all()
        assert all(row_y[i] == binding[row_x[i]] for i in scored)
        query_section = np.delete(row_x[12:], scored - 12)
        assert (query_section == PAD).all()


def test_mqar_is_deterministic_and_checks_sizes():
    a = mqar_batch(np.random.default_rng(3), VOCAB, 4, 32, 4)
    b = mqar_batch(np.random.default_rng(3), VOCAB, 4, 32, 4)
    c = mqar_batch(np.random.default_rng(4), VOCAB, 4, 32, 4)
    assert all((p == q).all() for p, q in zip(a, b)) and not (a[0] == c[0]).all()
    assert mqar_pairs(256) == 16 and mqar_pairs(16) == 2
    with pytest.raises(HymbaError):
        mqar_batch(np.random.default_rng(0), VOCAB, 1, 32, 9)  # needs 36 tokens
    with pytest.raises(HymbaError):
        mqar_batch(np.random.default_rng(0), VOCAB, 1, 256, 30)  # more pairs than keys


def test_mqar_power_law_keeps_queries_near_the_pairs():
    _, near = mqar_batch(np.random.default_rng(0), VOCAB, 64, 256, 4, alpha=0.01)
    _, uniform = mqar_batch(np.random.default_rng(0), VOCAB, 64, 256, 4, alpha=1.0)
    # Query positions: Zoology's alpha=0.01 concentrates them at the start of the query section.
    assert np.nonzero(near != IGNORE_INDEX)[1].mean() < np.nonzero(uniform != IGNORE_INDEX)[1].mean() - 40


def _book_lookup(row: np.ndarray, fmt: PhonebookFormat) -> dict[tuple, tuple]:
    book = {}
    i = 0
    while row[i] != QUERY:
        line = row[i:i + fmt.entry_len]
        assert line[fmt.name_len] == SEP and line[-1] == NEWLINE
        book[tuple(line[:fmt.name_len])] = tuple(line[fmt.name_len + 1:-1])
        i += fmt.entry_len
    return book


def test_phonebook_rows_answer_from_the_book():
    fmt = PhonebookFormat()
    x, y = phonebook_batch(np.random.default_rng(0), VOCAB, 4, 128, fmt)
    queries = phonebook_queries(128)
    assert x.shape == y.shape == (4, 128) and queries == 2
    for row_x, row_y in zip(x, y):
        book = _book_lookup(row_x, fmt)
        assert len(book) == fmt.entries(128, queries)  # names are distinct
        assert all(DIGIT0 <= d < DIGIT0 + 10 for number in book.values() for d in number)
        scored = np.flatnonzero(row_y != IGNORE_INDEX)
        assert len(scored) == queries * fmt.number_len
        for start in np.flatnonzero(row_x == QUERY):
            name = tuple(row_x[start + 1:start + 1 + fmt.name_len])
            sep = start + 1 + fmt.name_len
            # Targets: the digits, each predicted from the token before it (SEP, then the digits so far).
            assert tuple(row_y[sep:sep + fmt.number_len]) == book[name]
            assert row_x[sep] == SEP and row_x[sep + fmt.number_len + 1] == NEWLINE


def test_phonebook_prompts_end_in_a_query_whose_answer_is_in_the_book():
    fmt = PhonebookFormat(name_len=3, number_len=5)
    prompts, answers = phonebook_prompts(np.random.default_rng(1), VOCAB, 6, 256, fmt)
    assert answers.shape == (6, 5)
    for prompt, answer in zip(prompts, answers):
        assert prompt[-1] == SEP and prompt[-2 - fmt.name_len] == QUERY
        assert _book_lookup(prompt, fmt)[tuple(prompt[-1 - fmt.name_len:-1])] == tuple(answer)
    again, _ = phonebook_prompts(np.random.default_rng(1), VOCAB, 6, 256, fmt)
    assert (again == prompts).all()


def test_recall_batch_mixes_both_tasks():
    x, y = recall_batch(np.random.default_rng(0), VOCAB, 5, 64)
    assert x.shape == y.shape == (5, 64) and x.dtype == torch.int64
    assert (x[:3, 0] >= VOCAB.key_start).all()  # MQAR rows open with a key
    assert (x[3:] == QUERY).any(dim=1).all()  # phonebook rows hold a lookup
    x, y = recall_batch(np.random.default_rng(0), VOCAB, 5, 64, phonebook=False)
    assert x.shape == (5, 64) and (x[:, 0] >= VOCAB.key_start).all() and not (x == QUERY).any()


def test_scorers_known_answers():
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 1], [2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    logits = torch.nn.functional.one_hot(torch.tensor([[0, 3, 0, 0], [2, 1, 1, 1]]), 4).float()
    assert position_accuracy(logits, labels) == (2, 3)
    assert exact_match(torch.tensor([[1, 2], [3, 4], [5, 6]]), torch.tensor([[1, 2], [3, 5], [5, 6]])) == (2, 3)


class ConstantModel:
    """Logits of zeros over `vocab_size` ids: uniform next-token probabilities, argmax 0."""

    device = torch.device("cpu")

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, x):
        return SimpleNamespace(logits=torch.zeros(*x.shape, self.vocab_size))


class InductionOracle(ConstantModel):
    """Predicts, at every position, the token that followed the latest earlier occurrence of the current token:
    a perfect associative-recall solver, so MQAR scored through `eval_mqar` must come out at 1."""

    def __call__(self, x):
        b, T = x.shape
        guess = torch.zeros_like(x)
        for row in range(b):
            last_next = {}
            for t in range(T):
                guess[row, t] = last_next.get(int(x[row, t]), 0)
                if t + 1 < T:
                    last_next[int(x[row, t])] = int(x[row, t + 1])
        return SimpleNamespace(logits=torch.nn.functional.one_hot(guess, self.vocab_size).float())


def test_eval_mqar_with_a_perfect_and_a_blind_model():
    assert eval_mqar(InductionOracle(VOCAB.size), VOCAB, 64, examples=10, batch=4, seed=0) == 1.0
    assert eval_mqar(ConstantModel(VOCAB.size), VOCAB, 64, examples=10, batch=4, seed=0) == 0.0  # 0 is no value


def test_corpus_perplexity_of_a_uniform_model(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50, 1000).astype(np.uint16)
    for split in ("train", "val"):
        tokens.tofile(tmp_path / f"{split}.bin")
    (tmp_path / META_FILE).write_text(json.dumps({"format": FORMAT, "dtype": "uint16", "vocab_size": 50, "bos_id": 1,
                                                  "eos_id": 2, "train_tokens": 1000, "val_tokens": 1000}))
    model = ConstantModel(50)
    result = corpus_perplexity(model, tmp_path, block_size=64, batch=4)
    assert result["tokens"] == (999 // 64) * 64
    assert math.isclose(result["ppl"], 50.0, rel_tol=1e-5)
    assert corpus_perplexity(model, tmp_path, block_size=64, batch=4, max_tokens=128)["tokens"] == 128
