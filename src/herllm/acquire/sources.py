"""Experience acquisition, part 1: sources -> Documents with stable ids.

Supported sources, read in a deterministic order:
- a text file: documents are separated by a line holding only U+001E (record separator), the
  layout of the bundled HER-Stream corpus; a file without separators is one document;
- a directory: every file below it matching the include globs and none of the exclude globs,
  in sorted order (recursive);
- a JSONL file (`.jsonl`): one object per line with a `text` field, `prompt` and `response`
  fields (the loss then covers the response tokens only), or a `messages` list in the OpenAI
  chat format (trained through the model's chat template, the loss on the assistant turns);
- `-`: standard input, read as text (or JSONL with `stream.stdin_format`), document by document.

Document ids are `<source path>#<n>` for text records and `<source path>:<line>` for JSONL
lines, where the source path is relative to the directory it was found in. They stay the same
as long as the inputs do, which is what the durable cursor relies on.
"""

from __future__ import annotations

import fnmatch
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from herllm.errors import UserError
from herllm.models.chat import check_messages, check_trainable

RECORD_SEP = "\x1e"
JSONL_SUFFIXES = (".jsonl",)


class _Wait:
    def __repr__(self) -> str:
        return "WAIT"


WAIT = _Wait()
"""What a followed source (`acquire.follow`) yields when it has no new document now: a stream
can say "nothing yet" as well as end."""


class BadInputError(UserError):
    """Input the user fed in that cannot be read; the message names the file/line and the fix."""


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    """The text to learn from; for prompt/response records, the prompt (no loss on it)."""
    response: str | None = None
    """For prompt/response records: the response (the loss covers these tokens only)."""
    messages: tuple[tuple[str, str], ...] | None = None
    """For `{"messages": [...]}` records: the conversation as (role, content) pairs, checked;
    `text` is then the turns' contents joined by blank lines (what the knowledge store keeps)."""

    def conversation(self) -> list[dict[str, str]] | None:
        """The chat messages of this document: its `messages`, or its prompt/response as a user
        and an assistant turn; None for a text document."""
        if self.messages is not None:
            return [{"role": r, "content": c} for r, c in self.messages]
        if self.response is not None:
            return [{"role": "user", "content": self.text},
                    {"role": "assistant", "content": self.response}]  # fmt: skip
        return None


@dataclass
class SourceStats:
    """What the reader saw; skipped bad inputs are counted here, never silently dropped."""

    files: int = 0
    documents: int = 0
    skipped: list[str] = field(default_factory=list)

    @property
    def skipped_count(self) -> int:
        return len(self.skipped)


def list_files(
    sources: Iterable[str], include: list[str], exclude: list[str]
) -> list[tuple[Path, str]]:
    """Expand sources into (path, display name) pairs; missing paths raise BadInputError."""
    out: list[tuple[Path, str]] = []
    for src in sources:
        if src == "-":
            out.append((Path("-"), "stdin"))
            continue
        path = Path(src).expanduser()
        if not path.exists():
            raise BadInputError(f"stream source {src} does not exist; check the path")
        if path.is_file():
            out.append((path, src))
            continue
        found = []
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path).as_posix()
            if not p.is_file() or not _matches(rel, include) or _matches(rel, exclude):
                continue
            found.append((p, f"{path.name}/{rel}"))
        if not found:
            raise BadInputError(
                f"directory {src} has no files matching {', '.join(include)}; "
                "add --include patterns or check the path"
            )
        out.extend(found)
    return out


