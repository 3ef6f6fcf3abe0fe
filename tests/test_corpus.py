"""Tests for lowbit.eval.corpus: wiki parsing and cleaning, the calib/eval split, the cache, load_texts.

All tests but the one marked ``asset`` run offline on a tiny synthetic MediaWiki export.
"""

from __future__ import annotations

import bz2
import json
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

import lowbit.eval.corpus as corpus
from lowbit.errors import LowbitError
from lowbit.eval.corpus import (
    CORPUS_VERSION,
    SPLITS,
    Article,
    join_texts,
    load_texts,
    parse_wiki_xml,
    prepare_wiki,
    split_articles,
    split_of,
)

NS_010 = "http://www.mediawiki.org/xml/export-0.10/"
PROSE = (
    "This sentence is ordinary English prose, repeated so that the page is clearly longer than the "
    "minimum length that the cleaner keeps for an article. "
) * 3

AARDVARK = """{{Infobox animal|name=Aardvark|status=LC}}
[[File:Aardvark.jpg|thumb|right|An aardvark seen at the [[zoo]]]]
The '''aardvark''' is a medium-sized, burrowing, nocturnal [[mammal]] native to [[Africa]].<ref>{{cite web|title=Mammal facts}}</ref> It is the only living species of the order [[Tubulidentata]] and weighs {{convert|60|kg|lb}} on average.<ref name="size"/>
<!-- editors: keep this short -->
== Diet ==
The aardvark feeds almost exclusively on [[ant]]s and [[termite|termites]], which it digs out of their hills with its ''strong'' claws. It has a long, sticky tongue.

{| class="wikitable"
|-
! Trait !! Value
|-
| Length || 2 m
|}

== See also ==
* [[Aardwolf]]

== References ==
{{reflist}}

[[Category:Mammals of Africa]]
[[Category:Foo]]
"""
HARBOR = "A '''harbor''' is a sheltered body of [[water]] where [[ship]]s can be docked. " + PROSE
PAGES = [  # (title, ns, is_redirect_tagged, wikitext)
    ("Aardvark", 0, False, AARDVARK),
    ("Aardvark (animal)", 0, True, "#REDIRECT [[Aardvark]]\n" + PROSE),  # <redirect/> element
    ("Ant bear", 0, False, "#REDIRECT [[Aardvark]]\n" + PROSE),  # old-style: only the #REDIRECT text
    ("Talk:Aardvark", 1, False, "Talk pages are discussion, not articles. " + PROSE),
    ("Stub", 0, False, "A '''stub''' is [[short]]."),
    ("Mercury (disambiguation)", 0, False, "'''Mercury''' may refer to:\n* [[Mercury (planet)]]\n" + PROSE),
    ("Harbor", 0, False, HARBOR),
]


def make_dump(path: Path, namespace: str | None = NS_010, pages: list[tuple[str, int, bool, str]] = PAGES) -> Path:
    """Write a MediaWiki XML export of ``pages`` to ``path`` (bz2-compressed when it ends in .bz2)."""
    xmlns = f' xmlns="{namespace}"' if namespace else ""
    parts = [f'<mediawiki{xmlns} version="0.10" xml:lang="en">',
             "<siteinfo><sitename>Wikipedia</sitename><namespaces>"
             '<namespace key="0" case="first-letter" /></namespaces></siteinfo>']
    for number, (title, ns, redirect, text) in enumerate(pages, start=1):
        parts.append(
            f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>{number}</id>"
            + (f'<redirect title="{escape(title)}" />' if redirect else "")
            + f'<revision><id>{100 + number}</id><text xml:space="preserve">{escape(text)}</text></revision></page>'
        )
    data = ("\n".join(parts) + "\n</mediawiki>\n").encode("utf-8")
    path.write_bytes(bz2.compress(data) if path.suffix == ".bz2" else data)
    return path


@pytest.fixture
def dump(tmp_path: Path) -> Path:
    return make_dump(tmp_path / "wiki.xml.bz2")


@pytest.fixture
def wiki_cache(tmp_path: Path, dump: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty lowbit cache in tmp_path whose wiki "download" is the synthetic dump."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LOWBIT_CACHE", str(cache))
    monkeypatch.setattr(corpus, "fetch", lambda asset, quiet=False: dump)
    return cache


# --- parsing and cleaning ---------------------------------------------------------------------------------


@pytest.mark.parametrize("namespace", [NS_010, "http://www.mediawiki.org/xml/export-0.11/", None])
def test_parse_keeps_main_namespace_prose_articles(tmp_path: Path, namespace: str | None) -> None:
    articles = parse_wiki_xml(make_dump(tmp_path / "wiki.xml.bz2", namespace))
    assert [a.title for a in articles] == ["Aardvark", "Harbor"]
    assert all(isinstance(a, Article) for a in articles)


