"""Low-level readers for the HER-Stream source formats (used by corpus_sources.py).

HTML pages -> text, R lazy-load databases (.rdx/.rdb), dictd dictionaries
(.index + .dict.dz) and SWORD modules exported with ``mod2imp``.
"""

from __future__ import annotations

import gzip
import html
import os
import re
import subprocess
import warnings
import zlib
from html.parser import HTMLParser
from pathlib import Path


def clean(text: str) -> str:
    """Normalise newlines, drop the record separator we use between documents, trim blank runs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x1e", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ----------------------------------------------------------------------------- HTML


class _HTMLText(HTMLParser):
    """HTML -> plain text; skips navigation blocks, scripts and styles."""

    BLOCK = {"p", "div", "br", "h1", "h2", "h3", "h4", "li", "tr", "pre", "dt", "dd", "table"}
    SKIP_CLASS = {"navheader", "navfooter", "menu", "nosearch"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0  # nesting depth of skip_tag inside a skipped element
        self.skip_tag = ""
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        cls = set((dict(attrs).get("class") or "").split())
        if self.skip:
            self.skip += tag == self.skip_tag  # count only the skipped tag: HTML leaves <p> open
        elif tag in {"script", "style"} or cls & self.SKIP_CLASS:
            self.skip, self.skip_tag = 1, tag
        elif tag == "title":
            self._in_title = True
        elif tag in self.BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if self.skip:
            self.skip -= tag == self.skip_tag
        elif tag == "title":
            self._in_title = False
        elif tag in self.BLOCK:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif not self.skip:
            self.out.append(data)


def html_to_text(raw: str) -> tuple[str, str]:
    """Return (title, text) of an HTML page."""
    parser = _HTMLText()
    parser.feed(raw)
    text = "".join(parser.out).replace("\xa0", " ")
    paras = [re.sub(r"[ \t]+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
    body = "\n\n".join(" ".join(p.split("\n")) if "  " not in p else p for p in paras if p)
    return parser.title.replace("\xa0", " ").strip(), clean(body)


def read_rdb_object(rdata, base: Path, name: str) -> list[str]:
    """Read one character vector from an R lazy-load database (.rdx index + .rdb blobs)."""

    def unpack(blob: bytes) -> bytes:
        return zlib.decompress(blob[4:])  # 4-byte big-endian length, then zlib stream

    rdx = gzip.decompress(base.with_suffix(".rdx").read_bytes())
    with warnings.catch_warnings():  # the .rdx has no RDS magic; rdata warns, then reads it
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_data(rdx))
    start, length = (int(v) for v in index["variables"][name])
    with open(base.with_suffix(".rdb"), "rb") as fh:
        fh.seek(start)
        blob = unpack(fh.read(length))
    obj = rdata.conversion.convert(rdata.parser.parse_data(blob, expand_altrep=True))
    return [str(v) if v is not None else "" for v in list(obj)]


def read_dictd(src: Path, package: str, name: str) -> list[tuple[str, str]]:
    """Read a dictd dictionary: [(headword, entry text)] in index order."""
    base = src / f"x/{package}/usr/share/dictd/{name}"
    data = gzip.open(f"{base}.dict.dz").read()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def b64(s: str) -> int:
        v = 0
        for ch in s:
            v = v * 64 + alphabet.index(ch)
        return v

    entries = []
    for line in Path(f"{base}.index").read_text(encoding="utf-8").split("\n"):
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database"):
            continue
        off, ln = b64(parts[1]), b64(parts[2])
        entries.append((parts[0], data[off : off + ln].decode("utf-8", "replace")))
    return entries


def sword_export(src: Path, module: str) -> list[tuple[str, str]]:
    """Export a SWORD module with ``mod2imp`` (from the extracted libsword-utils): [(key, text)]."""
    x = src.resolve() / "x"
    sword = src.resolve() / "sword"
    (sword / "mods.d").mkdir(parents=True, exist_ok=True)
    for pkg in ("sword-comm-tdavid", "sword-comm-mhcc", "sword-comm-scofield", "sword-dict-naves"):
        subprocess.run(["cp", "-r", f"{x / pkg}/usr/share/sword/.", str(sword)], check=True)
    env = dict(os.environ, SWORD_PATH=str(sword))
    libs = [str(p) for p in (x / "libsword1.9.0").glob("usr/lib/*")]
    libs += [str(p) for p in (x / "libclucene-core1v5").glob("usr/lib/*")]
    env["LD_LIBRARY_PATH"] = ":".join(libs)
    out = subprocess.run(
        [str(x / "libsword-utils/usr/bin/mod2imp"), module],
        capture_output=True, env=env, cwd=sword, check=True,
    ).stdout.decode("utf-8", "replace")  # fmt: skip
    entries = []
    for chunk in out.split("$$$")[1:]:
        key, _, body = chunk.partition("\n")
        body = re.sub(r"<(?:div|p|br|lb)\b[^>]*>", "\n", body)  # keep paragraph breaks
        body = re.sub(r"<[^>]+>", " ", body)
        body = html.unescape(body).replace("Error reading ulCompOffset", "")
        body = re.sub(r"[ \t]+", " ", body)
        body = re.sub(r"\n\s*\n?\s*", "\n", body).strip()
        if len(body) > 20:
            entries.append((key.strip(), body))
    return entries


def dedupe_sentences(lines: list[str], seen: set[str]) -> list[str]:
    """Drop sentences already in ``seen``; keep the paragraphs that still have text."""
    out = []
    for line in lines:
        kept = []
        for sent in re.split(r"(?<=[.!?])\s+", line.strip()):
            if sent not in seen:
                seen.add(sent)
                kept.append(sent)
        if kept:
            out.append(" ".join(kept))
    return out
