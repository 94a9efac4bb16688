"""Object ids and times as OpenAI gives them (`file-...`, `ftjob-...`, `chatcmpl-...`), for every object the server makes."""

from __future__ import annotations

import secrets
import time


def now() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    """An unguessable id: 24 random characters (144 bits)."""
    return f"{prefix}-{secrets.token_urlsafe(18).replace('-', 'a').replace('_', 'b')}"
