"""Offline access to the bundled HER-Stream corpus (src/herllm/assets/her-stream/).

The corpus ships xz-compressed inside the package; nothing here touches the
network or apt. Layout (built by ``scripts/build_corpus.py``)::

    her-stream/manifest.json            sizes, doc counts, sha256 of the uncompressed text
    her-stream/<domain>/train.txt.xz    documents joined by "\\n\\x1e\\n"
    her-stream/<domain>/test.txt.xz
    her-stream/<domain>/probes.jsonl.xz multiple-choice probes (one JSON object a line)

``<domain>`` is one of :data:`DOMAINS` or ``"general"`` (the pretraining corpus,
its held-out test split and the general sanity quiz).
"""

from __future__ import annotations

import hashlib
import json
import lzma
from dataclasses import dataclass
from functools import cache
from pathlib import Path

DOMAINS: tuple[str, ...] = (
    "sotu",
    "pycode",
    "austen",
    "wordnet",
    "pgdocs",
    "kjv",
    "jargon",
    "shakespeare",
)
"""The eight stream domains, in the default stream order."""

GENERAL = "general"
SPLITS = ("train", "test")
SEPARATOR = "\n\x1e\n"


@dataclass(frozen=True)
class ProbeItem:
    """One 4-way multiple-choice probe, scored as ``prompt + " " + choice``.

    Attributes:
        id: Stable identifier ``domain/kind/split/NNNN``.
        domain: Stream domain, or ``"general"`` for the sanity quiz.
        kind: Probe family, e.g. ``"continuation"``, ``"definition"``, ``"capital"``.
        split: ``"seen"`` (built from train documents), ``"unseen"`` (test documents)
            or ``"general"`` (sanity quiz).
        prompt: Text the model conditions on; never ends with a space.
        choices: Four distinct candidate continuations (no leading space).
        answer: Index of the correct choice in ``choices``.
    """

    id: str
    domain: str
    kind: str
    split: str
    prompt: str
    choices: tuple[str, str, str, str]
    answer: int


def corpus_dir() -> Path:
    """Directory holding the bundled corpus (``herllm/assets/her-stream``)."""
    return Path(__file__).resolve().parents[1] / "assets" / "her-stream"


def _check_domain(domain: str, allow_general: bool = True) -> None:
    allowed = DOMAINS + ((GENERAL,) if allow_general else ())
    if domain not in allowed:
        raise ValueError(f"unknown corpus domain {domain!r}; choose one of {', '.join(allowed)}")


def _read_xz(rel: str) -> str:
    path = corpus_dir() / f"{rel}.xz"
    if not path.exists():
        raise ValueError(
            f"corpus file {path} is missing; reinstall herllm or rebuild with scripts/build_corpus.py"
        )
    return lzma.decompress(path.read_bytes()).decode("utf-8")


@cache
def manifest() -> dict:
    """The corpus manifest (sizes, hashes, overlap figures, shortcut baselines)."""
    return json.loads((corpus_dir() / "manifest.json").read_text(encoding="utf-8"))


def load_text(domain: str, split: str) -> str:
    """Raw text of one split: documents joined by ``"\\n\\x1e\\n"``."""
    _check_domain(domain)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for domain {domain!r}; choose 'train' or 'test'")
    return _read_xz(f"{domain}/{split}.txt")


def load_documents(domain: str, split: str) -> list[str]:
    """Documents of ``domain`` (a stream domain or ``"general"``) for ``split`` (train/test)."""
    return load_text(domain, split).split(SEPARATOR)


def load_probes(domain: str) -> list[ProbeItem]:
    """Multiple-choice probes of a stream domain, or the sanity quiz for ``"general"``."""
    _check_domain(domain)
    items = []
    for line in _read_xz(f"{domain}/probes.jsonl").splitlines():
        row = json.loads(line)
        row["choices"] = tuple(row["choices"])
        items.append(ProbeItem(**row))
    return items


def verify(raise_on_mismatch: bool = True) -> dict[str, bool]:
    """Check every corpus file against the sha256 in the manifest; ``{file: ok}``."""
    result = {}
    for rel, entry in manifest()["files"].items():
        try:
            raw = _read_xz(rel).encode("utf-8")
        except (ValueError, lzma.LZMAError):
            result[rel] = False
            continue
        result[rel] = hashlib.sha256(raw).hexdigest() == entry["sha256"]
    bad = [rel for rel, ok in result.items() if not ok]
    if bad and raise_on_mismatch:
        raise ValueError(
            f"corpus files do not match manifest.json: {', '.join(bad)}; "
            "rebuild with scripts/build_corpus.py or reinstall herllm"
        )
    return result


def write_stream_dir(
    out_dir: str | Path, domains: tuple[str, ...] | list[str] = DOMAINS, probes: bool = True
) -> Path:
    """Materialise ``out_dir/<domain>/{train,test}.txt`` (+ ``probes.jsonl``) as plain files.

    Documents are separated by a line holding only ``\\x1e`` so that readers can
    recover whole documents; the files are ordinary UTF-8 text otherwise.
    """
    out = Path(out_dir)
    for domain in domains:
        _check_domain(domain)
        target = out / domain
        target.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            (target / f"{split}.txt").write_text(load_text(domain, split), encoding="utf-8")
        if probes:
            (target / "probes.jsonl").write_text(
                _read_xz(f"{domain}/probes.jsonl"), encoding="utf-8"
            )
    return out
