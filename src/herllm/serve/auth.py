"""Bearer tokens: a JSON file of ``sha256(token) -> {"user": NAME, "admin": bool}``.

Only hashes are stored; `herllm serve RUN_DIR --add-token USER [--admin]` prints a new token
once. A request's user is always the token's user (the OpenAI ``user`` field never overrides
it). Admin tokens may also call the admin routes (rollback, forget, export).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from herllm.errors import UserError

TOKENS_FILE = "tokens.json"


@dataclass(frozen=True)
class Principal:
    """Who is calling."""

    user: str
    admin: bool = False


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenFile:
    """The token hashes, read once (restart the server after adding a token)."""

    def __init__(self, entries: dict[str, dict]):
        self.entries = entries

    @classmethod
    def load(cls, path: str | Path) -> TokenFile:
        path = Path(path)
        if not path.is_file():
            raise UserError(
                f"no token file at {path}; create one with herllm serve RUN_DIR --add-token USER"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise UserError(f"token file {path} is not JSON ({exc}); fix or recreate it") from None
        for digest, entry in data.items():
            if len(digest) != 64 or not isinstance(entry, dict) or not entry.get("user"):
                raise UserError(
                    f"token file {path}: entry {digest[:12]}... needs a sha256 hex key and "
                    '{"user": NAME}; recreate it with --add-token'
                )
        return cls(data)

    def principal(self, token: str | None) -> Principal | None:
        """The token's user, or None for no token or an unknown one."""
        if not token:
            return None
        digest = hash_token(token)
        for known, entry in self.entries.items():
            if hmac.compare_digest(known, digest):
                return Principal(str(entry["user"]), bool(entry.get("admin", False)))
        return None


def add_token(path: str | Path, user: str, admin: bool = False) -> str:
    """Store the hash of a new token for `user` in `path` (created 0600); returns the token."""
    if not user or not user.strip() or ":" in user:
        raise UserError(f"user {user!r}: give a non-empty name without ':'")
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    token = "hl-" + secrets.token_urlsafe(24)
    data[hash_token(token)] = {"user": user, "admin": admin}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)
    return token
