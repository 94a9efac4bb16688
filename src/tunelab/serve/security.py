"""Who may talk to the server, decided for every request before any route runs.

A local server is reachable from more than its own clients: every web page the user visits can send it
requests (a form or a `fetch` in no-cors mode is a "simple request": no preflight, and cookies or not, it
arrives), and a page on a domain that its owner re-points at 127.0.0.1 (DNS rebinding) can read the
answers too. Ollama had both (CVE-2024-28224); FastAPI refuses non-JSON bodies for JSON routes for the
first reason (CVE-2021-32677). The rules, in the order they are checked:

1. Host: bound to a loopback address, a request's Host must be 127.0.0.1, localhost or [::1] (any port),
   or a name of `--allowed-hosts`; bound to another address, `--allowed-hosts` is checked when given.
   This is what defeats DNS rebinding: the rebinding page's requests carry its own domain as Host.
2. Origin: a request with an `Origin` header (every browser sends one on a cross-origin POST) is refused
   unless the origin is the server's own or listed in `--allowed-origins`.
3. Key: with an API key set, every route but `/health` and the page's static shell needs it.
4. Content type: a request that sends a body sends it as `application/json`, or as
   `multipart/form-data` to the upload route; the types a page may send without a preflight
   (`text/plain`, `application/x-www-form-urlencoded`) are refused elsewhere (415).

Refusals are OpenAI's error objects (403, 401, 415) with a one-line reason.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from starlette.requests import Request

from tunelab.errors import RequestError

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
OPEN_PATHS = ("/health", "/", "/favicon.ico")  # and /static/*: the page's shell, which holds no data
UPLOAD_PATH = "/v1/files"
WRITES = ("POST", "PUT", "PATCH", "DELETE")


@dataclass(frozen=True)
class Access:
    """The server's access rules: its key, whether it is bound to a loopback address, and the extra
    Host names and Origins its operator allowed."""

    api_key: str | None = None
    loopback: bool = True
    allowed_hosts: tuple[str, ...] = ()  # names (no port); "*.example.com" covers its subdomains, "*" any
    allowed_origins: tuple[str, ...] = ()  # "scheme://host[:port]" as a browser sends it, in lower case

    def __post_init__(self):
        object.__setattr__(self, "allowed_hosts", tuple(h.strip().lower() for h in self.allowed_hosts if h.strip()))
        object.__setattr__(
            self, "allowed_origins", tuple(o.strip().lower().rstrip("/") for o in self.allowed_origins if o.strip())
        )

    def refusal(self, request: Request) -> RequestError | None:
        """Why `request` is refused, or None: the rules above, the first that fails."""
        for rule in (self._host, self._origin, self._key, _content_type):
            refused = rule(request)
            if refused is not None:
                return refused
        return None

    def _host(self, request: Request) -> RequestError | None:
        if not self.loopback and not self.allowed_hosts:
            return None
        given = request.headers.get("host", "")
        name = host_name(given)
        allowed = LOOPBACK_NAMES + self.allowed_hosts
        if name and any(_matches(name, pattern) for pattern in allowed):
            return None
        return RequestError(
            403,
            f"Host {given!r} is not a name of this server: it answers {', '.join(LOOPBACK_NAMES)}"
            + (f" and {', '.join(self.allowed_hosts)}" if self.allowed_hosts else "")
            + " (more with --allowed-hosts)",
            code="host_not_allowed",
            kind="permission_error",
        )

    def _origin(self, request: Request) -> RequestError | None:
        origin = request.headers.get("origin")
        if origin is None or origin.lower() in self.allowed_origins or origin.lower() == own_origin(request):
            return None
        return RequestError(
            403,
            f"requests from the web page at {origin!r} are refused: this server answers its own "
            "page and the origins of --allowed-origins",
            code="origin_not_allowed",
            kind="permission_error",
        )

    def _key(self, request: Request) -> RequestError | None:
        path = request.url.path
        if (
            self.api_key is None
            or path in OPEN_PATHS
            or path.startswith("/static/")
            or authorised(request, self.api_key)
        ):
            return None
        return RequestError(
            401,
            "invalid or missing API key: send 'Authorization: Bearer KEY'",
            code="invalid_api_key",
            kind="authentication_error",
        )


def _content_type(request: Request) -> RequestError | None:
    if request.method not in WRITES:
        return None
    given = request.headers.get("content-type")
    sends_body = (
        given is not None
        or int(request.headers.get("content-length") or 0) > 0
        or "transfer-encoding" in request.headers
    )
    if not sends_body:  # a POST that only names an action (cancel, pause, resume)
        return None
    expected = "multipart/form-data" if request.url.path == UPLOAD_PATH else "application/json"
    media_type = (given or "").split(";", 1)[0].strip().lower()
    if media_type == expected:
        return None
    return RequestError(
        415,
        f"Content-Type: expected {expected}, got {given or 'none'}",
        param="Content-Type",
        code="unsupported_media_type",
    )


def authorised(request: Request, api_key: str) -> bool:
    """`Authorization: Bearer KEY` with the server's key, compared in constant time."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def host_name(host: str) -> str:
    """A Host header's name without its port, lower case: `[::1]:8000` -> `[::1]`, `LocalHost:80` -> `localhost`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else ""
    name, _, port = host.rpartition(":")
    return name if name and port.isdigit() else host


def own_origin(request: Request) -> str:
    """The origin of the server's own page as the browser sees it: the scheme and the Host it was asked by."""
    return f"{request.url.scheme}://{request.headers.get('host', '')}".lower()


def _matches(name: str, pattern: str) -> bool:
    pattern = pattern.lower()
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == pattern
