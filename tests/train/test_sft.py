"""SFT data: labels on exactly the assistant turns, packed/padded batches, resumable order, an SFT run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hymba.tokenizer import HymbaTokenizer, default_tokenizer_dir
from hymba.train import trainer
from hymba.train.sft import IGNORE_INDEX, SFTBatches, load_conversations, render_conversation

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? Answer in a sentence, with ünïcode ✓."},
    {"role": "assistant", "content": "Tokyo is the capital of Japan ✓"},
]


@pytest.fixture(scope="module")
def tokenizer() -> HymbaTokenizer:
    return HymbaTokenizer.from_pretrained(default_tokenizer_dir())


def label_spans(labels: list[int]) -> list[list[int]]:
    spans, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return spans + ([current] if current else [])


def test_labels_are_exactly_the_assistant_replies(tokenizer: HymbaTokenizer):
    ids, labels = render_conversation(tokenizer, CONVERSATION)
    assert len(ids) == len(labels)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))
    spans = label_spans(labels)
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert len(spans) == len(replies)
    for span, reply in zip(spans, replies):
        # The reply, the newline Hymba's template ends a turn with, and the EOS that teaches the model to stop.
        assert span[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(span[:-1], skip_special_tokens=False) == reply + "\n"

    # Without the EOS, the ids are exactly the template's tokenization of the whole conversation.
    plain_ids, plain_labels = render_conversation(tokenizer, CONVERSATION, append_eos=False)
    assert plain_ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True)
    assert [tokenizer.decode(s, skip_special_tokens=False) for s in label_spans(plain_labels)] == [
        r + "\n" for r in replies]


def test_conversation_without_assistant_is_rejected(tokenizer: HymbaTokenizer):
    with pytest.raises(Exception, match="no assistant message"):
        render_conversation(tokenizer, [{"role": "user", "content": "hi"}])


def test_batches_pack_pad_and_resume():
    examples = [(list(range(10 * i, 10 * i + 5 + i)), [IGNORE_INDEX] * 3 + list(range(10 * i + 3, 10 * i + 5 + i)))
                for i in range(1, 7)]
    packed = SFTBatches(examples, block_size=8, pad_id=0, mode="pack", seed=3)
    x, y = packed.next_batch(3)
    assert x.shape == y.shape == (3, 8)
    flat = torch.cat([torch.tensor(e[0]) for e in examples])
    assert torch.isin(x, flat).all()
    assert ((y == IGNORE_INDEX) | (y == torch.cat([x[:, 1:], y[:, -1:]], 1))).all()  # targets are next tokens

    padded = SFTBatches(examples, block_size=16, pad_id=0, mode="pad", seed=3)
    x, y = padded.next_batch(4)
    lengths = [len(ids) for ids, _ in padded._rows[:4]]
    assert x.shape[1] == max(lengths) - 1
    for row, n in enumerate(lengths):
        assert (x[row, n:] == 0).all() and (y[row, n - 1:] == IGNORE_INDEX).all()

    # Resuming mid-epoch, and across the epoch boundary, gives the batches the uninterrupted sampler gives.
    state = padded.state_dict()
    expected = [padded.next_batch(4) for _ in range(3)]
    fresh = SFTBatches(examples, block_size=16, pad_id=0, mode="pad", seed=3)
    fresh.load_state_dict(state)
    for (ex, ey), (gx, gy) in zip(expected, (fresh.next_batch(4) for _ in range(3))):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)


def test_sft_run(tokenizer: HymbaTokenizer, tmp_path: Path):
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": CONVERSATION[:3 + 2 * (i % 2)]}) for i in range(6)) + "\n")
    assert len(load_conversations(data, tokenizer, 65)) == 6
    for packing in ("pack", "pad"):
        cfg = trainer.TrainConfig.from_json(
            "tiny-cpu", sft_data=str(data), sft_val_data=str(data), sft_packing=packing,
            out_dir=str(tmp_path / packing), batch_size=2, block_size=48, max_steps=2, eval_iters=1, progress=False)
        records = trainer.train(cfg)
        assert records[-1]["step"] == 2 and records[-1]["val_loss"] > 0
