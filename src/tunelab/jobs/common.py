"""What the jobs modules share: OpenAI's ids and times, and the error a job request can end in."""

from __future__ import annotations

import secrets
import time


class JobError(Exception):
    """A request about a job that cannot be done (400 with `param`, or 404 / 409)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def now() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    """An unguessable id: 24 random characters (144 bits)."""
    return f"{prefix}-{secrets.token_urlsafe(18).replace('-', 'a').replace('_', 'b')}"
