"""Text for kvstitch: gensim's news articles and Wikipedia pages, turned into fixed-length token tasks.

Sources (shipped in gensim's wheel, ``gensim/test/test_data``): ``lee_background.cor`` (300 news articles, one per
line, latin-1) and a shortened enwiki XML dump (lead = text before the first ``==`` heading). Tasks:

* news continuation: prompt = the first ``prompt_len`` tokens of a held-out article, reference = the next
  ``new_tokens`` tokens (decoded back to text);
* wiki summary: prompt = instruction + the page body cut so the prompt is exactly ``prompt_len`` tokens, reference =
  the lead section.

Every prompt of a task has the same length, so batches need no padding (which keeps the stitched cache simple).
Training text (healing, stage (a), stage (b)) never includes a held-out article or page.
"""
from __future__ import annotations

import bz2
import hashlib
import html
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

NEWS_FILE = "lee_background.cor"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SUMMARY_INSTRUCTION = "Summarize the following article in two or three sentences.\n\n"


def gensim_data_dir() -> Path:
    """``gensim/test/test_data`` of the installed gensim (``pip install gensim``)."""
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("gensim is not installed: `pip install gensim` (its wheel ships the text), or pass "
                                  "--text DIR with files written by `python -m impl.kvstitch.prepare text`")
    return Path(spec.origin).parent / "test" / "test_data"


def read_news(path: Path) -> list[str]:
    """One article per line, latin-1."""
    return [line.strip() for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]


# ---- wikitext -> plain text ------------------------------------------------------------------------------------

def _strip_nested(text: str, pattern: str) -> str:
    prev = None
    while prev != text:
        prev, text = text, re.sub(pattern, "", text, flags=re.S)
    return text


def _drop_balanced(text: str, starts: tuple[str, ...], opener: str, closer: str) -> str:
    """Remove every span that begins with one of ``starts`` up to its matching ``closer`` (nesting counted)."""
    out, i = [], 0
    while True:
        hits = [j for j in (text.find(s, i) for s in starts) if j >= 0]
        if not hits:
            return "".join(out) + text[i:]
        j = min(hits)
        out.append(text[i:j])
        depth, k = 0, j
        while k < len(text):
            if text.startswith(opener, k):
                depth, k = depth + 1, k + len(opener)
            elif text.startswith(closer, k):
                depth, k = depth - 1, k + len(closer)
                if depth == 0:
                    break
            else:
                k += 1
        i = k


