"""Known answers for every per-document metric and aggregate in hymba.eval.scorers."""

from __future__ import annotations

import math

import pytest

from hymba.eval import scorers


def test_acc_takes_the_highest_loglikelihood():
    assert scorers.choice_scores([-3.0, -1.0, -2.0], gold=1, choice_lengths=[5, 5, 5])["acc"] == 1.0
    assert scorers.choice_scores([-3.0, -1.0, -2.0], gold=2, choice_lengths=[5, 5, 5])["acc"] == 0.0


def test_acc_norm_divides_by_the_characters_of_the_choice():
    # Raw: "a" wins (-1 > -3). Per character: "bbbb" wins (-3/4 > -1/1). Counting the joining space as well
    # (lengths 2 and 5) would flip it back to "a" (-0.5 > -0.6), so this pins lm-eval's denominator.
    scores = scorers.choice_scores([-1.0, -3.0], gold=1, choice_lengths=[len("a"), len("bbbb")])
    assert (scores["pred"], scores["pred_norm"]) == (0, 1)
    assert (scores["acc"], scores["acc_norm"]) == (0.0, 1.0)


def test_ties_go_to_the_first_choice_like_numpy_argmax():
    assert scorers.argmax([-2.0, -1.0, -1.0]) == 1
    assert scorers.choice_scores([-1.0, -1.0], gold=0, choice_lengths=[3, 3])["acc"] == 1.0


@pytest.mark.parametrize("text, normalised", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  an   apple, a pear and THE plum. ", "apple pear and plum"),
    ("Theory of the atom", "theory of atom"),  # "the" is removed only as a whole word
    ("U.S.A.", "usa"),
])
def test_normalize_answer_is_squads(text, normalised):
    assert scorers.normalize_answer(text) == normalised


def test_exact_match_against_any_reference():
    assert scorers.exact_match("the Eiffel tower.", ["Louvre", "Eiffel Tower"]) == 1.0
    assert scorers.exact_match("Eiffel Tower in Paris", ["Eiffel Tower"]) == 0.0


def test_f1_is_token_overlap_with_the_best_reference():
    # prediction tokens {big, red, dog}, reference {red, dog}: precision 2/3, recall 1 -> F1 0.8
    assert scorers.f1("the big red dog", ["cat", "a red dog"]) == pytest.approx(0.8)
    assert scorers.f1("blue", ["red dog"]) == 0.0
    assert scorers.f1("the", ["a"]) == 1.0  # both normalise to nothing: SQuAD v2 counts that as agreement


def test_contains_ignores_case_and_takes_the_answer_literally():
    assert scorers.contains("It was built in PARIS in 1889", ["Rome", "paris"]) == 1.0
    assert scorers.contains("version 345", ["3.5"]) == 0.0  # "." is not a regex wildcard
    assert scorers.contains("version 3.5", ["3.5"]) == 1.0


def test_aggregates():
    assert scorers.mean([1.0, 0.0, 1.0, 0.0]) == 0.5
    # sample variance of [1, 0, 1, 0] is 1/3; the standard error is sqrt(1/3 / 4)
    assert scorers.mean_stderr([1.0, 0.0, 1.0, 0.0]) == pytest.approx(math.sqrt(1 / 12))
    assert scorers.mean_stderr([1.0]) is None
    assert scorers.perplexity([-1.0, -3.0]) == pytest.approx(math.exp(2.0))
