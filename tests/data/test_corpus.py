"""The bundled HER-Stream corpus: layout, hashes, splits, probes (reads the shipped files)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from herllm.acquire import corpus as data

ALL = (*data.DOMAINS, data.GENERAL)


def test_domains_fixed_order():
    assert data.DOMAINS == (
        "sotu",
        "pycode",
        "austen",
        "wordnet",
        "pgdocs",
        "kjv",
        "jargon",
        "shakespeare",
    )


def test_verify_matches_manifest():
    result = data.verify()
    assert result and all(result.values())
    assert set(result) == {
        f"{d}/{f}" for d in ALL for f in ("train.txt", "test.txt", "probes.jsonl")
    }


@pytest.mark.parametrize("domain", ALL)
def test_manifest_counts_and_sizes(domain):
    files = data.manifest()["files"]
    for split in data.SPLITS:
        docs = data.load_documents(domain, split)
        entry = files[f"{domain}/{split}.txt"]
        assert len(docs) == entry["docs"]
        assert all(d.strip() and "\x1e" not in d for d in docs)
        assert sum(len(d.encode()) for d in docs) <= entry["bytes_raw"]
    if domain != data.GENERAL:
        assert 1_200_000 <= files[f"{domain}/train.txt"]["bytes_raw"] <= 2_300_000
        assert 100_000 <= files[f"{domain}/test.txt"]["bytes_raw"] <= 400_000


@pytest.mark.parametrize("domain", ALL)
def test_no_test_document_in_train(domain):
    train = set(data.load_documents(domain, "train"))
    assert not train & set(data.load_documents(domain, "test"))


@pytest.mark.parametrize("domain", data.DOMAINS)
def test_split_is_deterministic_hash_order(domain):
    """The split is a pure function of the texts: test documents precede train ones in sha256 order."""

    def h(doc: str) -> str:
        return hashlib.sha256(doc.encode()).hexdigest()

    train_docs = data.load_documents(domain, "train")
    if domain == "pgdocs":  # the build pins the error-code appendix (errcode probes) into train
        train_docs = [
            d for d in train_docs if not d.startswith("Appendix A. PostgreSQL Error Codes")
        ]
    test = sorted(h(d) for d in data.load_documents(domain, "test"))
    train = sorted(h(d) for d in train_docs)
    assert test[-1] < train[0]


@pytest.mark.parametrize("domain", ALL)
def test_probes_well_formed(domain):
    items = data.load_probes(domain)
    assert len(items) >= 100
    ids = [it.id for it in items]
    assert len(set(ids)) == len(ids)
    for it in items:
        assert it.domain == domain
        assert len(it.choices) == 4 and len(set(it.choices)) == 4
        assert 0 <= it.answer < 4
        assert it.split in ({"general"} if domain == data.GENERAL else {"seen", "unseen"})
        assert it.prompt and not it.prompt.endswith(" ")
    answers = [it.answer for it in items]
    assert max(answers.count(k) for k in range(4)) < 0.4 * len(answers)  # answers shuffled


def test_shortcut_baselines_recorded_and_not_far_above_chance():
    shortcuts = data.manifest()["shortcuts"]
    assert set(shortcuts) == set(ALL)
    for domain, groups in shortcuts.items():
        for key, s in groups.items():
            if s["n"] >= 50:
                assert s["longest"] < 0.45, (domain, key, s)
                assert s["overlap"] < 0.45, (domain, key, s)


def test_overlap_filter_recorded():
    overlap = data.manifest()["overlap"]
    assert overlap["test_shingles"] > 0 and "by_part" in overlap


def test_manifest_records_python_version_for_pycode():
    assert data.manifest()["python_version"].count(".") == 2


def test_write_stream_dir_roundtrip(tmp_path: Path):
    out = data.write_stream_dir(tmp_path, ["jargon"])
    text = (out / "jargon" / "test.txt").read_text(encoding="utf-8")
    assert text.split(data.SEPARATOR) == data.load_documents("jargon", "test")
    first = json.loads(
        (out / "jargon" / "probes.jsonl").read_text(encoding="utf-8").splitlines()[0]
    )
    assert first["domain"] == "jargon"


def test_unknown_domain_and_split_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown corpus domain 'nope'"):
        data.load_documents("nope", "train")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        data.load_documents("kjv", "dev")


def test_corpus_dir_inside_package():
    assert data.corpus_dir().name == "her-stream"
    assert (data.corpus_dir() / "LICENSES.md").exists()
    assert sys.modules["herllm.acquire.corpus"].__file__
