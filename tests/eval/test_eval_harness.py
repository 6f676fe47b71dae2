"""The runner: metrics from a fake model whose log-likelihoods we set, and batched scoring on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from hymba.config import HymbaConfig
from hymba.errors import HymbaError
from hymba.eval import harness
from hymba.eval.harness import ModelScorer
from hymba.eval.tasks import TASKS, ChoiceDoc, GenerationDoc, TargetDoc
from hymba.generate import complete
from hymba.model import HymbaForCausalLM
from hymba.tokenizer import HymbaTokenizer


class FakeScorer:
    """Log-likelihoods looked up by continuation (or by context, for Winogrande), completions by prompt."""

    def __init__(self, loglikelihoods=None, completions=None):
        self.loglikelihoods, self.completions, self.calls = loglikelihoods or {}, completions or {}, 0

    def loglikelihood(self, requests, desc=""):
        self.calls += 1
        return [self.loglikelihoods.get(cont, self.loglikelihoods.get(ctx)) for ctx, cont in requests]

    def generate(self, prompts, stop, max_new_tokens, desc=""):
        self.calls += 1
        return [self.completions[p] for p in prompts]


def test_choice_task_acc_and_acc_norm():
    docs = [
        ChoiceDoc([("Q1", " right"), ("Q1", " wrong")], gold=0, choice_lengths=[5, 5]),
        # the long right answer loses on the raw sum and wins per character
        ChoiceDoc([("Q2", " a"), ("Q2", " bbbb")], gold=1, choice_lengths=[1, 4]),
    ]
    fake = FakeScorer({" right": (-1.0, False), " wrong": (-4.0, False), " a": (-1.0, True), " bbbb": (-3.0, False)})
    result = harness.evaluate_docs(fake, TASKS["piqa"], docs, 0)
    assert result.metrics == {"acc": 0.5, "acc_norm": 1.0}
    assert result.stderr["acc"] == pytest.approx(0.5) and result.stderr["acc_norm"] == 0.0
    assert [s["pred"] for s in result.samples] == [0, 0] and result.samples[1]["loglikelihoods"] == [-1.0, -3.0]


def test_winogrande_partial_scoring_picks_the_likelier_prefix():
    doc = TASKS["winogrande"].doc({"sentence": "Ann beat Bo so _ won.", "option1": "Ann", "option2": "Bo",
                                   "answer": "1"}, 0)
    fake = FakeScorer({"Ann beat Bo so Ann": (-2.0, False), "Ann beat Bo so Bo": (-5.0, False)})
    result = harness.evaluate_docs(fake, TASKS["winogrande"], [doc], 0)
    assert result.metrics == {"acc": 1.0}


def test_lambada_acc_is_greedy_match_and_perplexity_is_exp_mean_nll():
    docs = [TargetDoc("He opened the", " door"), TargetDoc("She closed the", " window")]
    fake = FakeScorer({" door": (-1.0, True), " window": (-3.0, False)})
    result = harness.evaluate_docs(fake, TASKS["lambada_openai"], docs, 0)
    assert result.metrics["acc"] == 0.5
    assert result.metrics["perplexity"] == pytest.approx(math.exp(2.0)) and result.stderr["perplexity"] is None


def test_generation_task_scores_completions():
    docs = [GenerationDoc("p1", ["Eiffel Tower"]), GenerationDoc("p2", ["1889"]), GenerationDoc("p3", ["red dog"])]
    fake = FakeScorer(completions={"p1": " the eiffel tower!", "p2": " It opened in 1889 to visitors",
                                   "p3": " a big red dog"})
    result = harness.evaluate_docs(fake, TASKS["squad"], docs, 0)
    assert result.metrics["exact_match"] == pytest.approx(1 / 3)
    assert result.metrics["contains"] == 1.0
    assert result.metrics["f1"] == pytest.approx((1 + 2 / 7 + 0.8) / 3)  # "1889" is 1 of 6 predicted tokens


def test_groups_and_micro_average():
    docs = [ChoiceDoc([("q", " A"), ("q", " B")], gold=g, choice_lengths=[1, 1], group=s)
            for g, s in [(0, "algebra"), (1, "algebra"), (1, "algebra"), (0, "law")]]
    fake = FakeScorer({" A": (-1.0, True), " B": (-2.0, False)})  # always answers A
    result = harness.evaluate_docs(fake, TASKS["mmlu"], docs, 5)
    assert result.metrics == {"acc": 0.5}  # 2 of 4 questions: the mean over questions, not over subjects
    assert result.groups == {"algebra": {"acc": pytest.approx(1 / 3)}, "law": {"acc": 1.0}}
    assert result.to_json()["groups"]["law"] == {"acc": 1.0}


def test_bad_shot_count_fails_before_anything_runs():
    fake = FakeScorer()
    with pytest.raises(HymbaError, match="piqa supports 0 few-shot"):
        harness.evaluate(fake, [TASKS["mmlu"], TASKS["piqa"]], num_fewshot=5)
    assert fake.calls == 0


def test_markdown_table():
    result = harness.TaskResult("piqa", 0, 10, {"acc": 0.71234, "acc_norm": 0.7}, {"acc": 0.01, "acc_norm": None})
    assert harness.markdown_table([result]).splitlines() == [
        "| Task | Shots | Docs | Metric | Value | Stderr |",
        "|:-----|------:|-----:|:-------|------:|-------:|",
        "| piqa | 0 | 10 | acc | 0.7123 | 0.0100 |",
        "| | | | acc_norm | 0.7000 |  |",
    ]


# ---------------------------------------------------------------------------------------------- the tiny model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = HymbaForCausalLM(HymbaConfig.preset("tiny"))
    model.init_weights()
    return model.eval(), HymbaTokenizer.from_pretrained()


def test_encode_pair_moves_trailing_spaces_like_lm_eval(tiny):
    _, tokenizer = tiny
    scorer = ModelScorer(*tiny)
    context, continuation = scorer.encode_pairs([("The capital of France is ", "Paris")])[0]
    whole = tokenizer.encode("The capital of France is Paris")
    assert context == tokenizer.encode("The capital of France is")
    assert context + continuation == whole and tokenizer.decode(continuation) == "Paris"
    assert context[0] == tokenizer.bos_token_id
    assert ModelScorer(*tiny, add_bos=False).encode_pairs([("a b", " c")])[0][0] == tokenizer.encode("a b",
                                                                                                    add_bos=False)
    with pytest.raises(HymbaError, match="non-blank context"):
        scorer.encode_pairs([("  ", "x")])


def _reference(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """One unpadded forward over context + continuation, read off with a plain log_softmax."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids[:, :-1]).logits[0, -len(continuation):].float(), dim=-1)
    target = torch.tensor(continuation)
    return float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def test_batched_loglikelihoods_equal_one_at_a_time(tiny):
    model, _ = tiny
    generator = torch.Generator().manual_seed(1)
    pairs = [(torch.randint(3, 32000, (n,), generator=generator).tolist(),
              torch.randint(3, 32000, (m,), generator=generator).tolist())
             for n, m in [(5, 1), (23, 4), (9, 7), (14, 1), (2, 3), (30, 2)]]
    # a continuation that is the model's own greedy choice, so one request is "greedy"
    context = pairs[0][0]
    with torch.no_grad():
        first = int(model(torch.tensor([context])).logits[0, -1].argmax())
    pairs.append((context, [first]))
    batched = ModelScorer(model, tiny[1], batch_size=4, progress=False).loglikelihood_tokens(pairs)
    alone = ModelScorer(model, tiny[1], batch_size=1, progress=False).loglikelihood_tokens(pairs)
    for (ll_b, greedy_b), (ll_a, greedy_a), (ctx, cont) in zip(batched, alone, pairs):
        ll_ref, greedy_ref = _reference(model, ctx, cont)
        assert ll_b == pytest.approx(ll_a, abs=1e-5) and ll_a == pytest.approx(ll_ref, abs=1e-5)
        assert greedy_b == greedy_a == greedy_ref
    assert batched[-1][1] and not batched[0][1]


def test_long_requests_are_truncated_from_the_left(tiny):
    scorer = ModelScorer(*tiny, progress=False)
    scorer.max_length = 8  # the input keeps the last max_length + 1 tokens, minus the final one
    context, continuation = list(range(100, 120)), [7, 8, 9]
    ll = scorer.loglikelihood_tokens([(context, continuation)])[0][0]
    assert ll == pytest.approx(_reference(tiny[0], context[-6:], continuation)[0], abs=1e-5)


def test_generate_restores_order_and_matches_each_prompt_alone(tiny):
    model, tokenizer = tiny
    prompts = ["Once upon a time", "The capital of France is Paris. The capital of Spain"]
    scorer = ModelScorer(model, tokenizer, batch_size=2, progress=False)
    texts = scorer.generate(prompts, stop=["\n"], max_new_tokens=4)
    for prompt, text in zip(prompts, texts):
        assert text == complete(model, tokenizer, [tokenizer.encode(prompt)], stop_strings=["\n"], max_new_tokens=4)[0]
