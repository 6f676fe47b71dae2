"""Token files: tokenizing text/JSONL/Parquet/datasets inputs deterministically, and resumable batch samplers."""

from __future__ import annotations

import gzip
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from hymba.errors import HymbaError
from hymba.tokenizer import HymbaTokenizer
from hymba.train import data
from hymba.train.data import (
    RandomBatchSampler,
    SequentialBatchSampler,
    TokenDataset,
    expand_inputs,
    plan_shards,
    tokenize,
)

WORDS = "the cat sat on a mat while rain fell over quiet hills and ships sailed far away".split()


def _documents(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 30))).capitalize() + f". Doc {i}." for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer() -> HymbaTokenizer:
    return HymbaTokenizer.from_pretrained()


@pytest.fixture
def inputs(tmp_path) -> tuple[list[Path], list[str]]:
    """A JSONL file, a gzipped JSONL file with another field name... and text files; with their documents in order."""
    docs = _documents(60)
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[:40])) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[40:50])
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, d in enumerate(docs[50:]):
        (folder / f"{i:02d}.txt").write_text(d)
    (folder / "notes.csv").write_text("ignored")
    return [jsonl, tmp_path / "b.jsonl.gz", folder], docs


def _split_documents(tokens: np.ndarray, bos: int, eos: int) -> list[list[int]]:
    assert tokens[0] == bos and tokens[-1] == eos
    ends = np.flatnonzero(tokens == eos) + 1
    docs = np.split(tokens, ends[:-1])
    assert all(d[0] == bos and d[-1] == eos for d in docs)
    return [d[1:-1].tolist() for d in docs]


def test_tokenize_layout_and_split(tmp_path, inputs, tokenizer, monkeypatch):
    monkeypatch.setattr(data, "SHARD_BYTES", 300)  # several shards per JSONL file, lines straddling their bounds
    files, docs = inputs
    meta = tokenize(files, tmp_path / "out", val_fraction=0.1, seed=3, workers=1, progress=False)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tokenizer.vocab_size
    assert (meta["train_documents"], meta["val_documents"]) == (54, 6)
    assert [s["path"] for s in meta["sources"]][:2] == [str(f) for f in files[:2]]

    ds = TokenDataset(tmp_path / "out")
    train, val = ds.tokens("train"), ds.tokens("val")
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    pieces = _split_documents(np.asarray(train), ds.bos_id, ds.eos_id) + _split_documents(
        np.asarray(val), ds.bos_id, ds.eos_id
    )
    expected = [tokenizer.encode(d, add_bos=False) for d in docs]
    assert sorted(pieces) == sorted(expected)  # every document exactly once, across the two splits
    assert pieces != expected  # in a seeded order, not the input order


def test_output_is_independent_of_workers(tmp_path, inputs, monkeypatch):
    monkeypatch.setattr(data, "SHARD_BYTES", 500)
    files, _ = inputs
    tokenize(files, tmp_path / "one", val_fraction=0.2, seed=7, workers=1, progress=False)
    tokenize(files, tmp_path / "two", val_fraction=0.2, seed=7, workers=2, progress=False)
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert not list((tmp_path / "one").glob("*.partial"))


def test_jsonl_shards_cover_every_line_once(tmp_path, monkeypatch):
    lines = [json.dumps({"body": "x" * (i % 7), "n": i}) for i in range(50)]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    for size in (1, 13, 64, 10_000):
        monkeypatch.setattr(data, "SHARD_BYTES", size)
        shards, _ = plan_shards([path], text_field="body")
        texts = [t for s in shards for t in data._shard_texts(s)]
        assert texts == ["x" * (i % 7) for i in range(50)]