def test_parse_strips_markup(dump: Path) -> None:
    text = parse_wiki_xml(dump)[0].text
    assert text.startswith("The aardvark is a medium-sized, burrowing, nocturnal mammal native to Africa.")
    assert "It is the only living species of the order Tubulidentata and weighs 60 kg on average." in text
    assert "Diet\nThe aardvark feeds almost exclusively on ants and termites" in text
    assert "with its strong claws." in text
    for residue in ["[[", "]]", "{{", "}}", "'''", "''", "<ref", "<!--", "editors", "Infobox", "Mammal facts",
                    "thumb", "Aardvark.jpg", "seen at the zoo", "Category", "Mammals of Africa", "Foo",
                    "wikitable", "Trait", "Length", "See also", "Aardwolf", "References", "reflist"]:
        assert residue not in text, residue
    assert "\n\n\n" not in text
    assert all(line == line.strip() for line in text.splitlines())


def test_parse_plain_xml_and_errors(tmp_path: Path) -> None:
    assert [a.title for a in parse_wiki_xml(make_dump(tmp_path / "wiki.xml"))] == ["Aardvark", "Harbor"]
    with pytest.raises(LowbitError, match="not a readable MediaWiki XML export"):
        parse_wiki_xml(tmp_path / "missing.xml.bz2")
    garbage = tmp_path / "garbage.xml.bz2"
    garbage.write_bytes(b"this is not bzip2 data")
    with pytest.raises(LowbitError, match="delete it and run again"):
        parse_wiki_xml(garbage)
    truncated = tmp_path / "truncated.xml.bz2"
    truncated.write_bytes(bz2.compress(b"<mediawiki><page><title>A</title>"))
    with pytest.raises(LowbitError, match="truncated.xml.bz2 is not a readable"):
        parse_wiki_xml(truncated)


# --- split -------------------------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete() -> None:
    articles = [Article(f"Article number {i}", "text") for i in range(2000)]
    first, second = split_articles(articles), split_articles(list(articles))
    assert first == second
    assert set(first) == set(SPLITS)
    titles = {name: {a.title for a in members} for name, members in first.items()}
    assert not titles["calib"] & titles["eval"]
    assert titles["calib"] | titles["eval"] == {a.title for a in articles}
    assert sum(len(m) for m in first.values()) == len(articles)
    assert 0.17 < len(first["eval"]) / len(articles) < 0.23
    # Order within a split is the input order.
    assert first["eval"] == [a for a in articles if split_of(a.title) == "eval"]


def test_split_rule_is_pinned() -> None:
    # sha256 of the title, not hash(): the same on every run and machine. Changing these needs a new CORPUS_VERSION.
    assert [split_of(t) for t in ["Aardvark", "Harbor", "Meadow", "Zebra"]] == ["calib", "eval", "eval", "calib"]


# --- prepare_wiki ------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_prepare_wiki_writes_cached_corpus(wiki_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = prepare_wiki(quiet=True)
    assert directory == wiki_cache / "corpora" / "wiki"
    assert sorted(p.name for p in directory.iterdir()) == ["calib.jsonl", "eval.jsonl", "manifest.json"]
    calib, evals = read_jsonl(directory / "calib.jsonl"), read_jsonl(directory / "eval.jsonl")
    assert [r["title"] for r in calib] == ["Aardvark"]
    assert [r["title"] for r in evals] == ["Harbor"]
    assert evals[0]["text"].startswith("A harbor is a sheltered body of water where ships can be docked.")
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["source"] == "gensim==4.4.0"
    assert manifest["version"] == CORPUS_VERSION
    assert "sha256" in manifest["split_rule"]
    assert manifest["splits"] == {
        "calib": {"articles": 1, "chars": len(calib[0]["text"])},
        "eval": {"articles": 1, "chars": len(evals[0]["text"])},
    }
    assert [p.name for p in (wiki_cache / "corpora").iterdir()] == ["wiki"]  # no temp dirs left

    def must_not_parse(*args: object, **kwargs: object) -> list[Article]:
        raise AssertionError("the cached corpus was parsed again")

    monkeypatch.setattr(corpus, "parse_wiki_xml", must_not_parse)
    assert prepare_wiki(quiet=True) == directory
    assert load_texts("wiki", "calib") == [calib[0]["text"]]
    assert load_texts("wiki") == [evals[0]["text"]]