def _matches(rel: str, patterns: list[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(name, pat) for pat in patterns)


def read_documents(
    sources: Iterable[str],
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    on_bad_input: str = "error",
    stats: SourceStats | None = None,
    stdin_format: str = "text",
) -> Iterator[Document]:
    """Yield Documents from every source in order (lazily: large streams are never all in memory)."""
    stats = stats if stats is not None else SourceStats()
    files = list_files(sources, include or ["*"], exclude or [])
    for path, name in files:
        stats.files += 1
        try:
            if str(path) == "-":
                docs = _read_stdin(stdin_format)
            elif path.suffix in JSONL_SUFFIXES:
                docs = _read_jsonl(path, name, on_bad_input, stats)
            else:
                docs = _read_text(path, name)
            for doc in docs:
                stats.documents += 1
                yield doc
        except BadInputError as exc:
            if on_bad_input != "skip":
                raise
            stats.skipped.append(str(exc).split(";")[0])


def _decode(data: bytes, name: str) -> str:
    nul = data.find(b"\x00", 0, 1 << 16)
    if nul >= 0:
        raise BadInputError(
            f"{name} looks binary (NUL byte at offset {nul}); exclude it "
            "(--exclude) or pass --on-bad-input skip"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(
            f"{name} is not valid UTF-8 (byte offset {exc.start}); convert it to UTF-8 "
            "or pass --on-bad-input skip"
        ) from None


def split_records(text: str) -> list[str]:
    """Split on record-separator lines; drop records that are only whitespace."""
    if RECORD_SEP not in text:
        return [text] if text.strip() else []
    parts = [p.strip("\n") for p in text.split(f"\n{RECORD_SEP}\n")]
    return [p for p in parts if p.strip() and p.strip() != RECORD_SEP]


def _read_text(path: Path, name: str) -> Iterator[Document]:
    text = _decode(path.read_bytes(), name)
    for i, record in enumerate(split_records(text)):
        yield Document(f"{name}#{i}", record)


def _read_jsonl(path: Path, name: str, on_bad_input: str, stats: SourceStats) -> Iterator[Document]:
    text = _decode(path.read_bytes(), name)
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            doc = parse_jsonl_line(line, f"{name}:{lineno}")
        except BadInputError as exc:
            if on_bad_input != "skip":
                raise
            stats.skipped.append(str(exc).split(";")[0])
            continue
        if doc is not None:
            yield doc


def parse_jsonl_line(line: str, where: str) -> Document | None:
    """One JSONL record -> Document; `where` is `file:line`, used as the id and in errors."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadInputError(
            f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); fix the line "
            "or pass --on-bad-input skip"
        ) from None
    if not isinstance(obj, dict):
        raise BadInputError(
            f"{where}: expected a JSON object; fix the line or pass --on-bad-input skip"
        )
    if isinstance(obj.get("text"), str):
        return Document(where, obj["text"]) if obj["text"].strip() else None
    if isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
        return Document(where, obj["prompt"], obj["response"])
    if "messages" in obj:
        return _messages_document(obj["messages"], where)
    raise BadInputError(
        f"{where}: needs a string 'text' field, string 'prompt' and 'response' fields, or a "
        "'messages' list; fix the line or pass --on-bad-input skip"
    )


def _messages_document(messages: object, where: str) -> Document:
    try:
        checked = check_trainable(check_messages(messages, where), where)
    except UserError as exc:
        raise BadInputError(f"{exc} (or pass --on-bad-input skip)") from None
    text = "\n\n".join(m["content"] for m in checked)
    return Document(where, text, messages=tuple((m["role"], m["content"]) for m in checked))


def _read_stdin(fmt: str) -> Iterator[Document]:
    """Read stdin incrementally: a text document ends at a record-separator line."""
    stream = sys.stdin
    if fmt == "jsonl":
        for lineno, line in enumerate(stream, start=1):
            if line.strip():
                doc = parse_jsonl_line(line, f"stdin:{lineno}")
                if doc is not None:
                    yield doc
        return
    buf: list[str] = []
    n = 0
    for line in stream:
        if line.rstrip("\n") == RECORD_SEP:
            if "".join(buf).strip():
                yield Document(f"stdin#{n}", "".join(buf).strip("\n"))
                n += 1
            buf = []
        else:
            buf.append(line)
    if "".join(buf).strip():
        yield Document(f"stdin#{n}", "".join(buf).strip("\n"))