def clean_wikitext(text: str) -> str:
    """Plain text of wikitext: drops refs, comments, templates, tables, files/categories; keeps link labels."""
    text = html.unescape(text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = _strip_nested(text, r"\{\{[^{}]*\}\}")
    text = _strip_nested(text, r"\{\|(?:(?!\{\|).)*?\|\}")
    text = re.sub(r"<math[^>]*>.*?</math>", "", text, flags=re.S)
    text = _drop_balanced(text, ("[[File:", "[[Image:", "[[Category:"), "[[", "]]")
    text = re.sub(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\s([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\]", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    lines = [ln.strip() for ln in text.splitlines()]
    keep = [ln for ln in lines if ln and not ln.startswith(("|", "!", "{", "}", "*", "#", ":", ";"))]
    return "\n".join(keep)


def split_lead(text: str) -> tuple[str, str]:
    """(lead, body) of cleaned page text: the lead ends at the first ``== heading ==``; headings leave the body."""
    parts = re.split(r"^==.*?==\s*$", text, maxsplit=1, flags=re.M)
    lead = parts[0].strip()
    body = re.sub(r"^=+.*?=+\s*$", "", parts[1], flags=re.M) if len(parts) > 1 else ""
    norm = lambda s: re.sub(r"\s+", " ", s).strip()  # noqa: E731
    return norm(lead), norm(body)


def read_wiki(path: Path) -> list[dict]:
    """Main-namespace, non-redirect pages as ``{"title", "lead", "body"}``."""
    pages = []
    with bz2.open(path, "rb") as f:
        for _, el in ET.iterparse(f):
            if not el.tag.endswith("page"):
                continue
            get = lambda name: next((c for c in el.iter() if c.tag.endswith(name)), None)  # noqa: E731,B023
            ns, text, title = get("ns"), get("text"), get("title")
            if ns is not None and ns.text == "0" and get("redirect") is None and text is not None and text.text:
                lead, body = split_lead(clean_wikitext(text.text))
                pages.append({"title": title.text if title is not None else "", "lead": lead, "body": body})
            el.clear()
    return pages


# ---- the prepared text directory --------------------------------------------------------------------------------

@dataclass
class TextSplits:
    """Held-out and training text. ``wiki_eval`` pages have a lead >= 30 words and a body >= 300 words."""

    news_train: list[str]
    news_eval: list[str]
    wiki_train: list[str]
    wiki_eval: list[dict]


def _stable_order(items: list, key) -> list:
    return sorted(items, key=lambda x: hashlib.sha1(key(x).encode()).hexdigest())


def make_splits(news: list[str], wiki: list[dict], news_eval: int = 60, wiki_eval: int = 40) -> TextSplits:
    """Deterministic split: the last ``news_eval`` articles; ``wiki_eval`` qualifying pages in hash order."""
    good = [p for p in wiki if len(p["lead"].split()) >= 30 and len(p["body"].split()) >= 300]
    held = _stable_order(good, lambda p: p["title"])[:wiki_eval]
    titles = {p["title"] for p in held}
    wiki_train = [p["lead"] + "\n" + p["body"] for p in wiki if p["title"] not in titles and p["body"]]
    return TextSplits(news[:-news_eval], news[-news_eval:], wiki_train, held)


def write_text_dir(out: Path, splits: TextSplits) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("news_train", "news_eval", "wiki_train", "wiki_eval"):
        rows = getattr(splits, name)
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def read_text_dir(d: Path) -> TextSplits:
    """Load a directory written by :func:`write_text_dir` (what ``prepare text`` ships to the GPU machine)."""
    rows = {}
    for name in ("news_train", "news_eval", "wiki_train", "wiki_eval"):
        p = Path(d) / f"{name}.jsonl"
        if not p.exists():
            raise FileNotFoundError(f"{p} missing: write it with `python -m impl.kvstitch.prepare text --out {d}`")
        rows[name] = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return TextSplits(**rows)


def load_splits(text_dir: str | Path | None = None) -> TextSplits:
    """From a prepared dir, else straight from the installed gensim."""
    if text_dir is not None:
        return read_text_dir(Path(text_dir))
    d = gensim_data_dir()
    return make_splits(read_news(d / NEWS_FILE), read_wiki(d / WIKI_FILE))


# ---- tokenised tasks ----------------------------------------------------------------------------------------------

class ByteCodec:
    """A byte-level stand-in tokenizer (ids 3..258 = bytes) for tiny random models in tests and smoke runs."""

    vocab_size, bos_id, eos_id = 259, 1, 2

    def encode(self, text: str) -> list[int]:
        return [self.bos_id] + [b + 3 for b in text.encode("utf-8")]

    def encode_plain(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")

    def prompt_parts(self, instruction: str) -> tuple[list[int], list[int]]:
        return self.encode(instruction), self.encode_plain("\n\nSummary:")


class HFCodec:
    """The same four calls over a Hugging Face tokenizer (chat template for the summary prompt where it has one)."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.vocab_size = len(tok)
        self.eos_id = tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok(text).input_ids

    def encode_plain(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def prompt_parts(self, instruction: str) -> tuple[list[int], list[int]]:
        marker = "\u2063BODY\u2063"
        if getattr(self.tok, "chat_template", None):
            s = self.tok.apply_chat_template([{"role": "user", "content": instruction + marker}], tokenize=False,
                                             add_generation_prompt=True)
            pre, post = s.split(marker)
            return self.encode_plain(pre), self.encode_plain(post)
        return self.encode(instruction), self.encode_plain("\n\nTL;DR:")


@dataclass
class Task:
    """Equal-length prompts ``[N, prompt_len]`` and their reference texts; for continuation tasks also the reference
    tokens ``[N, new_tokens]`` (what held-out loss is measured on)."""

    name: str
    prompts: torch.Tensor
    references: list[str]
    continuations: torch.Tensor | None = None


def news_task(codec, articles: list[str], prompt_len: int, new_tokens: int, limit: int, stride: int = 0) -> Task:
    """Continuation: the article's tokens from ``s`` (``prompt_len`` in all, after the tokenizer's special prefix such
    as BOS, which every window keeps) -> reference = text of the next ``new_tokens`` tokens; ``s = 0`` only (``stride``
    0) or every ``s = 0, stride, 2 stride, ...`` that leaves a full reference (more, overlapping, examples from the
    same held-out articles)."""
    if stride < 0:
        raise ValueError(f"stride must be >= 0, got {stride}")
    prompts, refs, conts = [], [], []
    for a in articles:
        ids, plain = codec.encode(a), codec.encode_plain(a)
        head = ids[:len(ids) - len(plain)] if ids[len(ids) - len(plain):] == plain else []
        body, room = ids[len(head):], prompt_len - len(head)
        last = len(body) - room - new_tokens
        for s in range(0, last + 1, stride or max(last + 1, 1)):
            prompts.append(head + body[s:s + room])
            conts.append(body[s + room:s + room + new_tokens])
            refs.append(codec.decode(conts[-1]))
            if len(prompts) == limit:
                break
        if len(prompts) == limit:
            break
    return Task("news", torch.tensor(prompts, dtype=torch.long).view(-1, prompt_len), refs,
                torch.tensor(conts, dtype=torch.long).view(-1, new_tokens))


def wiki_task(codec, pages: list[dict], prompt_len: int, limit: int) -> Task:
    """Summary: [instruction prefix] + body cut to fit + [suffix], exactly ``prompt_len`` tokens; reference = lead."""
    pre, post = codec.prompt_parts(SUMMARY_INSTRUCTION)
    room = prompt_len - len(pre) - len(post)
    if room < 16:
        raise ValueError(f"prompt_len {prompt_len} leaves {room} tokens for the article after the instruction")
    prompts, refs = [], []
    for p in pages:
        body = codec.encode_plain(p["body"])
        if len(body) >= room:
            prompts.append(pre + body[:room] + post)
            refs.append(p["lead"])
        if len(prompts) == limit:
            break
    return Task("wiki", torch.tensor(prompts, dtype=torch.long).view(-1, prompt_len), refs)


def token_stream(codec, texts: list[str]) -> torch.Tensor:
    """All training texts as one 1-D int64 stream, separated by EOS."""
    ids: list[int] = []
    for t in texts:
        ids.extend(codec.encode(t))
        ids.append(codec.eos_id)
    return torch.tensor(ids, dtype=torch.long)


def train_texts(splits: TextSplits) -> list[str]:
    return [*splits.news_train, *splits.wiki_train]


def random_chunks(stream: torch.Tensor, batch: int, seq_len: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless ``[batch, seq_len]`` crops of ``stream`` at random offsets (reproducible from ``seed``)."""
    if len(stream) <= seq_len:
        raise ValueError(f"training text has {len(stream)} tokens, fewer than one sequence of {seq_len}")
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(stream) - seq_len, (batch,), generator=g)
        yield torch.stack([stream[s:s + seq_len] for s in starts.tolist()])
