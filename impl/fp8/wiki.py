"""Plain text of the Wikipedia pages in gensim's test data, for perplexity.

gensim 4.4's wheel ships ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
(206 pages of a MediaWiki XML dump). ``extract_text`` reads it with the standard library (gensim itself is never
imported) and strips wiki markup simply: templates, tables, references, files, HTML tags and comments go; links keep
their label; headings and list items keep their words. Pages are joined by blank lines, in dump order.
"""
from __future__ import annotations

import bz2
import importlib.util
import re
import xml.etree.ElementTree as ET
from pathlib import Path

DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def dump_file() -> Path | None:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / DUMP
    return path if path.exists() else None


def _drop_nested(text: str, start: str, end: str) -> str:
    """Remove balanced ``start ... end`` spans (templates {{ }}, tables {| |}), nesting included."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(start, i):
            depth += 1
            i += len(start)
        elif depth and text.startswith(end, i):
            depth -= 1
            i += len(end)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]",
                        re.I)
_LINK = re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?|ftp)://\S+\s*([^\]]*)\]")
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_TAG = re.compile(r"<[^>]+>")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)


def strip_markup(text: str) -> str:
    """Wiki markup -> plain text (see the module doc)."""
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _drop_nested(text, "{{", "}}")
    text = _drop_nested(text, "{|", "|}")
    text = _FILE_LINK.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _EXT_LINK.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = text.replace("'''", "").replace("''", "")
    text = _HEADING.sub(r"\1", text)
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.M)
    text = text.replace("&nbsp;", " ").replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    lines = [ln.strip() for ln in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def iter_pages(path: Path):
    """(title, wikitext) of every main-namespace page of a (bz2) MediaWiki XML dump."""
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as f:
        title, ns, text = None, None, None
        for _, el in ET.iterparse(f, events=("end",)):
            tag = el.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = el.text
            elif tag == "ns":
                ns = el.text
            elif tag == "text":
                text = el.text or ""
            elif tag == "page":
                if ns in (None, "0") and text and not text.lstrip().lower().startswith("#redirect"):
                    yield title, text
                title, ns, text = None, None, None
                el.clear()


def extract_text(path: Path | None = None, *, min_words: int = 30) -> str:
    """Plain text of every page with at least ``min_words`` words after stripping, blank-line separated."""
    path = path or dump_file()
    if path is None:
        raise RuntimeError("gensim is not installed (pip install gensim): its test data holds the Wikipedia pages")
    pages = []
    for title, wikitext in iter_pages(Path(path)):
        body = strip_markup(wikitext)
        if len(body.split()) >= min_words:
            pages.append(f"{title}\n\n{body}")
    return "\n\n".join(pages) + "\n"
