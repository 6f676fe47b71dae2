"""Tokenized training data: `hymba data tokenize` writes flat token files, samplers read batches from them.

Token files (nanoGPT style): `DIR/train.bin` and `DIR/val.bin` are raw arrays of token ids (uint16 when the vocabulary
fits, else uint32) to read with `np.memmap`, and `DIR/meta.json` records the dtype, vocabulary size, BOS/EOS ids,
token and document counts, the source files, the validation fraction and the seed.

Each document becomes `<s> tokens </s>`: BOS first, as the released Llama-2 tokenizer does for every sequence, and EOS
last, so a window that crosses a document boundary sees the end of one document and the start of the next.
Special-token text inside a document (a literal "</s>") is tokenized as plain text.

Inputs are text files (one document per file), JSONL files (one document per line, in a configurable field), Parquet
files (a column) and, when the `datasets` library is installed, a Hugging Face dataset. They are cut into shards of
fixed size (a byte range of a JSONL file, a Parquet row group, a row range of a dataset) that worker processes
tokenize in parallel. The validation split takes whole documents, and both splits list their documents in a seeded
random order (so reading a split from the start does not go through one source after another). The output depends
only on the inputs, the tokenizer, the validation fraction and the seed: never on the worker count.

Readers: `TokenDataset` opens a token folder; `TokenDataset.get_batch` samples random windows from a torch generator
(nanoGPT's `get_batch`); `RandomBatchSampler` and `SequentialBatchSampler` are endless batch iterators whose
`state_dict()` / `load_state_dict()` make a resumed run read exactly the batches the interrupted one would have.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import multiprocessing
import os
import shutil
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from hymba.errors import HymbaError

if TYPE_CHECKING:
    import torch

    from hymba.tokenizer import HymbaTokenizer

SPLITS = ("train", "val")
META_FILE = "meta.json"
FORMAT = "hymba-tokens-v1"
SHARD_BYTES = 1 << 20  # JSONL byte range per shard: small enough for a live progress bar and even load across workers
HF_SHARD_ROWS = 20_000
ENCODE_BATCH = 256  # documents per encode_batch call

_WORKER: dict[Any, Any] = {}  # per process: the tokenizer, the output dtype, loaded datasets


# ---------------------------------------------------------------------------------------------------------------------
# Inputs and shards


@dataclass(frozen=True)
class Shard:
    """A piece of input one worker tokenizes: a text file, a JSONL byte range, a Parquet row group, dataset rows."""

    kind: str  # "text", "jsonl", "parquet" or "hf"
    path: str  # the file, or the dataset name for "hf"
    start: int = 0  # first byte (jsonl), row group (parquet) or row (hf)
    stop: int = -1  # end byte (jsonl; -1: to the end), unused (parquet) or end row (hf)
    text_field: str = "text"
    hf_split: str = "train"


def _input_kind(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith((".txt", ".text", ".md")):
        return "text"
    if name.endswith(".parquet") and not path.name.lower().endswith(".gz"):
        return "parquet"
    return None


def expand_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The input files in order: a folder stands for its supported files (recursively, sorted by path)."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _input_kind(p) and not p.name.startswith("."))
            if not found:
                raise HymbaError(f"{path} holds no .txt, .md, .jsonl, .ndjson (optionally .gz) or .parquet files")
            files += found
        elif path.is_file():
            if _input_kind(path) is None:
                raise HymbaError(
                    f"{path}: unsupported file type; use .txt/.md, .jsonl/.ndjson (optionally .gz), .parquet"
                )
            files.append(path)
        else:
            raise HymbaError(f"input {path} does not exist")
    return files


def _parquet_row_groups(path: Path, text_field: str) -> int:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise HymbaError("reading Parquet needs pyarrow: pip install 'hymba[data]'") from exc
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise HymbaError(f"cannot read {path} as Parquet: {exc}") from exc
    if text_field not in parquet.schema_arrow.names:
        raise HymbaError(
            f"{path} has no column {text_field!r} (columns: {', '.join(parquet.schema_arrow.names)}); "
            "choose one with --text-field"
        )
    return parquet.num_row_groups


def _load_hf_dataset(name: str, split: str) -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise HymbaError("--hf-dataset needs the datasets library: pip install datasets") from exc
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many unrelated types (network, missing config, bad split)
        raise HymbaError(f"cannot load dataset {name!r} split {split!r}: {exc}".splitlines()[0]) from exc


def plan_shards(
    files: Sequence[Path], text_field: str = "text", hf_dataset: str | None = None, hf_split: str = "train"
) -> tuple[list[Shard], list[dict[str, Any]]]:
    """The shards to tokenize, in output order, and a description of each source for meta.json.

    Shard boundaries depend only on the inputs, never on the worker count, so the output does not either.
    """
    shards: list[Shard] = []
    sources: list[dict[str, Any]] = []
    for path in files:
        kind = _input_kind(path)
        size = path.stat().st_size
        sources.append({"path": str(path), "bytes": size})
        if kind == "jsonl" and not path.name.lower().endswith(".gz"):
            shards += [
                Shard(kind, str(path), start, min(start + SHARD_BYTES, size), text_field)
                for start in range(0, max(size, 1), SHARD_BYTES)
            ]
        elif kind == "parquet":
            shards += [
                Shard(kind, str(path), group, -1, text_field) for group in range(_parquet_row_groups(path, text_field))
            ]
        else:
            shards.append(Shard(kind, str(path), 0, -1, text_field))
    if hf_dataset:
        dataset = _load_hf_dataset(hf_dataset, hf_split)
        if text_field not in dataset.column_names:
            raise HymbaError(
                f"dataset {hf_dataset!r} has no column {text_field!r} "
                f"(columns: {', '.join(dataset.column_names)}); choose one with --text-field"
            )
        rows = len(dataset)
        sources.append({"hf_dataset": hf_dataset, "split": hf_split, "rows": rows})
        shards += [
            Shard("hf", hf_dataset, start, min(start + HF_SHARD_ROWS, rows), text_field, hf_split)
            for start in range(0, rows, HF_SHARD_ROWS)
        ]
    return shards, sources


@contextlib.contextmanager
def _readable_gzip(path: str) -> Iterator[None]:
    """Turn what a damaged or mislabelled .gz file raises while it is read into one HymbaError naming it."""
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise HymbaError(f"{path} is not a complete gzip file ({exc}); re-download or re-compress it") from None


def _jsonl_lines(shard: Shard) -> Iterator[tuple[str, bytes]]:
    """(where, line) of the shard's lines; `where` locates a line for error messages."""
    if shard.path.lower().endswith(".gz"):  # no seeking in gzip: the whole file is one shard
        with _readable_gzip(shard.path), gzip.open(shard.path, "rb") as f:
            yield from ((f"line {i}", line) for i, line in enumerate(f, 1))
        return
    with open(shard.path, "rb") as f:
        # A line belongs to the shard its first byte lies in: skip the line that straddles `start`.
        if shard.start > 0:
            f.seek(shard.start - 1)
            f.readline()
        while (pos := f.tell()) < shard.stop:
            line = f.readline()
            if not line:
                break
            yield f"byte {pos}", line