def test_prepare_wiki_rebuilds_a_stale_corpus(wiki_cache: Path) -> None:
    directory = prepare_wiki(quiet=True)
    (directory / "manifest.json").write_text(json.dumps({"version": CORPUS_VERSION - 1}), encoding="utf-8")
    (directory / "eval.jsonl").write_text("", encoding="utf-8")
    assert prepare_wiki(quiet=True) == directory
    assert json.loads((directory / "manifest.json").read_text(encoding="utf-8"))["version"] == CORPUS_VERSION
    assert [r["title"] for r in read_jsonl(directory / "eval.jsonl")] == ["Harbor"]
    assert [p.name for p in (wiki_cache / "corpora").iterdir()] == ["wiki"]


def test_prepare_wiki_crash_leaves_nothing(wiki_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(*args: object, **kwargs: object) -> str:
        raise OSError("No space left on device")

    monkeypatch.setattr(corpus.json, "dumps", disk_full)
    with pytest.raises(OSError, match="No space left"):
        prepare_wiki(quiet=True)
    assert list((wiki_cache / "corpora").iterdir()) == []


# --- load_texts / join_texts -------------------------------------------------------------------------------


def test_load_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    lines = [{"title": "a", "text": "First doc."}, {"text": "   "}, {"text": "Second doc.\nTwo lines."}]
    path.write_text("\n".join(json.dumps(r) for r in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n", encoding="utf-8")
    assert load_texts(str(path)) == ["First doc.", "Second doc.\nTwo lines."]
    assert load_texts(str(path), split="calib") == ["First doc.", "Second doc.\nTwo lines."]


def test_load_txt(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_bytes("\ufeffCafé au lait.\n\nSecond paragraph.\n".encode("utf-8"))
    assert load_texts(str(path)) == ["Café au lait.\n\nSecond paragraph.\n"]
    other = tmp_path / "notes.md"
    other.write_text("# Title\nbody", encoding="utf-8")
    assert load_texts(str(other)) == ["# Title\nbody"]


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("empty.txt", b"", r"empty\.txt is empty"),
        ("blank.txt", b" \n\t\n", r"blank\.txt is empty"),
        ("empty.jsonl", b"\n\n", r'empty\.jsonl has no text \(no non-empty "text" field\)'),
        ("blank.jsonl", b'{"text": ""}\n{"text": "  "}\n', r"blank\.jsonl has no text"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl, line 2: not valid JSON"),
        ("notext.jsonl", b'{"body": "x"}\n', r'notext\.jsonl, line 1: no string "text" field'),
        ("number.jsonl", b'{"text": "ok"}\n\n{"text": 5}\n', r'number\.jsonl, line 3: no string "text" field'),
        ("list.jsonl", b'["text"]\n', r"list\.jsonl, line 1: no string"),
        ("latin1.txt", "Café".encode("latin-1"), r"latin1\.txt is not UTF-8 text \(bad byte at offset 3\)"),
        ("latin1.jsonl", '{"text": "Café"}'.encode("latin-1"), r"latin1\.jsonl is not UTF-8 text"),
    ],
)
def test_load_errors(tmp_path: Path, name: str, content: bytes, pattern: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(LowbitError, match=pattern):
        load_texts(str(path))


def test_load_path_errors(tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match=r"no such corpus: '.*missing\.txt' is neither 'wiki' nor an existing file"):
        load_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(LowbitError, match="is a directory"):
        load_texts(str(tmp_path))
    path = tmp_path / "ok.txt"
    path.write_text("some text", encoding="utf-8")
    for source in ["wiki", str(path)]:  # checked before anything is read or fetched
        with pytest.raises(LowbitError, match=r"unknown split 'test'; valid splits are: calib, eval"):
            load_texts(source, split="test")


def test_join_texts() -> None:
    assert join_texts(["First article.", "Second article."]) == "First article.\n\nSecond article."
    assert join_texts(["only"]) == "only"


# --- the real corpus ---------------------------------------------------------------------------------------


@pytest.mark.asset
def test_real_wiki_corpus() -> None:
    evals, calib = load_texts("wiki", "eval"), load_texts("wiki", "calib")
    directory = prepare_wiki(quiet=True)
    titles = {name: [r["title"] for r in read_jsonl(directory / f"{name}.jsonl")] for name in SPLITS}
    assert len(evals) + len(calib) > 50
    assert len(evals) >= 5 and len(calib) > len(evals)
    assert not set(titles["eval"]) & set(titles["calib"])
    assert all(split_of(t) == name for name, ts in titles.items() for t in ts)
    text = join_texts(evals + calib)
    assert len(text) > 1_500_000
    assert text.count(" the ") > 10_000
    assert text.count(" and ") > 3_000
    for residue in ["{{", "}}", "[[", "]]", "<ref", "thumb|", "Category:", "{|", "'''"]:
        assert residue not in text, residue
