"""Build the HER-Stream corpus into src/herllm/assets/her-stream/ (see docs/corpus.md).

Run as root (it calls ``apt-get download``; nothing is installed):

    python scripts/build_corpus.py [--src build/corpus-src] [--out src/herllm/assets/her-stream]

Steps: fetch the packages, read each source into whole documents, split each
stream domain by a hash of the document text (test first, then train, up to
the size targets), drop general paragraphs that share a 13-word shingle with
any stream test split, carve a held-out general test set, build the probes,
measure shortcut baselines, and write xz files, manifest.json and LICENSES.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import re
from collections import Counter
from pathlib import Path

import corpus_probes as cp
import corpus_sources as cs

SEP = "\n\x1e\n"  # document separator in the .txt files
TRAIN_BYTES, TEST_BYTES = 2_000_000, 150_000
GENERAL_TEST_BYTES = 300_000
GENERAL_BUDGET = {  # bytes per general part, so that the corpus lands near 22 MB
    "python-docs": 7_000_000, "treasury-of-david": 5_000_000, "matthew-henry": 4_000_000,
    "sqlite-docs": 3_000_000, "nave": 1_500_000, "milton": 1_500_000, "scofield": 900_000,
    "devils-dictionary": 500_000, "dhammapada": 100_000,
}  # fmt: skip
SHINGLE = 13
READERS = {
    "sotu": cs.read_sotu, "pycode": cs.read_pycode, "austen": cs.read_austen,
    "wordnet": cs.read_wordnet, "pgdocs": cs.read_pgdocs, "kjv": cs.read_kjv,
    "jargon": cs.read_jargon, "shakespeare": cs.read_shakespeare,
}  # fmt: skip
PROBES = {
    "sotu": [cp.sotu_president], "pycode": [cp.pycode_docstring], "austen": [cp.austen_character],
    "wordnet": [cp.wordnet_definition], "pgdocs": [cp.pgdocs_items], "kjv": [cp.kjv_book],
    "jargon": [lambda d, s: cp.lookup("jargon", "definition",
               [(sp, x.meta["term"], x.meta["first"]) for sp, x in d],
               'In the Jargon File, "{term}" means:', s)],
    "shakespeare": [cp.shakespeare_play],
}  # fmt: skip


def doc_hash(text: str) -> str:
    """The split key: sha256 of the document text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_docs(docs: list[cs.Doc], test_bytes: int, train_bytes: int, pin: set[str] = frozenset()):
    """Order unique documents by hash; fill test, then train. ``pin``ned pages go to train first."""
    uniq = {doc_hash(d.text): d for d in docs}
    order = sorted(uniq, key=lambda h: (uniq[h].meta.get("page") not in pin, h))
    test, train, nt, nr = [], [], 0, 0
    for h in order:
        d, size = uniq[h], len(uniq[h].text.encode())
        if uniq[h].meta.get("page") not in pin and nt < test_bytes:
            test.append(d)
            nt += size
        elif nr < train_bytes:
            train.append(d)
            nr += size
    return train, test


def shingles(text: str) -> set[int]:
    """Hashes of all 13-word windows of the lower-cased word sequence."""
    w = cp.words(text)
    return {hash(" ".join(w[i : i + SHINGLE])) for i in range(len(w) - SHINGLE + 1)}


def filter_general(docs: list[cs.Doc], banned: set[int]) -> tuple[list[cs.Doc], dict]:
    """Drop exact-duplicate paragraphs and paragraphs sharing a shingle with a stream test split."""
    seen: set[str] = set()
    stats: dict[str, Counter] = {}
    out = []
    for d in docs:
        st = stats.setdefault(d.meta["part"], Counter())
        kept = []
        for para in d.text.split("\n\n"):
            size = len(para.encode())
            st["paragraphs"] += 1
            st["bytes_in"] += size
            if para in seen:
                st["dup_paragraphs"] += 1
                continue
            seen.add(para)
            if shingles(para) & banned:
                st["overlap_paragraphs"] += 1
                st["overlap_bytes"] += size
                continue
            kept.append(para)
        if kept:
            out.append(cs.Doc("\n\n".join(kept), d.meta))
    return out, {k: dict(v) for k, v in stats.items()}


def budget_general(docs: list[cs.Doc]) -> list[cs.Doc]:
    """Keep each part up to its byte budget, in hash order (deterministic)."""
    used: Counter = Counter()
    out = []
    for d in sorted(docs, key=lambda d: doc_hash(d.text)):
        part = d.meta["part"]
        if used[part] < GENERAL_BUDGET[part]:
            used[part] += len(d.text.encode())
            out.append(d)
    return out


