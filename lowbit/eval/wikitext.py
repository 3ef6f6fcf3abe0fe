"""MediaWiki markup to plain prose, for the default ``wiki`` corpus (see ``lowbit.eval.corpus``).

Kept apart from corpus.py so that reading an already prepared corpus needs no wikitext parser:
``mwparserfromhell`` is only imported when the corpus is built.
"""

from __future__ import annotations

import re

import mwparserfromhell
from mwparserfromhell.nodes import Node, Tag, Template, Text, Wikilink
from mwparserfromhell.wikicode import Wikicode

_APPENDIX = re.compile(r"^==(?!=)\s*(?:See also|References|External links|Further reading|Notes|Notes and references"
                       r"|Footnotes|Citations|Sources|Bibliography)\s*(?<!=)==\s*$", re.IGNORECASE | re.MULTILINE)
# Cut before parsing: comments and <ref> notes (the parser leaves refs with unbalanced '' as text).
_PRE_STRIP = re.compile(r"<!--.*?-->|<ref(?:\s[^>]*)?/>|<ref(?:\s[^>]*)?>.*?</ref\s*>", re.IGNORECASE | re.DOTALL)
_NONPROSE_LINKS = ("file:", "image:", "media:", "category:")
_NONPROSE_TAGS = frozenset({"ref", "references", "table", "gallery"})
_INLINE_TEMPLATES = frozenset({"lang", "nowrap", "nobr", "small", "transl"})  # shown text = last positional
_RANGE_WORDS = frozenset({"-", "–", "to", "and", "or", "by", "x", "×", "+/-", "±"})
# Residue lines of image captions ("thumb|right|..."), category links and unparsed tables ("|", "!").
_JUNK_LINE = re.compile(r"^(?:thumb(?:nail)?\||(?:left|right|center|upright)\||\d+px\||(?:\[\[)?"
                        r"(?:category|file|image):|\{\||\|\}|\||!(?:\s|!|\w+\s*=)|\{\{|\}\})", re.IGNORECASE)
_LINE_FIXES = [  # tags the parser left as text; what removed templates leave inside brackets
    (re.compile(r"</?(?:ref|references|blockquote|br|small|big|sup|sub|span|div|center|poem)\b[^<>]*>", re.I), ""),
    (re.compile(r"\{\{[^{}]*\}\}"), ""),  # a template the parser left as text
    (re.compile(r"\(\s*[;,]?\s*\)"), ""),  # "()" / "( ; )"
    (re.compile(r"\(\s*[;,]?\s+"), "("),  # "( ; Orycteropus afer)" -> "(Orycteropus afer)"
    (re.compile(r"\s+\)"), ")"),
    (re.compile(r" {2,}"), " "),
    (re.compile(r"'{2,}(?=s\b)"), "'"),  # ''Iliad'''s (italics, then an apostrophe) -> Iliad's
    (re.compile(r"'{2,}"), ""),  # bold/italic quotes the parser left unbalanced
]



def _template_text(template: Template) -> str | None:
    """The visible text of templates whose text matters to a sentence, else None (dropped)."""
    name = str(template.name).strip().lower().replace("_", " ")
    args = [str(p.value).strip() for p in template.params if not p.showkey]
    if name in ("convert", "cvt") and len(args) >= 2:  # {{convert|5|to|8|km}} -> "5 to 8 km"
        return " ".join(args[:4] if len(args) >= 4 and args[1] in _RANGE_WORDS else args[:2])
    if name == "as of" and args:  # {{As of|2010|5}} -> "As of 2010"
        return f"As of {args[0]}"
    if name.startswith("formatnum:"):  # {{formatnum: 3003}} -> "3003"
        return name.split(":", 1)[1].strip()
    if name in _INLINE_TEMPLATES and args:
        return str(mwparserfromhell.parse(args[-1]).strip_code())
    return None


def _drop_nonprose(code: Wikicode) -> None:
    """Drop media/category links, notes and tables; render convert-like templates (one O(n) pass)."""
    kept: list[Node] = []
    for node in code.nodes:
        if isinstance(node, Wikilink) and str(node.title).strip().lower().startswith(_NONPROSE_LINKS):
            continue
        if isinstance(node, Tag) and str(node.tag).strip().lower() in _NONPROSE_TAGS:
            continue
        if isinstance(node, Template):  # strip_code() drops templates: only rendered ones survive
            text = _template_text(node)
            if text is not None:
                kept.append(Text(text))
            continue
        for child in node.__children__():
            _drop_nonprose(child)
        kept.append(node)
    code.nodes = kept


def clean_wikitext(wikitext: str) -> str:
    """Turn one article's wikitext into plain prose (see the module docstring for the rules)."""
    wikitext = wikitext[: appendix.start()] if (appendix := _APPENDIX.search(wikitext)) else wikitext
    code = mwparserfromhell.parse(_PRE_STRIP.sub("", wikitext))
    _drop_nonprose(code)
    lines: list[str] = []
    for line in code.strip_code(normalize=True, collapse=True).splitlines():
        for pattern, repl in _LINE_FIXES:
            line = pattern.sub(repl, line)
        line = line.strip()
        if not _JUNK_LINE.match(line):
            lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
