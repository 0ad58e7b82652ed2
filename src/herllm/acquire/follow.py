"""Sources that grow: `herllm adapt --follow` learns from documents as they arrive.

A followed stream never ends by itself. Where a plain stream would end, it says "nothing yet"
(`WAIT`) and is asked again later; the learner trains on what it has, checkpoints while idle and
stops on SIGTERM or Ctrl-C.

- a JSONL file: new complete lines (a line is read once it ends with a newline), in file order;
- a text file: new records, each complete once the record-separator line after it is written;
- a folder: new files matching the include globs, each read whole, once, in the order they were
  first seen (name order within one look). Move finished files in (write elsewhere, then
  rename) or give them `--set stream.follow_settle=S` seconds without change before they count.

Other kinds of growing source register themselves with `register_followed_kind` (the server's
interaction log does, in `herllm.serve.log_source`): a test on the path, a factory of a
poll function that yields the new Documents and, optionally, a factory of a `busy` check: while
it says busy (the server has requests in flight, or had one a moment ago), the learner holds its
next step, so on a small machine it trains only between requests.

The order in which folder files were first seen is this source's state (`state_dict`): a resumed
run reads them in that order again, so the cursor's document indices stay valid however the
files' names or times sort.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

from herllm.acquire.sources import (
    JSONL_SUFFIXES,
    RECORD_SEP,
    WAIT,
    BadInputError,
    Document,
    SourceStats,
    _decode,
    _matches,
    _read_jsonl,
    _read_text,
    parse_jsonl_line,
)

Poll = Callable[[], Iterator[Document]]
Busy = Callable[[], bool]
_KINDS: list[
    tuple[Callable[[Path], bool], Callable[[Path, FollowedSources], Poll], Callable[[Path], Busy]]
] = []


def _never_busy(_path: Path) -> Busy:
    return lambda: False


def register_followed_kind(
    matches: Callable[[Path], bool],
    open_poll: Callable[[Path, FollowedSources], Poll],
    busy: Callable[[Path], Busy] = _never_busy,
) -> None:
    """A kind of growing source: `matches(path)` says a source is one; `open_poll(path,
    followed)` returns the function each look calls for its new Documents; `busy(path)` returns
    a check the learner asks before each step (True: wait, the source's owner needs the CPU)."""
    _KINDS.append((matches, open_poll, busy))


class FollowedSources:
    """Documents of growing sources, then `WAIT` whenever none is new (see module doc)."""

    def __init__(self, sources: list[str], include: list[str], exclude: list[str],
                 on_bad_input: str, stats: SourceStats, settle: float = 0.0) -> None:  # fmt: skip
        for src in sources:
            if src == "-":
                raise BadInputError("--follow reads files and folders, not stdin; drop the -")
            if not Path(src).expanduser().exists():
                raise BadInputError(f"followed source {src} does not exist; check the path")
        self.sources, self.include, self.exclude = sources, include, exclude
        self.on_bad_input, self.stats, self.settle = on_bad_input, stats, settle
        self.seen: list[str] = []
        """Folder files in the order they were first read (display names)."""
        self._seen_set: set[str] = set()
        self._replay: list[str] = []
        self._offsets: dict[
            str, tuple[int, int]
        ] = {}  # growing file -> (bytes read, lines/records)
        self._polls: dict[str, Poll] = {}
        self._busy: list[Busy] = []
        for src in sources:
            path = Path(src).expanduser()
            for matches, open_poll, busy in _KINDS:
                if matches(path):
                    self._polls[src] = open_poll(path, self)
                    self._busy.append(busy(path))
                    break

    def busy(self) -> bool:
        """Whether a source's owner asks the learner to hold its next step (see module doc)."""
        return any(check() for check in self._busy)

    def state_dict(self) -> dict:
        return {"seen": list(self.seen)}

    def load_state_dict(self, state: dict) -> None:
        self._replay = list(state["seen"])  # read these first, in this order

    def __iter__(self) -> Iterator[Document | object]:
        while True:
            new = 0
            for doc in self._poll():
                new += 1
                self.stats.documents += 1
                yield doc
            if not new:
                yield WAIT

    def _poll(self) -> Iterator[Document]:
        for src in self.sources:
            path = Path(src).expanduser()
            if src in self._polls:
                yield from self._polls[src]()
            elif path.is_dir():
                yield from self._poll_folder(path)
            elif path.suffix in JSONL_SUFFIXES:
                yield from self._poll_jsonl(path, src)
            else:
                yield from self._poll_text(path, src)

    def _poll_folder(self, root: Path) -> Iterator[Document]:
        files = {}
        now = time.time()
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root).as_posix()
            name = f"{root.name}/{rel}"
            if name in self._seen_set or not p.is_file():
                continue
            if not _matches(rel, self.include) or _matches(rel, self.exclude):
                continue
            if self.settle and now - p.stat().st_mtime < self.settle:
                continue  # still being written
            files[name] = p
        order = [n for n in self._replay if n in files] + [
            n for n in files if n not in self._replay
        ]
        for name in order:
            self.seen.append(name)
            self._seen_set.add(name)
            self.stats.files += 1
            yield from self._read_file(files[name], name)

    def _read_file(self, path: Path, name: str) -> Iterator[Document]:
        try:
            if path.suffix in JSONL_SUFFIXES:
                yield from _read_jsonl(path, name, self.on_bad_input, self.stats)
            else:
                yield from _read_text(path, name)
        except BadInputError as exc:
            if self.on_bad_input != "skip":
                raise
            self.stats.skipped.append(str(exc).split(";")[0])

    def _grown(self, path: Path, name: str) -> tuple[str, int, int] | None:
        """New complete text of a growing file: (text, its byte length, count so far)."""
        done, count = self._offsets.get(name, (0, 0))
        if not path.is_file() or path.stat().st_size <= done:
            return None
        with open(path, "rb") as fh:
            fh.seek(done)
            data = fh.read()
        return _decode(data, name), done, count

    def _poll_jsonl(self, path: Path, name: str) -> Iterator[Document]:
        grown = self._grown(path, name)
        if grown is None:
            return
        text, done, lineno = grown
        complete = text[: text.rfind("\n") + 1]  # a line counts once its newline is written
        for line in complete.splitlines():
            lineno += 1
            done += len(line.encode("utf-8")) + 1
            self._offsets[name] = (done, lineno)
            if not line.strip():
                continue
            try:
                doc = parse_jsonl_line(line, f"{name}:{lineno}")
            except BadInputError as exc:
                if self.on_bad_input != "skip":
                    raise
                self.stats.skipped.append(str(exc).split(";")[0])
                continue
            if doc is not None:
                yield doc

    def _poll_text(self, path: Path, name: str) -> Iterator[Document]:
        grown = self._grown(path, name)
        if grown is None:
            return
        text, done, n = grown
        sep = f"\n{RECORD_SEP}\n"
        while (end := text.find(sep)) >= 0:  # a record counts once the separator after it is in
            record, text = text[:end], text[end + len(sep) :]
            done += len((record + sep).encode("utf-8"))
            self._offsets[name] = (done, n + 1 if record.strip("\n").strip() else n)
            if record.strip("\n").strip():
                yield Document(f"{name}#{n}", record.strip("\n"))
                n += 1