def write_xz(path: Path, text: str) -> dict:
    """Write ``text`` xz-compressed; return its manifest entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = text.encode("utf-8")
    path.write_bytes(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
    return {
        "bytes_raw": len(raw),
        "bytes_xz": path.stat().st_size,
        "sha256": hashlib.sha256(raw).hexdigest(),
    }


def write_docs(path: Path, docs: list[cs.Doc]) -> dict:
    """Write documents joined by the record separator line."""
    entry = write_xz(path, SEP.join(d.text for d in docs))
    return {**entry, "docs": len(docs)}


def write_probes(path: Path, items: list[dict]) -> dict:
    """Write probe items as JSON lines."""
    entry = write_xz(path, "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
    return {
        **entry,
        "items": len(items),
        "kinds": dict(Counter(f"{i['kind']}/{i['split']}" for i in items)),
    }


def build_stream(src: Path, out: Path, manifest: dict) -> set[int]:
    """Write every stream domain; return the shingles of all test splits."""
    banned: set[int] = set()
    for seed, (domain, reader) in enumerate(READERS.items()):
        docs = [d for d in reader(src) if len(d.text) >= 20]
        train, test = split_docs(docs, TEST_BYTES, TRAIN_BYTES, pin={"errcodes-appendix"})
        for d in test:
            banned |= shingles(d.text)
        tagged = [("seen", d) for d in train] + [("unseen", d) for d in test]
        items = cp.continuation(domain, tagged, seed)
        for builder in PROBES[domain]:
            items += builder(tagged, seed + 100)
        manifest["files"][f"{domain}/train.txt"] = write_docs(out / domain / "train.txt.xz", train)
        manifest["files"][f"{domain}/test.txt"] = write_docs(out / domain / "test.txt.xz", test)
        manifest["files"][f"{domain}/probes.jsonl"] = write_probes(
            out / domain / "probes.jsonl.xz", items
        )
        manifest["shortcuts"][domain] = cp.shortcut_baselines(items)
        manifest["available_docs"][domain] = len(docs)
        print(
            f"{domain}: {len(docs)} docs -> train {len(train)}, test {len(test)}, probes {len(items)}"
        )
    return banned


def build_general(src: Path, out: Path, manifest: dict, banned: set[int]) -> None:
    """Write the general corpus (overlap-filtered), its held-out test split and the sanity quiz."""
    docs, stats = filter_general(budget_general(cs.read_general(src)), banned)
    train, test = split_docs(docs, GENERAL_TEST_BYTES, 10**12)
    manifest["overlap"] = {
        "rule": f"general paragraphs sharing a {SHINGLE}-word shingle with any stream test split are dropped",
        "test_shingles": len(banned), "by_part": stats,
        "dropped_paragraphs": sum(s.get("overlap_paragraphs", 0) for s in stats.values()),
        "dropped_bytes": sum(s.get("overlap_bytes", 0) for s in stats.values()),
    }  # fmt: skip
    manifest["general_parts"] = dict(Counter(d.meta["part"] for d in train))
    quiz = cp.general_quiz(src / "x/bsdgames/usr/share/games/bsdgames/quiz", seed=7)
    manifest["files"]["general/train.txt"] = write_docs(out / "general/train.txt.xz", train)
    manifest["files"]["general/test.txt"] = write_docs(out / "general/test.txt.xz", test)
    manifest["files"]["general/probes.jsonl"] = write_probes(out / "general/probes.jsonl.xz", quiz)
    manifest["shortcuts"]["general"] = cp.shortcut_baselines(quiz)
    print(f"general: train {len(train)} docs, test {len(test)} docs, quiz {len(quiz)}")


def main() -> None:
    """Fetch, build and write the corpus."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, default=Path("build/corpus-src"))
    ap.add_argument("--out", type=Path, default=Path("src/herllm/assets/her-stream"))
    args = ap.parse_args()
    versions = cs.fetch(args.src)
    manifest: dict = {"format": 1, "separator": "\\n\\x1e\\n", "python_version": cs.python_version(),
                      "source_versions": versions, "files": {}, "shortcuts": {}, "available_docs": {}}  # fmt: skip
    banned = build_stream(args.src, args.out, manifest)
    build_general(args.src, args.out, manifest, banned)
    manifest["total_bytes_xz"] = sum(f["bytes_xz"] for f in manifest["files"].values())
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    (args.out / "LICENSES.md").write_text(licenses(args.src, versions))
    print(f"total xz: {manifest['total_bytes_xz'] / 1e6:.2f} MB")


def licenses(src: Path, versions: dict) -> str:
    """LICENSES.md: each source with its notice (Debian copyright files quoted where they exist)."""
    from corpus_licenses import NOTICES

    parts = ["# HER-Stream corpus: sources and licenses\n"]
    quoted: set[str] = set()
    for title, (pkg, notice) in NOTICES.items():
        parts.append(f"## {title}\n\nSource: {pkg} {versions.get(pkg, '')}\n\n{notice.strip()}\n")
        copyright_file = src / f"x/{pkg}/usr/share/doc/{pkg}/copyright"
        if pkg in quoted:
            parts.append(f"(Debian copyright file of {pkg}: quoted above.)\n")
        elif copyright_file.exists():
            quoted.add(pkg)
            text = copyright_file.read_text(encoding="utf-8", errors="replace")
            text = re.sub(r"\n{3,}", "\n\n", text).strip()
            parts.append("Debian copyright file:\n\n```\n" + text + "\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    main()
