"""Cached, batched generation as small pure functions: `prefill`, `decode_step`, `sample`, then `generate`.

Prompts of different lengths are left-padded into one batch. Padding never reaches attention, the SSM or the
conv state (see `HymbaModel._prepend_meta`), so every row decodes exactly as it would alone. Rows that hit an
EOS id or a stop string stop growing (they are padded) while the others go on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import torch

from hymba.cache import HymbaCache
from hymba.errors import HymbaError

# Steps between checks of whether every row has finished (each check waits for the GPU).
SYNC_EVERY = 16


@dataclass
class SamplingParams:
    """How the next token is chosen. Greedy unless `do_sample`."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            if not _is_number(getattr(self, name)):
                raise HymbaError(f"{name} must be a number, got {getattr(self, name)!r}")
        # Each check is written so that NaN, which fails every comparison, fails it too.
        if not 0 <= self.temperature < math.inf:
            raise HymbaError(f"temperature must be >= 0 and finite (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise HymbaError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise HymbaError(f"min_p must be in [0, 1), got {self.min_p}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise HymbaError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0 < self.repetition_penalty < math.inf:
            raise HymbaError(f"repetition_penalty must be > 0 and finite, got {self.repetition_penalty}")
        if self.temperature == 0:
            self.do_sample = False


def _is_int(value) -> bool:
    """An integer (Python or NumPy), but not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A real number (Python or NumPy), but not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool)


def check_seed(seed) -> None:
    """A seed is None or an integer that torch.Generator.manual_seed takes."""
    if seed is not None and (not _is_int(seed) or not -2**63 <= seed < 2**64):
        raise HymbaError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")


def _is_integer_tensor(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.is_complex() or t.dtype == torch.bool)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as transformers applies it: seen tokens' logits divided (if > 0) or multiplied by it.
    `seen` (b, vocab) bool marks tokens already in each row."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def seen_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """(b, vocab) bool: which tokens each row's prompt holds. Padding does not count, so a padded row
    penalises exactly what it would alone."""
    real = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    counts = torch.zeros(input_ids.shape[0], vocab_size, dtype=torch.long, device=input_ids.device)
    return counts.scatter_add_(1, input_ids, real) > 0


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (b,) from last-position logits (b, vocab), without a host sync."""
    if not params.do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= params.top_p * sorted_probs.sum(-1, keepdim=True), 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def pad_token_id(config) -> int:
    """The id that fills padding and finished rows (0 when the config names none)."""
    return config.pad_token_id if config.pad_token_id is not None else 0


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (b, max_len), with every row right-aligned."""
    rows = []
    for i, seq in enumerate(sequences):
        try:
            row = torch.as_tensor(list(seq))
        except (TypeError, ValueError, RuntimeError):
            row = None
        if row is not None and row.shape == (0,):
            raise HymbaError(f"prompt {i} is empty; every prompt needs at least one token")
        # Without this check float ids would be truncated to integers and bools read as ids 0 and 1.
        if row is None or row.dim() != 1 or not _is_integer_tensor(row):
            raise HymbaError(f"prompt {i} is not a list of integer token ids: {str(seq)[:60]}")
        rows.append(row)
    if not rows:
        raise HymbaError("no prompts given; pass at least one")
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def prefill(model, cache: HymbaCache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            chunk: int | None = None) -> torch.Tensor:
    """Run the prompt through the model into `cache`; returns last-position logits (b, vocab).

    With `chunk`, the prompt goes in pieces of `chunk` tokens (the first piece also takes all left padding,
    since padding may only precede a row's first meta token); the logits are the same as in one piece.
    """
    width = input_ids.shape[1]
    first = width
    if chunk is not None and attention_mask is not None:
        most_padding = int((attention_mask.long().cumsum(-1) == 0).sum(-1).max())
        first = min(width, most_padding + chunk)
    elif chunk is not None:
        first = min(width, chunk)
    mask = attention_mask
    logits = model(input_ids[:, :first], None if mask is None else mask[:, :first], cache=cache,
                   logits_to_keep=1).logits
    for start in range(first, width, chunk or width):
        logits = model(input_ids[:, start:start + chunk], cache=cache, logits_to_keep=1).logits
    return logits[:, -1]


def decode_step(model, cache: HymbaCache, tokens: torch.Tensor) -> torch.Tensor:
    """One token per row (b,) through the model, updating the cache in place; returns logits (b, vocab)."""
    return model(tokens[:, None], cache=cache).logits[:, -1]


class CudaGraphDecoder:
    """`decode_step` captured once as a CUDA graph and replayed for every token (one launch per step).

    Warming up runs the step on the live cache. `cache.step_state()` is restored after each run, so every run
    writes the K/V slot of the same next position, which the first real step rewrites, and evicts from a ring only
    the entry that step evicts anyway. (Several runs without restoring would leave later slots visible and evict
    ring entries still inside the window.) Recording the graph runs nothing.
    """

    def __init__(self, model, cache: HymbaCache, batch: int, compile: bool = False):
        self.tokens = torch.zeros(batch, dtype=torch.long, device=model.device)
        # torch.compile fuses the step's many small elementwise kernels (norms, RoPE, masks) before capture.
        step = torch.compile(decode_step, dynamic=False, fullgraph=True) if compile else decode_step
        saved = [t.clone() for t in cache.step_state()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3 if compile else 2):
                step(model, cache, self.tokens)
                for live, copy in zip(cache.step_state(), saved):
                    live.copy_(copy)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(model, cache, self.tokens)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


def _eos_ids(model, eos_token_id) -> list[int]:
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
        side = getattr(model, "checkpoint_dir", None)
        if side is not None and (side / "generation_config.json").is_file():
            import json

            eos_token_id = json.loads((side / "generation_config.json").read_text()).get("eos_token_id", eos_token_id)
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def generate_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                    params: SamplingParams, seed: int | None = None, eos_token_id=None, prefill_chunk=None,
                    stop: Callable[[int, torch.Tensor], bool] | None = None,
                    cuda_graph: bool | None = None) -> Iterator[torch.Tensor]:
    """Yields the next token of every row (b,) per step; finished rows yield the pad id.

    `stop(row, new_tokens)` may end a row early (stop strings); EOS ids end it after being emitted.
    On CUDA the decode step runs as a CUDA graph (`cuda_graph`, default on), and whether every row has
    finished is read back only every few steps, so the GPU never waits on the host between tokens.
    """
    config = model.config
    batch, width = input_ids.shape
    max_len = width + max_new_tokens
    if config.max_position_embeddings and max_len + config.num_memory_tokens > config.max_position_embeddings:
        raise HymbaError(f"prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) + "
                         f"{config.num_memory_tokens} meta tokens exceed the model's "
                         f"{config.max_position_embeddings} positions; shorten the prompt or max_new_tokens")
    if int(input_ids.max()) >= config.vocab_size or int(input_ids.min()) < 0:
        raise HymbaError(f"token id {int(input_ids.max())} is outside this model's vocabulary of {config.vocab_size}; "
                         "the tokenizer does not match the checkpoint")
    device = model.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    pad_id = pad_token_id(config)
    eos = torch.tensor(_eos_ids(model, eos_token_id), dtype=torch.long, device=device)
    cache = HymbaCache(config, batch, max_len, device=device, dtype=model.dtype)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = seen_tokens(input_ids, attention_mask, config.vocab_size)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)  # filled step by step

    logits = prefill(model, cache, input_ids, attention_mask, prefill_chunk)
    step_fn = lambda tokens: decode_step(model, cache, tokens)  # noqa: E731
    if (cuda_graph is None or cuda_graph) and device.type == "cuda" and max_new_tokens > 1:
        step_fn = CudaGraphDecoder(model, cache, batch)
    for step in range(max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        token = sample(logits, params, generator).masked_fill(finished, pad_id)
        yield token
        new_tokens[:, step] = token
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        finished |= torch.isin(token, eos)
        if stop is not None:
            for row in range(batch):
                if not finished[row] and stop(row, new_tokens[row, :step + 1]):
                    finished[row] = True
        if step == max_new_tokens - 1 or ((stop is not None or step % SYNC_EVERY == 0) and bool(finished.all())):
            return
        logits = step_fn(token)


def _as_batch(model, inputs, attention_mask, tokenizer):
    """Accept a tensor (+ left-padding mask), token-id lists, or strings (with a tokenizer); check the ids."""
    if isinstance(inputs, torch.Tensor):
        ids, mask = _checked_tensor(inputs, attention_mask)
    else:
        if attention_mask is not None:
            raise HymbaError("attention_mask goes with a tensor of input ids; lists of prompts are left-padded here")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, Sequence) or not inputs:
            raise HymbaError(f"inputs must be a tensor, a list of token-id lists or a list of strings, got "
                             f"{type(inputs).__name__ if inputs is not None else None}")
        if all(_is_int(t) for t in inputs):  # one prompt's ids, as a 1-D tensor is
            inputs = [inputs]
        if any(isinstance(p, str) for p in inputs):
            if not all(isinstance(p, str) for p in inputs):
                raise HymbaError("inputs mix strings and token ids; pass one kind")
            if tokenizer is None:
                raise HymbaError("text prompts need a tokenizer; pass tokenizer=HymbaTokenizer.from_pretrained(...)")
            inputs = tokenizer.encode_batch(list(inputs))
        ids, mask = left_pad(inputs, pad_token_id(model.config), model.device)
    vocab = model.config.vocab_size
    bad = ids[(ids < 0) | (ids >= vocab)]
    if bad.numel():
        raise HymbaError(f"token id {int(bad[0])} is outside this model's vocabulary of {vocab} (0..{vocab - 1}); "
                         "the tokenizer does not match the checkpoint")
    return ids.to(model.device), None if mask is None else mask.to(model.device)


def _checked_tensor(inputs: torch.Tensor, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids, mask) of a (L,) or (b, L) id tensor, whose mask must be left padding (generate's contract)."""
    if not _is_integer_tensor(inputs):
        raise HymbaError(f"input ids must be an integer tensor, got {inputs.dtype}")
    if inputs.dim() not in (1, 2) or inputs.shape[-1] == 0:
        raise HymbaError(f"input ids must be (length,) or (batch, length) with length >= 1, got {tuple(inputs.shape)}")
    ids = inputs if inputs.dim() == 2 else inputs[None]
    if attention_mask is None:
        return ids, None
    if not isinstance(attention_mask, torch.Tensor):
        raise HymbaError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
    mask = attention_mask if attention_mask.dim() == 2 else attention_mask[None]
    if mask.shape != ids.shape:
        raise HymbaError(f"attention_mask is {tuple(attention_mask.shape)} but the input ids are {tuple(inputs.shape)}")
    if not ((mask == 0) | (mask == 1)).all():
        raise HymbaError("attention_mask may hold only 0 (padding) and 1 (token)")
    mask = mask.long()
    # Left padding: in every row the 0s come first and the last position is a token. Other masks (right padding,
    # holes) would be read as left padding and silently change the text.
    if (mask.diff(dim=1) < 0).any() or not mask[:, -1].all():
        raise HymbaError("attention_mask must be left padding (each row's 0s before its 1s, ending in a 1); "
                         "left-pad the prompts (hymba.generate.left_pad) or pass lists of token ids")
    return ids, mask


@torch.inference_mode()
def generate(model, inputs=None, attention_mask: torch.Tensor | None = None, *, input_ids=None,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
             eos_token_id: int | list[int] | None = None, stop_strings: Sequence[str] | None = None,
             tokenizer=None, prefill_chunk: int | None = None, cuda_graph: bool | None = None) -> torch.Tensor:
    """Prompt + new token ids (b, width + new), as transformers' `generate`.

    `inputs` (or `input_ids`) is a (b, L) tensor with an optional left-padded `attention_mask`, a list of
    token-id lists, or a list of strings (needs `tokenizer`). Rows that stop early are padded with the pad id.
    On CUDA the decode step is a CUDA graph unless `cuda_graph=False`.
    """
    inputs = input_ids if inputs is None else inputs
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise HymbaError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if prefill_chunk is not None and (not _is_int(prefill_chunk) or prefill_chunk < 1):
        raise HymbaError(f"prefill_chunk must be an integer >= 1 (or None: the prompt in one piece), "
                         f"got {prefill_chunk!r}")
    check_seed(seed)
    params = SamplingParams(do_sample, temperature, top_k, top_p, min_p, repetition_penalty)
    ids, mask = _as_batch(model, inputs, attention_mask, tokenizer)
    stop = _stop_string_check(tokenizer, stop_strings)
    steps = list(generate_tokens(model, ids, mask, max_new_tokens, params, seed, eos_token_id, prefill_chunk, stop,
                                 cuda_graph))
    return torch.cat([ids, torch.stack(steps, dim=1)], dim=1)


def _stop_string_check(tokenizer, stop_strings):
    if isinstance(stop_strings, str):  # one stop string, not one per character
        stop_strings = [stop_strings]
    if not stop_strings:
        return None
    if not all(isinstance(s, str) and s for s in stop_strings):  # "" would match at once and stop every row
        raise HymbaError(f"stop_strings must be non-empty strings, got {list(stop_strings)!r}")
    if tokenizer is None:
        raise HymbaError("stop strings need a tokenizer to read the generated text")
    longest = max(len(s) for s in stop_strings)

    def stop(row: int, new_tokens: torch.Tensor) -> bool:
        # Decoding only the last few tokens is enough to see a stop string that just completed.
        tail = tokenizer.decode(new_tokens[-(longest + 4):].tolist())
        return any(s in tail for s in stop_strings)

    return stop


def trim_completion(text: str, stop_strings: Sequence[str] | None) -> str:
    """Cut a completion at the first stop string (the string itself is not returned)."""
    for s in stop_strings or ():
        if s in text:
            text = text[:text.index(s)]
    return text


@torch.inference_mode()
def complete(model, tokenizer, prompts: Sequence[str], stop_strings: Sequence[str] | None = None,
             **kwargs) -> list[str]:
    """Text in, completions out: the generated continuation of each prompt, cut at EOS and stop strings."""
    pad_id = pad_token_id(model.config)
    ids, mask = _as_batch(model, list(prompts), None, tokenizer)
    out = generate(model, ids, mask, tokenizer=tokenizer, stop_strings=stop_strings, **kwargs)
    eos = set(_eos_ids(model, kwargs.get("eos_token_id")))
    completions = []
    for prompt_ids, prompt_mask, row in zip(ids.tolist(), mask.tolist(), out[:, ids.shape[1]:].tolist()):
        kept = []
        for token in row:
            if token in eos or token == pad_id:
                break
            kept.append(token)
        # Decode after the prompt so the first new word keeps its leading space.
        prompt_ids = [t for t, m in zip(prompt_ids, prompt_mask) if m]
        text = tokenizer.decode(prompt_ids + kept)[len(tokenizer.decode(prompt_ids)):]
        completions.append(trim_completion(text, stop_strings))
    return completions


def stream(model, tokenizer, prompt: str | Sequence[int], stop_strings: Sequence[str] | None = None,
           max_new_tokens: int = 256, seed: int | None = None, prefill_chunk: int | None = None,
           **sampling) -> Iterator[str]:
    """Text increments of one completion as they are generated; never splits a character or a word's space.

    Text that could be the start of a stop string is held back until it is clear it is not one.
    """
    from hymba.tokenizer import StreamDecoder

    params = SamplingParams(**sampling)
    ids, mask = _as_batch(model, [prompt], None, tokenizer)
    decoder = StreamDecoder(tokenizer)
    # Seen after the prompt, the first new word keeps its leading space (alone, SentencePiece would drop it).
    decoder.push_many(ids[0].tolist())
    decoder.flush()  # the prompt's own pending text (e.g. a template's trailing newline) is not part of the reply
    eos = set(_eos_ids(model, None))
    text, shown = "", 0
    with torch.inference_mode():
        for token in generate_tokens(model, ids, mask, max_new_tokens, params, seed, None, prefill_chunk):
            token = int(token[0])
            if token in eos:
                break
            text += decoder.push(token)
            if stop_strings and any(s in text for s in stop_strings):
                yield trim_completion(text, stop_strings)[shown:]
                return
            safe = len(text) - _partial_stop_suffix(text, stop_strings)
            if safe > shown:
                yield text[shown:safe]
                shown = safe
    rest = trim_completion(text + decoder.flush(), stop_strings)[shown:]
    if rest:
        yield rest


def _partial_stop_suffix(text: str, stop_strings: Sequence[str] | None) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stop_strings or ():
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best
