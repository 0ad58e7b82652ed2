"""Split a document into passages of about 100-200 words at paragraph and sentence boundaries.

Sizes: at most ``max_words``, except that a last passage under ``min_words / 2`` joins the
one before (so at most ``max_words + min_words / 2``); a sentence longer than ``max_words`` is
cut between words.

Every passage is an exact slice of the document: ``text[p.start:p.end] == p.text``, so its
provenance (document id, character offsets) can always be checked against the source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from herllm.errors import UserError

# A sentence ends at . ! or ? (plus closing quotes/brackets) followed by whitespace.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(?=\s)")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Passage:
    """One slice of a document."""

    text: str
    start: int
    """Character offset of the first character in the document."""
    end: int
    """Character offset one past the last character."""


def _strip(text: str, start: int, end: int) -> tuple[int, int] | None:
    """The span without leading/trailing whitespace, or None when only whitespace."""
    piece = text[start:end]
    left = len(piece) - len(piece.lstrip())
    right = len(piece.rstrip())
    return (start + left, start + right) if right > left else None


def _paragraphs(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for m in _PARAGRAPH_BREAK.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    return [s for s in (_strip(text, a, b) for a, b in spans) if s]


def _sentences(text: str, start: int, end: int, max_words: int) -> list[tuple[int, int, int]]:
    """(start, end, words) of each sentence; a sentence over max_words is cut by words."""
    cuts = [start] + [m.end() for m in _SENTENCE_END.finditer(text, start, end)] + [end]
    out = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        span = _strip(text, a, b)
        if span is None:
            continue
        words = [(m.start(), m.end()) for m in _WORD.finditer(text, *span)]
        for i in range(0, len(words), max_words):
            chunk = words[i : i + max_words]
            out.append((chunk[0][0], chunk[-1][1], len(chunk)))
    return out


def split_passages(text: str, min_words: int = 100, max_words: int = 200) -> list[Passage]:
    """Greedy packing of sentences up to ``max_words``; a paragraph end closes a passage
    once it has ``min_words``; a short tail (< min_words / 2) joins the passage before."""
    if not 0 < min_words <= max_words:
        raise UserError(
            f"passage sizes min_words={min_words}, max_words={max_words}: need 0 < min <= max"
        )
    spans: list[list[int]] = []  # [start, end, words]
    open_span: list[int] | None = None
    for p_start, p_end in _paragraphs(text):
        for s_start, s_end, words in _sentences(text, p_start, p_end, max_words):
            if open_span is not None and open_span[2] + words > max_words:
                open_span = None
            if open_span is None:
                open_span = [s_start, s_end, 0]
                spans.append(open_span)
            open_span[1], open_span[2] = s_end, open_span[2] + words
        if open_span is not None and open_span[2] >= min_words:
            open_span = None
    if len(spans) > 1 and spans[-1][2] < min_words // 2:
        tail = spans.pop()
        spans[-1][1], spans[-1][2] = tail[1], spans[-1][2] + tail[2]
    return [Passage(text[a:b], a, b) for a, b, _ in spans]