def _shard_texts(shard: Shard) -> Iterator[str]:
    """The documents of a shard, in order."""
    if shard.kind == "text":
        opener = gzip.open if shard.path.lower().endswith(".gz") else open
        with _readable_gzip(shard.path), opener(shard.path, "rb") as f:
            data = f.read()
        try:
            yield data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise HymbaError(f"{shard.path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    elif shard.kind == "jsonl":
        for where, line in _jsonl_lines(shard):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise HymbaError(f"{shard.path} ({where}): not JSON: {exc}") from exc
            text = record.get(shard.text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise HymbaError(
                    f"{shard.path} ({where}) has no string field {shard.text_field!r}; "
                    "choose the field with --text-field"
                )
            yield text
    elif shard.kind == "parquet":
        import pyarrow.parquet as pq

        column = pq.ParquetFile(shard.path).read_row_group(shard.start, columns=[shard.text_field]).column(0)
        yield from (text for text in column.to_pylist() if text is not None)
    else:
        key = ("hf", shard.path, shard.hf_split)
        if key not in _WORKER:  # load once per process (datasets memory-maps its cache, so this is cheap)
            _WORKER[key] = _load_hf_dataset(shard.path, shard.hf_split)
        yield from (text for text in _WORKER[key][shard.start : shard.stop][shard.text_field] if text is not None)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizing (in worker processes)


def _init_worker(tokenizer_dir: str, dtype: str) -> None:
    # each worker is one process on one core: the tokenizer's own threads would only oversubscribe
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from hymba.tokenizer import HymbaTokenizer

    _WORKER["tokenizer"] = HymbaTokenizer.from_pretrained(tokenizer_dir)
    _WORKER["dtype"] = np.dtype(dtype)


def _tokenize_shard(shard: Shard) -> tuple[np.ndarray, np.ndarray]:
    """(tokens of all documents, each `<s> ... </s>`, concatenated; the token count of each document)."""
    tokenizer, dtype = _WORKER["tokenizer"], _WORKER["dtype"]
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    batch: list[str] = []

    def flush() -> None:
        encoded = tokenizer.encode_batch(batch, add_bos=True, add_eos=True, split_special_tokens=True)
        counts = [len(ids) for ids in encoded]
        pieces.append(np.fromiter(chain.from_iterable(encoded), dtype=dtype, count=sum(counts)))
        lengths.extend(counts)
        batch.clear()

    for text in _shard_texts(shard):
        if text.strip():  # an empty document would only add a BOS/EOS pair
            batch.append(text)
            if len(batch) == ENCODE_BATCH:
                flush()
    if batch:
        flush()
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
    return tokens, np.asarray(lengths, dtype=np.int64)


def _tokenized_shards(
    shards: Sequence[Shard], workers: int, tokenizer: HymbaTokenizer, tokenizer_dir: str, dtype: np.dtype
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    if workers <= 1:
        _WORKER.update(tokenizer=tokenizer, dtype=dtype)
        try:
            yield from map(_tokenize_shard, shards)
        finally:
            _WORKER.clear()  # this process is no worker: let the tokenizer and any dataset go
        return
    # Not fork: the parent may hold torch or tokenizers threads, which a forked child inherits half-broken. A fork
    # server is a fresh single-threaded process that imports this module (and torch, through hymba) once, then forks
    # each worker ready to run; spawn, where there is no fork server, imports it in every worker.
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
    else:
        context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, context, _init_worker, (tokenizer_dir, dtype.name)) as pool:
        yield from pool.map(_tokenize_shard, shards)  # results come back in shard order


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_split(path: Path, tokens: np.ndarray, offsets: np.ndarray, doc_ids: np.ndarray) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        for i in range(0, len(doc_ids), 4096):
            group = doc_ids[i : i + 4096]
            f.write(np.concatenate([tokens[offsets[d] : offsets[d + 1]] for d in group]).tobytes())
    partial.replace(path)


def _tokenize_into(
    path: Path,
    shards: Sequence[Shard],
    workers: int,
    tokenizer: HymbaTokenizer,
    tokenizer_dir: str,
    dtype: np.dtype,
    progress: bool,
) -> np.ndarray:
    """Write the tokens of every shard, in shard order, to `path`; return each document's token count."""
    doc_lengths = [np.zeros(0, np.int64)]
    total = 0
    with (
        open(path, "wb") as f,
        tqdm(total=len(shards), unit="shard", desc="tokenize", disable=not progress, dynamic_ncols=True) as bar,
    ):
        for tokens, lengths in _tokenized_shards(shards, workers, tokenizer, tokenizer_dir, dtype):
            f.write(tokens.tobytes())
            doc_lengths.append(lengths)
            total += len(tokens)
            bar.update(1)
            bar.set_postfix_str(f"{total:,} tokens", refresh=False)
    return np.concatenate(doc_lengths)


def tokenize(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    tokenizer_dir: str | os.PathLike[str] | None = None,
    text_field: str = "text",
    val_fraction: float = 0.01,
    seed: int = 0,
    workers: int | None = None,
    hf_dataset: str | None = None,
    hf_split: str = "train",
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize the inputs into `out_dir/{train,val}.bin` + `meta.json` (see the module docstring); returns the meta.

    `val_fraction` of the documents (at least one when it is above 0) go to `val.bin`; `workers` defaults to the CPU
    count. The same inputs, tokenizer, fraction and seed give byte-identical files whatever the worker count.
    """
    from hymba.tokenizer import HymbaTokenizer, default_tokenizer_dir

    if not 0 <= val_fraction < 1:
        raise HymbaError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not inputs and not hf_dataset:
        raise HymbaError("nothing to tokenize: give input files or folders, or --hf-dataset NAME")
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else default_tokenizer_dir()
    tokenizer = HymbaTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise HymbaError(f"the tokenizer in {tokenizer_dir} lacks a BOS or EOS token; documents need both")
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)

    shards, sources = plan_shards(expand_inputs(inputs), text_field, hf_dataset, hf_split)
    workers = max(1, min(workers or os.cpu_count() or 1, len(shards)))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise HymbaError(f"--out {out} is a file; give a folder for train.bin, val.bin and meta.json")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)

    all_tokens = out / "tokens.partial"  # every document in input order, before the split and shuffle
    try:
        lengths = _tokenize_into(all_tokens, shards, workers, tokenizer, str(tokenizer_dir), dtype, progress)
        n_docs = len(lengths)
        n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * n_docs))
        if n_docs - n_val < 1:
            raise HymbaError(
                f"found {n_docs} non-empty document(s): too few for a train split with --val-fraction "
                f"{val_fraction}; add documents (a text file is one document) or use --val-fraction 0"
            )
        order = np.random.default_rng(seed).permutation(n_docs)
        splits = {"train": order[n_val:], "val": order[:n_val]}
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        tokens = np.memmap(all_tokens, dtype=dtype, mode="r")
        # Only now, with every input read, is an earlier tokenization in `out` replaced. meta.json is written last:
        # its presence means the folder is complete.
        (out / META_FILE).unlink(missing_ok=True)
        for split, doc_ids in splits.items():
            _write_split(out / f"{split}.bin", tokens, offsets, doc_ids)
        del tokens
    except BaseException:
        if created:  # a failed run leaves no folder behind that it made
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        all_tokens.unlink(missing_ok=True)

    meta = {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_token_id,
        "eos_id": tokenizer.eos_token_id,
        "document_layout": "<bos> tokens <eos>",
        "tokenizer": str(tokenizer_dir),
        "tokenizer_sha256": _sha256(tokenizer_dir / "tokenizer.json"),
        "train_tokens": int(lengths[splits["train"]].sum()),
        "val_tokens": int(lengths[splits["val"]].sum()),
        "train_documents": len(splits["train"]),
        "val_documents": n_val,
        "val_fraction": val_fraction,
        "seed": seed,
        "text_field": text_field,
        "sources": sources,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


# ---------------------------------------------------------------------------------------------------------------------
# Reading


class TokenDataset:
    """A token folder written by `tokenize`: memory-mapped `train`/`val` token arrays plus meta.json."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(data_dir)
        meta_path = self.dir / META_FILE
        if not meta_path.is_file():
            raise HymbaError(
                f"no {META_FILE} in {self.dir}: tokenize the data first (hymba data tokenize ... --out DIR)"
            )
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HymbaError(f"{meta_path} is not valid JSON ({exc}); tokenize the data again") from None
        keys = ("dtype", "vocab_size", "bos_id", "eos_id", "train_tokens", "val_tokens")
        complete = isinstance(self.meta, dict) and all(k in self.meta for k in keys)
        if not complete or self.meta.get("format") != FORMAT or self.meta["dtype"] not in ("uint16", "uint32"):
            raise HymbaError(f"{meta_path} is not a {FORMAT} token folder's meta.json; tokenize the data again")
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size: int = self.meta["vocab_size"]
        self.bos_id: int = self.meta["bos_id"]
        self.eos_id: int = self.meta["eos_id"]
        self._arrays: dict[str, np.ndarray] = {}

    def tokens(self, split: str) -> np.ndarray:
        """The read-only token array of a split ("train" or "val"), memory-mapped."""
        if split not in SPLITS:
            raise HymbaError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if split not in self._arrays:
            path = self.dir / f"{split}.bin"
            expected = self.meta[f"{split}_tokens"]
            size = path.stat().st_size if path.is_file() else -1
            if size != expected * self.dtype.itemsize:
                raise HymbaError(
                    f"{path} should hold {expected:,} {self.dtype.name} tokens but has {size:,} bytes; "
                    "tokenize the data again"
                )
            # np.memmap cannot map an empty file; an empty split is a valid (if useless) zero-length array
            self._arrays[split] = np.memmap(path, self.dtype, mode="r") if expected else np.zeros(0, self.dtype)
        return self._arrays[split]

    def num_tokens(self, split: str) -> int:
        """Token count of a split, from meta.json."""
        return int(self.meta[f"{split}_tokens"])

    def get_batch(
        self,
        split: str,
        batch_size: int,
        block_size: int,
        generator: torch.Generator | None = None,
        device: str | torch.device | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` random windows (inputs, next-token targets), each (batch_size, block_size) int64.

        Window starts are drawn with `torch.randint(..., generator=generator)`: nanoGPT's get_batch.
        """
        import torch

        data = self.tokens(split)
        starts = torch.randint(_window_count(data, block_size, split), (batch_size,), generator=generator)
        return windows(data, starts.tolist(), block_size, device)


def _window_count(data: np.ndarray, block_size: int, split: str) -> int:
    # a window needs block_size inputs plus one more token for the last target
    if block_size < 1 or len(data) < block_size + 1:
        raise HymbaError(
            f"the {split} split holds {len(data):,} tokens, too few for one window of block_size "
            f"{block_size} (+1); use a smaller block_size or more data"
        )
    return len(data) - block_size


def windows(
    data: np.ndarray, starts: Sequence[int], block_size: int, device: str | torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs `data[s : s + block_size]` and targets `data[s + 1 : s + block_size + 1]` for each start, as int64."""
    import torch

    rows = np.stack([np.asarray(data[s : s + block_size + 1], dtype=np.int64) for s in starts])
    x = torch.from_numpy(rows[:, :-1].copy())
    y = torch.from_numpy(rows[:, 1:].copy())
    if device is not None and torch.device(device).type == "cuda":
        # pinned host memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    if device is not None:
        return x.to(device), y.to(device)
    return x, y


class _Sampler:
    """An endless iterator of (x, y) batches from one split, with a state that resumes it exactly."""

    kind = ""

    def __init__(
        self,
        dataset: TokenDataset,
        split: str,
        batch_size: int,
        block_size: int,
        device: str | torch.device | None = None,
    ) -> None:
        self.dataset = dataset
        self.split = split
        self.batch_size = batch_size
        self.block_size = block_size
        self.device = device
        self.data = dataset.tokens(split)
        self._windows = _window_count(self.data, block_size, split)

    def __iter__(self) -> _Sampler:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return windows(self.data, self._next_starts(), self.block_size, self.device)

    def _next_starts(self) -> list[int]:
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        return {"kind": self.kind, "split": self.split, "tokens": len(self.data)}

    def _check_state(self, state: dict[str, Any]) -> None:
        mine = self._state()
        if state.get("kind") != self.kind or state.get("split") != self.split:
            raise HymbaError(
                f"cannot resume a {self.kind} sampler on {self.split} from a "
                f"{state.get('kind')} sampler state on {state.get('split')}"
            )
        if state.get("tokens") != mine["tokens"]:
            raise HymbaError(
                f"the {self.split} split changed since this data state was saved "
                f"({state.get('tokens')} tokens then, {mine['tokens']} now); resume with the same data"
            )


class RandomBatchSampler(_Sampler):
    """Random windows (as `get_batch`) where batch k depends only on (seed, k, rank), so the state is the step.

    Each rank of a data-parallel run passes its own `rank` and gets its own batches.
    """

    kind = "random"

    def __init__(
        self,
        dataset: TokenDataset,
        split: str,
        batch_size: int,
        block_size: int,
        seed: int = 0,
        rank: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(dataset, split, batch_size, block_size, device)
        self.seed = seed
        self.rank = rank
        self.step = 0

    def _next_starts(self) -> list[int]:
        rng = np.random.default_rng([self.seed, self.step, self.rank])
        self.step += 1
        return rng.integers(0, self._windows, size=self.batch_size).tolist()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: the number of batches drawn so far (plus what to check on resume)."""
        return {**self._state(), "seed": self.seed, "rank": self.rank, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`: the next batch is the one the saved sampler would have drawn."""
        self._check_state(state)
        self.seed, self.step = int(state["seed"]), int(state["step"])


class SequentialBatchSampler(_Sampler):
    """Consecutive windows through a split from its start; after the last full global batch, the next epoch begins.

    A global batch is `world_size * batch_size` windows of `block_size` tokens; rank r takes the r-th group of
    `batch_size`. Every token is read once per epoch (the tail shorter than a global batch is skipped).
    """

    kind = "sequential"

    def __init__(
        self,
        dataset: TokenDataset,
        split: str,
        batch_size: int,
        block_size: int,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(dataset, split, batch_size, block_size, device)
        self.rank = rank
        self.world_size = world_size
        self.span = world_size * batch_size * block_size  # tokens one global batch moves forward
        self.batches_per_epoch = (len(self.data) - 1) // self.span
        if self.batches_per_epoch < 1:
            raise HymbaError(
                f"the {split} split holds {len(self.data):,} tokens, fewer than one global batch of "
                f"{world_size} x {batch_size} x {block_size} (+1)"
            )
        self.position = 0  # token offset of the next global batch
        self.epoch = 0

    def _next_starts(self) -> list[int]:
        if self.position + self.span + 1 > len(self.data):
            self.position = 0
            self.epoch += 1
        first = self.position + self.rank * self.batch_size * self.block_size
        self.position += self.span
        return [first + i * self.block_size for i in range(self.batch_size)]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: token offset and epoch (plus what to check on resume)."""
        return {**self._state(), "position": self.position, "epoch": self.epoch, "span": self.span}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()` (the global batch shape may change: the position is in tokens)."""
        self._check_state(state)
        self.position, self.epoch = int(state["position"]), int(state["epoch"])
