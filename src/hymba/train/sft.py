"""Supervised fine-tuning data: chat JSONL rendered with the chat template, loss on the assistant's tokens only.

Each line of the input file is `{"messages": [{"role": ..., "content": ...}, ...]}`. A conversation is rendered
once with the tokenizer's chat template and tokenized once; the assistant spans are found by rendering the
conversation up to each assistant turn (with and without the generation prompt), so whatever the template
wraps around a reply, the label mask follows it. Token ids are exactly what `apply_chat_template(tokenize=True)`
gives for the whole conversation, i.e. what the model sees at inference (no BOS: the released template has none).

Labels are the input ids on assistant tokens (the reply plus the end-of-turn text the template emits after it,
and an EOS token, see `render_conversation`) and -100 everywhere else. Batches come as the trainer takes them:
inputs `x` and next-token targets `y` (nanoGPT's layout, -100 where there is nothing to learn), from rows that are
either packed (conversations concatenated and cut into `block_size + 1` tokens) or padded (one conversation per
row, right-padded).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hymba.errors import HymbaError

IGNORE_INDEX = -100


def assistant_spans(tokenizer, messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) of each assistant turn's trained text.

    A span starts where the generation prompt ends and runs to the end of that turn's rendering, so it holds the
    reply and the end-of-turn text after it (Hymba's template: the reply and a newline).
    """
    text = tokenizer.apply_chat_template(messages)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        turn = tokenizer.apply_chat_template(messages[: i + 1])
        # Rendering must grow by appending for spans measured on prefixes to be spans of the whole text.
        if not (turn.startswith(prompt) and text.startswith(turn)):
            raise HymbaError("the chat template does not render conversations prefix by prefix (e.g. a system "
                             "message after the first turn); put system messages first")
        spans.append((len(prompt), len(turn)))
    return text, spans


def render_conversation(tokenizer, messages: Sequence[Mapping[str, Any]],
                        append_eos: bool = True) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 outside assistant turns) of one conversation.

    `append_eos` adds the EOS token after each assistant turn, labelled: Hymba's template emits no end-of-sequence
    marker, and generation stops at EOS, so without it a fine-tuned model never learns to stop.
    """
    if not messages or not any(m.get("role") == "assistant" for m in messages):
        raise HymbaError("a conversation has no assistant message; every SFT example needs one to learn from")
    text, spans = assistant_spans(tokenizer, messages)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    ids, labels = [], []
    span_of = [next((k for k, (s, e) in enumerate(spans) if s <= start < e), None) for start, _ in encoding.offsets]
    for t, (token, span) in enumerate(zip(encoding.ids, span_of)):
        ids.append(token)
        labels.append(token if span is not None else IGNORE_INDEX)
        turn_ends = span is not None and (t + 1 == len(span_of) or span_of[t + 1] != span)
        if append_eos and turn_ends:
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
    return ids, labels


def load_conversations(path: str | Path, tokenizer, max_tokens: int,
                       append_eos: bool = True) -> list[tuple[list[int], list[int]]]:
    """Tokenized (ids, labels) for each line of a JSONL file; cut to `max_tokens`, dropping any left with no target."""
    path = Path(path)
    if not path.is_file():
        raise HymbaError(f"no SFT file at {path}; pass a JSONL file with one {{\"messages\": [...]}} per line")
    examples = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise HymbaError(f"{path}:{lineno} is not a JSON object with a \"messages\" list") from None
        ids, labels = render_conversation(tokenizer, messages, append_eos)
        ids, labels = ids[:max_tokens], labels[:max_tokens]
        if any(label != IGNORE_INDEX for label in labels[1:]):  # the first token is never a target
            examples.append((ids, labels))
    if not examples:
        raise HymbaError(f"{path} has no conversation with assistant tokens within its first {max_tokens} tokens")
    return examples


class SFTBatches:
    """Endless, seeded, resumable (x, y) batches built from tokenized conversations (rows of at most block_size + 1).

    Each epoch shuffles the conversations with a generator seeded by (seed, epoch), so the order depends on
    nothing but the position - which `state_dict` records. "pack": conversations are concatenated and cut
    into rows of exactly `block_size + 1` tokens (attention crosses conversation boundaries, as in common packed
    SFT); "pad": one conversation per row, right-padded to the longest row of the batch. Right padding needs no
    attention mask: attention and the SSM are causal, so padding after a token never changes it.
    """

    def __init__(self, examples: list[tuple[list[int], list[int]]], block_size: int, pad_id: int,
                 mode: str = "pack", seed: int = 0):
        if mode not in ("pack", "pad"):
            raise HymbaError(f"unknown sft packing mode {mode!r}; use 'pack' or 'pad'")
        self.examples, self.block_size, self.pad_id, self.mode, self.seed = examples, block_size, pad_id, mode, seed
        self.epoch, self.cursor = 0, 0
        self._rows = self._epoch_rows(0)

    def _epoch_rows(self, epoch: int) -> list[tuple[list[int], list[int]]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        if self.mode == "pad":
            return [self.examples[i] for i in order]
        ids = [t for i in order for t in self.examples[i][0]]
        labels = [t for i in order for t in self.examples[i][1]]
        T = self.block_size + 1
        rows = [(ids[s:s + T], labels[s:s + T]) for s in range(0, len(ids) - T + 1, T)]
        if not rows:
            raise HymbaError(f"the SFT data holds {len(ids)} tokens, fewer than one packed row of {T}; "
                             "use sft_packing 'pad' or a smaller block_size")
        return rows

    def next_batch(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next `rows` rows as inputs x and targets y (x's next tokens, -100 where not trained), (rows, T)."""
        batch = []
        while len(batch) < rows:
            if self.cursor == len(self._rows):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._rows = self._epoch_rows(self.epoch)
            batch.append(self._rows[self.cursor])
            self.cursor += 1
        T = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((rows, T), self.pad_id, dtype=torch.long)
        labels = torch.full((rows, T), IGNORE_INDEX, dtype=torch.long)
        for r, (ids, lab) in enumerate(batch):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            labels[r, : len(lab)] = torch.tensor(lab)
        return input_ids[:, :-1], labels[:, 1:]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
        self._rows = self._epoch_rows(self.epoch)
