"""Text corpora for perplexity evaluation and quantization calibration.

The default corpus, ``"wiki"``, is the English Wikipedia extract gensim ships as test data
(``lowbit.assets.WIKI_XML``, a bz2 MediaWiki XML export). :func:`prepare_wiki` cleans it once and caches
it in ``cache_dir()/corpora/wiki/``: ``calib.jsonl`` and ``eval.jsonl`` (one ``{"title", "text"}`` object
per line, in dump order) and ``manifest.json``.

Cleaning (:func:`lowbit.eval.wikitext.clean_wikitext`) keeps main-namespace pages that are neither redirects nor
disambiguation pages; cuts the appendix (the first level-2 "See also"/"References"/"External links"/...
heading and all after it); removes comments, ``<ref>`` notes, tables and file/image/category links;
renders ``{{convert}}`` and a few inline templates as text; strips all other markup with
``mwparserfromhell``; drops caption/table residue lines; collapses 3+ newlines to 2; and drops articles
shorter than ``MIN_CHARS``.

Split rule: an article is in ``"eval"`` when ``sha256(title.encode("utf-8"))``'s first 8 bytes, as a
big-endian integer, modulo 10000 are below 2000 (about 20%), else in ``"calib"``. It depends on the
title alone, so it is the same on every machine and run (unlike ``hash()``), no article is in both
splits, and other articles coming or going never move one across. Bump ``CORPUS_VERSION`` when parsing,
cleaning or this rule changes: cached corpora of another version are rebuilt.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import re
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tqdm import tqdm

from lowbit.assets import WIKI_XML, cache_dir, fetch
from lowbit.errors import LowbitError

SPLITS: tuple[str, ...] = ("calib", "eval")
CORPUS_VERSION = 1
SPLIT_RULE = "sha256(utf-8 title)[:8] big-endian % 10000 < 2000 -> eval, else calib"
MIN_CHARS = 200  # shorter cleaned articles are stubs or lists, not prose
_DISAMBIGUATION = re.compile(r"\{\{\s*(?:disambig\w*|dab|hndis|geodis)\s*[|}]", re.IGNORECASE)
_REDIRECT = re.compile(r"^\s*#redirect", re.IGNORECASE)

@dataclass(frozen=True)
class Article:
    """One cleaned article: its title and its plain-text body."""
    title: str
    text: str


_Page = tuple[str, int | None, bool, str]  # title, namespace, is a redirect, wikitext


def _local(tag: str) -> str:
    """Tag name without its XML namespace: '{http://www.mediawiki.org/...}page' -> 'page'."""
    return tag.rsplit("}", 1)[-1]


def _iter_pages(stream: IO[bytes]) -> Iterator[_Page]:
    """Stream the <page> elements (the last <revision> wins), freeing each so memory stays flat."""
    root: ET.Element | None = None
    for event, elem in ET.iterparse(stream, events=("start", "end")):
        if root is None:
            root = elem  # the first "start" is the document element
        if event != "end" or _local(elem.tag) != "page":
            continue
        fields = {_local(child.tag): child for child in elem}
        title, ns_text = ((fields[k].text or "").strip() if k in fields else "" for k in ("title", "ns"))
        texts = [f.text or "" for f in elem.iter() if _local(f.tag) == "text"]
        wikitext = texts[-1] if texts else ""
        ns = int(ns_text) if ns_text.lstrip("-").isdigit() else None
        yield title, ns, "redirect" in fields or bool(_REDIRECT.match(wikitext)), wikitext
        root.clear()


def parse_wiki_xml(path: Path, *, progress: bool = False) -> list[Article]:
    """Cleaned articles of a MediaWiki XML export (``.bz2`` or plain), in dump order; ``progress``: tqdm bar.

    Raises LowbitError when the file is missing, not bz2/XML, or truncated."""
    from lowbit.eval.wikitext import clean_wikitext  # the parser is needed only to build the corpus

    path = Path(path)
    articles: list[Article] = []
    try:
        size = path.stat().st_size
        with open(path, "rb") as raw, tqdm(total=size, unit="B", unit_scale=True, desc="lowbit: parsing wiki",
                                           disable=not progress) as bar:
            stream: IO[bytes] = bz2.open(raw) if path.suffix == ".bz2" else raw  # type: ignore[assignment]
            with stream:
                for title, ns, redirect, wikitext in _iter_pages(stream):
                    bar.update(raw.tell() - bar.n)
                    skip = ns != 0 or redirect or not title or title.endswith("(disambiguation)")
                    if skip or _DISAMBIGUATION.search(wikitext):
                        continue
                    text = clean_wikitext(wikitext)
                    if len(text) >= MIN_CHARS:
                        articles.append(Article(title, text))
            bar.update(size - bar.n)
    except (OSError, EOFError, ET.ParseError) as exc:
        raise LowbitError(f"{path} is not a readable MediaWiki XML export ({exc}); if it is lowbit's cached "
                          "download, delete it and run again to re-download it") from exc
    return articles


def split_of(title: str) -> str:
    """The split ("calib" or "eval") an article with this title belongs to (the module's split rule)."""
    bucket = int.from_bytes(hashlib.sha256(title.encode("utf-8")).digest()[:8], "big") % 10_000
    return "eval" if bucket < 2000 else "calib"


def split_articles(articles: list[Article]) -> dict[str, list[Article]]:
    """Partition articles into the splits, keeping their order within each split."""
    return {name: [a for a in articles if split_of(a.title) == name] for name in SPLITS}


def _is_current(corpus: Path) -> bool:
    """True when ``corpus`` holds a complete corpus built by this CORPUS_VERSION."""
    try:
        manifest = json.loads((corpus / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent or damaged: the cache is rebuilt, which repairs it
        return False
    complete = all((corpus / f"{name}.jsonl").is_file() for name in SPLITS)
    return complete and isinstance(manifest, dict) and manifest.get("version") == CORPUS_VERSION


def prepare_wiki(quiet: bool = False) -> Path:
    """The cached wiki corpus directory (calib.jsonl, eval.jsonl, manifest.json), built on first use.

    It is assembled under a temporary name and renamed into place: a crash leaves nothing half-written."""
    target = cache_dir() / "corpora" / "wiki"
    if _is_current(target):
        return target
    articles = parse_wiki_xml(fetch(WIKI_XML, quiet=quiet), progress=not quiet)
    if not articles:
        raise LowbitError(f"no articles in the {WIKI_XML.name} dump; delete {cache_dir() / 'assets'} and run again")
    splits = split_articles(articles)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".wiki-", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the corpus is as readable as the rest of the cache
    try:
        for name, members in splits.items():
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as out:
                for article in members:
                    out.write(json.dumps({"title": article.title, "text": article.text}, ensure_ascii=False) + "\n")
        counts = {n: {"articles": len(arts), "chars": sum(len(a.text) for a in arts)} for n, arts in splits.items()}
        manifest = {"source": WIKI_XML.requirement, "member": WIKI_XML.member, "version": CORPUS_VERSION,
                    "split_rule": SPLIT_RULE, "splits": counts}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if target.exists():  # a stale corpus (other version, damaged): move it aside, then delete it
            os.replace(target, old := tmp.with_name(tmp.name + "-old"))
            shutil.rmtree(old)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_current(target):  # else a concurrent run installed the same corpus first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def _read_text(path: Path) -> str:
    """A file's UTF-8 text (a leading BOM is dropped), with LowbitErrors a user can act on."""
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise LowbitError(f"{path} is a directory; pass a .txt or .jsonl file, or 'wiki'") from None
    except OSError as exc:
        raise LowbitError(f"cannot read {path} ({exc.strerror}); check that it is a readable file") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LowbitError(f"{path} is not UTF-8 text (bad byte at offset {exc.start}); re-save it as UTF-8") from None


def _read_jsonl(path: Path) -> list[str]:
    """The non-empty "text" fields of a JSON-lines file, in file order; blank lines are skipped."""
    texts: list[str] = []
    shape = 'each line must be a JSON object like {"text": "..."}'
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LowbitError(f"{path}, line {number}: not valid JSON ({exc.msg}); {shape}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LowbitError(f'{path}, line {number}: no string "text" field; {shape}')
        if record["text"].strip():
            texts.append(record["text"])
    if not texts:
        raise LowbitError(f'{path} has no text (no non-empty "text" field); {shape}')
    return texts


def load_texts(source: str = "wiki", split: str = "eval") -> list[str]:
    """Documents of ``"wiki"`` (its ``split``), a .jsonl file (each line's "text") or a UTF-8 text file (one).

    ``split`` only applies to "wiki" but is checked always, so a typo never goes unnoticed."""
    if split not in SPLITS:
        raise LowbitError(f"unknown split {split!r}; valid splits are: {', '.join(SPLITS)}")
    if source == "wiki":
        return _read_jsonl(prepare_wiki(quiet=True) / f"{split}.jsonl")
    path = Path(source).expanduser()
    if not path.exists():
        raise LowbitError(f"no such corpus: {source!r} is neither 'wiki' nor an existing file; "
                          "pass 'wiki' or the path of a .txt or .jsonl file")
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path)
    text = _read_text(path)
    if not text.strip():
        raise LowbitError(f"{path} is empty; pass a file that contains some text")
    return [text]


def join_texts(texts: list[str]) -> str:
    """One string of all documents, in order, separated by a blank line: what gets tokenized."""
    return "\n\n".join(texts)
