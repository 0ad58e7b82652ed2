"""Experience acquisition, part 3: the durable cursor (what has been consumed).

The cursor is the start of the next unread window. It is written inside every checkpoint, so a
resumed run skips exactly the windows the checkpoint had consumed: nothing lost, nothing twice.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from herllm.acquire.chunks import StreamPosition
from herllm.errors import UserError


def save_cursor(position: StreamPosition, path: str | Path, sources: list[str]) -> None:
    data = {"position": asdict(position), "sources": list(sources)}
    Path(path).write_text(json.dumps(data, indent=1), encoding="utf-8")


def load_cursor(path: str | Path, sources: list[str] | None = None) -> StreamPosition:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if sources is not None and list(sources) != data["sources"]:
        raise UserError(
            f"the run was started on sources {data['sources']} but resumed with {list(sources)}; "
            "resume with the same sources (omit them to reuse the run's own)"
        )
    return StreamPosition(**data["position"])
