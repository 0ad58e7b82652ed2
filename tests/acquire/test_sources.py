import io
import json

import pytest

from herllm.acquire.sources import BadInputError, SourceStats, read_documents


def docs_of(*sources, **kw):
    return list(read_documents([str(s) for s in sources], **kw))


def test_text_records_get_stable_ids(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first doc\n\x1e\nsecond doc\n\x1e\n\n")
    docs = docs_of(f)
    assert [d.text for d in docs] == ["first doc", "second doc"]
    assert [d.doc_id for d in docs] == [f"{f}#0", f"{f}#1"]
    assert [d.doc_id for d in docs_of(f)] == [d.doc_id for d in docs]


def test_file_without_separator_is_one_document(tmp_path):
    f = tmp_path / "plain.md"
    f.write_text("line one\n\nline two\n")
    assert [d.text for d in docs_of(f)] == ["line one\n\nline two\n"]


def test_directory_recursive_sorted_with_globs(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("b")
    (tmp_path / "d" / "sub" / "a.txt").write_text("a")
    (tmp_path / "d" / "skip.log").write_text("no")
    (tmp_path / "d" / "drafts.txt").write_text("draft")
    docs = docs_of(tmp_path / "d", include=["*.txt"], exclude=["drafts*"])
    assert [d.doc_id for d in docs] == ["d/b.txt#0", "d/sub/a.txt#0"]


def test_jsonl_text_and_prompt_response(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text(
        json.dumps({"text": "hello"})
        + "\n\n"
        + json.dumps({"prompt": "Q?", "response": "A."})
        + "\n"
    )
    docs = docs_of(f)
    assert docs[0].doc_id == f"{f}:1" and docs[0].response is None
    assert docs[1].doc_id == f"{f}:3" and (docs[1].text, docs[1].response) == ("Q?", "A.")


def test_stdin_documents(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("one\ntwo\n\x1e\nthree\n"))
    docs = docs_of("-")
    assert [(d.doc_id, d.text) for d in docs] == [("stdin#0", "one\ntwo"), ("stdin#1", "three")]


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda p: p / "missing.txt", r"missing.txt does not exist"),
        (
            lambda p: _write(p / "bin.txt", b"abc\x00\x01def"),
            r"bin.txt looks binary \(NUL byte at offset 3\)",
        ),
        (
            lambda p: _write(p / "latin.txt", "caf\u00e9".encode("latin-1")),
            r"latin.txt is not valid UTF-8 \(byte offset 3\)",
        ),
        (
            lambda p: _write(p / "bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n'),
            r"bad.jsonl:2: not valid JSON",
        ),
        (
            lambda p: _write(p / "nofield.jsonl", b'{"body": "x"}\n'),
            r"nofield.jsonl:1: needs a string 'text' field",
        ),
    ],
)
def test_bad_input_one_clear_error(tmp_path, make, pattern):
    path = make(tmp_path)
    with pytest.raises(BadInputError, match=pattern) as info:
        docs_of(path)
    assert "\n" not in str(info.value)


def test_skip_mode_counts_bad_inputs(tmp_path):
    _write(tmp_path / "good.txt", b"fine text")
    _write(tmp_path / "bin.txt", b"\x00\x00")
    _write(tmp_path / "mixed.jsonl", b'{"text": "a"}\nnot json\n{"text": "b"}\n')
    stats = SourceStats()
    docs = docs_of(tmp_path, include=["*"], on_bad_input="skip", stats=stats)
    assert sorted(d.text for d in docs) == ["a", "b", "fine text"]
    assert stats.skipped_count == 2
    assert any("mixed.jsonl:2" in m for m in stats.skipped)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path