def test_parquet_and_hf_dataset_inputs(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    docs = _documents(12)
    pq.write_table(pa.table({"content": docs[:8]}), tmp_path / "d.parquet", row_group_size=3)

    class FakeDataset:  # the slice of datasets.Dataset that tokenize uses
        column_names = ["content"]

        def __len__(self):
            return 4

        def __getitem__(self, rows):
            return {"content": docs[8:][rows]}

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, split: FakeDataset()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    meta = tokenize([tmp_path / "d.parquet"], tmp_path / "out", text_field="content", hf_dataset="fake/ds",
                    val_fraction=0, workers=1, progress=False)  # fmt: skip
    assert meta["train_documents"] == 12 and meta["val_tokens"] == 0
    assert meta["sources"][1] == {"hf_dataset": "fake/ds", "split": "train", "rows": 4}
    assert len(TokenDataset(tmp_path / "out").tokens("val")) == 0


def test_input_errors(tmp_path):
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(HymbaError, match="unsupported file type"):
        expand_inputs([tmp_path / "x.csv"])
    with pytest.raises(HymbaError, match="does not exist"):
        expand_inputs([tmp_path / "missing.jsonl"])
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(HymbaError, match=r"bad.jsonl \(byte 17\) has no string field 'text'.*--text-field"):
        tokenize([tmp_path / "bad.jsonl"], tmp_path / "out", workers=1, progress=False)
    (tmp_path / "one.txt").write_text("only one document")
    with pytest.raises(HymbaError, match="too few for a train split"):
        tokenize([tmp_path / "one.txt"], tmp_path / "out", val_fraction=0.5, workers=1, progress=False)
    with pytest.raises(HymbaError, match="no meta.json"):
        TokenDataset(tmp_path / "out")


def _token_folder(path: Path, train: np.ndarray, val: np.ndarray) -> TokenDataset:
    """A token folder written by hand (known token values make windows easy to check)."""
    path.mkdir()
    train.astype(np.uint16).tofile(path / "train.bin")
    val.astype(np.uint16).tofile(path / "val.bin")
    meta = {"format": data.FORMAT, "dtype": "uint16", "vocab_size": 1000, "bos_id": 1, "eos_id": 2,
            "train_tokens": len(train), "val_tokens": len(val)}  # fmt: skip
    (path / "meta.json").write_text(json.dumps(meta))
    return TokenDataset(path)


def test_get_batch_windows(tmp_path):
    ds = _token_folder(tmp_path / "tok", np.arange(500), np.arange(20))
    x, y = ds.get_batch("train", 8, 16, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], x[:, :-1] + 1)
    x2, _ = ds.get_batch("train", 8, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    with pytest.raises(HymbaError, match="too few for one window"):
        ds.get_batch("val", 1, 20)


def test_random_sampler_resumes_exactly(tmp_path):
    ds = _token_folder(tmp_path / "tok", np.arange(1000), np.arange(100))
    sampler = RandomBatchSampler(ds, "train", 4, 8, seed=5)
    for _ in range(3):
        next(sampler)
    state = json.loads(json.dumps(sampler.state_dict()))  # survives a JSON round trip
    expected = [next(sampler) for _ in range(2)]
    resumed = RandomBatchSampler(ds, "train", 4, 8, seed=0)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, [next(resumed) for _ in range(2)]):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    other_rank = RandomBatchSampler(ds, "train", 4, 8, seed=5, rank=1)
    other_rank.load_state_dict({**state, "rank": 1})
    assert not torch.equal(next(other_rank)[0], expected[0][0])
    with pytest.raises(HymbaError, match="cannot resume a random sampler on val"):
        RandomBatchSampler(ds, "val", 4, 8).load_state_dict(state)


def test_sequential_sampler_epochs_ranks_and_resume(tmp_path):
    ds = _token_folder(tmp_path / "tok", np.arange(100), np.arange(10))
    ranks = [SequentialBatchSampler(ds, "train", 2, 5, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == 4  # 20 tokens per global batch, 99 usable
    x0, y0 = next(ranks[0])
    x1, _ = next(ranks[1])
    assert x0.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]] and y0[1, -1] == 10
    assert x1[:, 0].tolist() == [10, 15]
    sampler = ranks[0]
    for _ in range(3):
        next(sampler)
    state = sampler.state_dict()
    assert (state["position"], state["epoch"]) == (80, 0)
    x, _ = next(sampler)  # 80 + 20 + 1 > 100 tokens: the epoch wraps
    assert (sampler.epoch, x[0, 0].item()) == (1, 0)
    resumed = SequentialBatchSampler(ds, "train", 2, 5, rank=0, world_size=2)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed)[0], x) and resumed.epoch == 1
    with pytest.raises(HymbaError, match="fewer than one global batch"):
        SequentialBatchSampler(ds, "val", 2, 5)


def test_cli_tokenize(tmp_path, capsys):
    from hymba.cli import main

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in _documents(5)))
    argv = ["data", "tokenize", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "tok"), "--quiet"]
    assert main([*argv, "--workers", "1", "--val-fraction", "0.2"]) == 2  # the records have no "text" field
    assert capsys.readouterr().err.count("\n") == 1
    assert main([*argv, "--workers", "1", "--val-fraction", "0.2", "--text-field", "body"]) == 0
    assert "val " in capsys.readouterr().out
    assert TokenDataset(tmp_path / "tok").meta["val_documents"] == 1


@pytest.mark.parametrize("content", [b"not gzip at all", gzip.compress(b'{"text": "hello"}\n' * 100)[:40]],
                         ids=["not gzip", "truncated gzip"])
@pytest.mark.parametrize("suffix", [".jsonl.gz", ".txt.gz"])
def test_damaged_gzip_is_one_line_and_leaves_nothing(tmp_path, content, suffix):
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(content)
    with pytest.raises(HymbaError, match=f"{bad.name} is not a complete gzip file"):
        tokenize([bad], tmp_path / "new", workers=1, progress=False)
    assert not (tmp_path / "new").exists()  # no empty output folder left behind


def test_failed_tokenize_keeps_an_earlier_output(tmp_path):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _documents(6)))
    tokenize([tmp_path / "docs.jsonl"], tmp_path / "tok", workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "tok").iterdir()}
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(HymbaError):
        tokenize([tmp_path / "docs.jsonl", tmp_path / "bad.jsonl.gz"], tmp_path / "tok", workers=1, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "tok").iterdir()} == before
    assert len(TokenDataset(tmp_path / "tok").tokens("train")) > 0


@pytest.mark.parametrize("meta", ["{not json", "[]", json.dumps({"format": data.FORMAT, "dtype": "uint16"}),
                                  json.dumps({"format": data.FORMAT, "dtype": "float64", "vocab_size": 9, "bos_id": 1,
                                              "eos_id": 2, "train_tokens": 0, "val_tokens": 0})])
def test_damaged_meta_json_is_one_line(tmp_path, meta):
    (tmp_path / "meta.json").write_text(meta)
    with pytest.raises(HymbaError, match="meta.json") as info:
        TokenDataset(tmp_path)
    assert "tokenize the data again" in str(info.value)
