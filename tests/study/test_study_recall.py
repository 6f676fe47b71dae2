"""The recall arm learns: the recall models' init, the curriculum, early stopping, and a tiny attention model that
leaves MQAR's 1/pairs plateau through the study's own `train_recall` (and stays on it with the released init)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hymba.study.run import PRESETS, init_recall_model, recall_check_batches, recall_config, recall_length, train_recall
from hymba.study.tasks import IGNORE_INDEX, SEP, RecallVocab, eval_mqar

# The easiest MQAR: 4 pairs in 32 tokens over 9 keys and 9 values (chance, knowing the values but not the keys: 0.25),
# a 2-layer one-head attention model of width 64, 16 rows a step, MQAR only. Measured on CPU (one thread): the
# recall init (embedding std 1.0, untied output) stops at 0.99 held-out accuracy after 275 steps (~6 s), evaluating
# at 0.998; the released init (std 0.02, tied) ends the 500 steps at 0.25.
EASIEST = PRESETS["tiny"].with_overrides({
    "shape.hidden_size": 64, "shape.num_hidden_layers": 2, "shape.num_attention_heads": 1,
    "shape.num_key_value_heads": 1, "shape.intermediate_size": 64, "shape.global_attn_idx": [0, 1],
    "recall_vocab_size": 32, "recall_lengths": [32], "mqar_pairs_ratio": 8, "recall_tokens_per_step": 512,
    "recall_steps": 500, "recall_mqar_only_steps": 500, "recall_lr": 1e-3, "warmup_steps": 10,
    "recall_log_interval": 25, "recall_eval_batch": 64,
})


def _train_and_score(preset) -> tuple[float, int]:
    model, records = train_recall(recall_config("llama", preset), preset, 0, torch.device("cpu"))
    accuracy = eval_mqar(model, RecallVocab(preset.recall_vocab_size), 32, 256, 64, 1, preset.mqar_pairs_ratio)
    return accuracy, records[-1]["step"]


def test_attention_leaves_the_plateau_on_the_easiest_mqar():
    accuracy, steps = _train_and_score(EASIEST)
    assert accuracy > 0.9 and steps < EASIEST.recall_steps  # solved, and early stopping ended it
    released, steps = _train_and_score(dataclasses.replace(EASIEST, recall_embedding_std=None,
                                                           recall_tie_embeddings=True))
    assert released < 0.4 and steps == EASIEST.recall_steps  # the released init: still on the 0.25 plateau


def test_recall_init_redraws_only_the_embedding_and_unties_the_output_layer():
    config = recall_config("llama", EASIEST)
    model = init_recall_model(config, EASIEST, 0, torch.device("cpu"))
    released_preset = dataclasses.replace(EASIEST, recall_embedding_std=None, recall_tie_embeddings=True)
    released = init_recall_model(recall_config("llama", released_preset), released_preset, 0, torch.device("cpu"))
    embedding = model.model.embed_tokens.weight
    assert model.lm_head.weight is not embedding
    assert embedding.std().item() == pytest.approx(1.0, rel=0.1)
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert released.lm_head.weight is released.model.embed_tokens.weight
    assert released.model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.1)
    body = {k: v for k, v in model.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    assert all(torch.equal(v, released.state_dict()[k]) for k, v in body.items())


def test_curriculum_adds_lengths_short_to_long():
    preset = dataclasses.replace(EASIEST, recall_lengths=(32, 64, 128), recall_curriculum_steps=4)
    assert [recall_length(preset, s) for s in range(12)] == [32] * 4 + [32, 64] * 2 + [128, 32, 64, 128]
    everything = dataclasses.replace(preset, recall_curriculum_steps=0)
    assert [recall_length(everything, s) for s in range(4)] == [32, 64, 128, 32]


def test_check_rows_hold_the_phonebook_only_when_training_reaches_it():
    def has_phonebook(preset) -> bool:
        x, y = recall_check_batches(preset)[32]
        return bool(((x == SEP) & (y != IGNORE_INDEX)).any())  # a phonebook's first answer digit follows a ":"

    assert not has_phonebook(EASIEST)
    assert has_phonebook(dataclasses.replace(EASIEST, recall_mqar_only_steps=100))


def test_steps_with_non_finite_gradients_are_skipped_and_a_run_of_them_stops_training(monkeypatch):
    """A NaN gradient leaves the weights as they were (the step is skipped and counted); a whole log window of them
    ends training, marked diverged."""
    from hymba.train import trainer

    preset = dataclasses.replace(EASIEST, recall_steps=20, recall_log_interval=5, recall_stop_accuracy=None)
    real = trainer.accumulate_gradients
    calls = []

    def poisoned(model, batches, n_targets, rt, bad=lambda call: call in (3, 5)):
        loss = real(model, batches, n_targets, rt)
        calls.append(1)
        if bad(len(calls)):
            next(model.parameters()).grad.fill_(float("nan"))
        return loss

    monkeypatch.setattr(trainer, "accumulate_gradients", poisoned)
    model, records = train_recall(recall_config("llama", preset), preset, 0, torch.device("cpu"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [r["skipped_steps"] for r in records] == [2, 2, 2, 2] and not any(r.get("diverged") for r in records)

    calls.clear()
    monkeypatch.setattr(trainer, "accumulate_gradients",
                        lambda *args: poisoned(*args, bad=lambda call: call > 5))
    _, records = train_recall(recall_config("llama", preset), preset, 0, torch.device("cpu"))
    assert records[-1]["step"] == 10 and records[-1]["diverged"] and records[-1]["skipped_steps"] == 5


def test_ssm_timescales_follow_mambas_init_and_leave_attention_layers_alone():
    import torch.nn.functional as F

    preset = dataclasses.replace(EASIEST, recall_ssm_dt_range=(1e-3, 0.1))
    model = init_recall_model(recall_config("hymba", preset), preset, 0, torch.device("cpu"))
    released_preset = dataclasses.replace(preset, recall_ssm_dt_range=None)
    released = init_recall_model(recall_config("hymba", released_preset), released_preset, 0, torch.device("cpu"))
    for layer, before in zip(model.model.layers, released.model.layers):
        proj = layer.mamba.dt_proj[0]
        dt = F.softplus(proj.bias)
        assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
        assert dt.log().std() > 0.5  # spread over the range's two decades, not one value
        assert proj.weight.abs().max() <= proj.in_features ** -0.5
        assert torch.equal(before.mamba.dt_proj[0].bias, torch.zeros_like(proj.bias))  # the release: dt = 0.69
        assert torch.equal(layer.mamba.in_proj.weight, before.mamba.in_proj.weight)
