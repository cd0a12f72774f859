"""What `serve web` checks before any route runs: the Host it is asked for, where a
state-changing request comes from, its Content-Type, and the size of its body.

    app.add_middleware(WebGuard, allowed=AllowedHosts(["voice.example.com"]), refused=limiter)

- **Host** (every route, the page too): only `localhost`, `127.0.0.1` and `[::1]` on the
  server's own port, plus the `AllowedHosts` entries (`name`: any port, `name:port`: that
  one). Anything else gets 421: a web page whose DNS name is made to point at this machine
  (DNS rebinding) sends its own name, so it can neither read the page nor post an offer.
- **Origin** (POST and other unsafe methods): when present it must be `http(s)://` plus
  an allowed host, and `Sec-Fetch-Site: cross-site` is refused (403). A request without
  Origin comes from a non-browser client (curl, a script), which no web page can drive.
- **Content-Type** (the `json_paths`, e.g. `/api/offer`): `application/json` only (415);
  other sites cannot send that without a CORS preflight, which this server never grants
  (it sends no CORS headers at all).
- **Body** (every route): `chroma_agent.serving.body_limit.BodyLimit`, the cap every
  server's bodies share: a declared `Content-Length` over `max_body_bytes` is refused
  (413) before a byte is read; a chunked body is read up to the cap, then refused, and
  must arrive within `body_timeout_s` (408). The route gets the body already read.

Every refusal is a JSON `{"error": ...}` with `Connection: close`, and a line through
`refused` (a rate-limited `LogLimiter`) with the client's strings escaped (`printable`).
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

from chroma_agent.serving.body_limit import BodyLimit, send_error
from chroma_agent.serving.log_safety import printable

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
ENV_ALLOWED_HOSTS = "CHROMA_AGENT_WEB_ALLOWED_HOSTS"   # comma-separated, added to --allowed-host
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
BODY_TIMEOUT_S = 15.0   # a body trickled slower than this holds a task for nothing


def split_host(value: str) -> tuple[str, int | None]:
    """`name`, `name:port`, `[v6]` or `[v6]:port` as (lower-case name, port or None);
    ValueError if it is not one of those."""
    text = value.strip().lower()
    if text.startswith("["):
        name, bracket, rest = text.partition("]")
        name += bracket
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"not a host: {value!r}")
        port_text = rest[1:] if rest else None
    else:
        name, colon, port_text = text.partition(":")
        port_text = port_text if colon else None
    if not name or name == "[]" or any(c in name for c in "/@?#\\ *") or (":" in name and not name.startswith("[")):
        raise ValueError(f"not a host name: {value!r} (give NAME or NAME:PORT, without a scheme or path)")
    if port_text is None:
        return name, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"not a port: {value!r}")
    return name, int(port_text)


class AllowedHosts:
    """The Host names the server answers to: the loopback names on its own port (the port
    it listens on, known per request) and `extra` entries, `name` (any port) or
    `name:port`. ValueError for an entry that is neither."""

    def __init__(self, extra: Iterable[str] = ()):
        self.entries = [split_host(entry) for entry in extra if entry.strip()]

    def allows(self, host: str, own_port: int | None) -> bool:
        """Whether a `Host` header's value (or an Origin's host[:port]) is one of ours."""
        try:
            name, port = split_host(host)
        except ValueError:
            return False
        if name in LOOPBACK_NAMES and (own_port is None or port == own_port):
            return True
        return any(name == allowed and (allowed_port is None or port == allowed_port)
                   for allowed, allowed_port in self.entries)

    def describe(self, own_port: int | None) -> str:
        """The allowed hosts for a log line."""
        own = [f"{name}:{own_port}" if own_port else name for name in LOOPBACK_NAMES]
        return ", ".join(own + [name if port is None else f"{name}:{port}" for name, port in self.entries])


def allowed_hosts_from_env(environ=os.environ) -> list[str]:
    """The entries of $CHROMA_AGENT_WEB_ALLOWED_HOSTS (comma-separated)."""
    return [entry.strip() for entry in environ.get(ENV_ALLOWED_HOSTS, "").split(",") if entry.strip()]


class WebGuard:
    """An ASGI middleware that refuses what the module docstring lists before the app
    sees it. `refused(message, *args)`: a refusal's log line (%-style)."""

    def __init__(self, app, *, allowed: AllowedHosts, refused: Callable[..., object], max_body_bytes: int,
                 json_paths: Iterable[str] = (), body_timeout_s: float = BODY_TIMEOUT_S):
        self.app, self.allowed, self.refused = app, allowed, refused
        self.json_paths, self.max_body_bytes, self.body_timeout_s = frozenset(json_paths), max_body_bytes, body_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)   # lifespan
        headers = _headers(scope)
        own_port = (scope.get("server") or (None, None))[1]
        host = headers.get("host", "")
        if not self.allowed.allows(host, own_port):
            return await self._refuse(scope, receive, send, headers, 421,
                                      f"this server does not answer to the host {printable(host, 80)!r}; its own "
                                      "address does (http://localhost:PORT), or start it with --allowed-host NAME")
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        if scope["method"] not in SAFE_METHODS:
            origin = headers.get("origin")
            if origin is not None and not self._own_origin(origin, own_port):
                return await self._refuse(scope, receive, send, headers, 403,
                                          "a request from another site's page is refused: open this server's own page")
            if headers.get("sec-fetch-site") == "cross-site":
                return await self._refuse(scope, receive, send, headers, 403,
                                          "a cross-site request is refused: open this server's own page")
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if scope["path"] in self.json_paths and media != "application/json":
                return await self._refuse(scope, receive, send, headers, 415, "send the body as Content-Type: application/json")
        body_limit = BodyLimit(self.app, self.max_body_bytes, timeout_s=self.body_timeout_s,
                               on_refused=lambda reason: self._log(scope, headers, reason))
        await body_limit(scope, receive, send)   # the body: capped before the route reads it

    def _own_origin(self, origin: str, own_port: int | None) -> bool:
        scheme, sep, rest = origin.partition("://")
        return bool(sep) and scheme.lower() in ("http", "https") and "/" not in rest and self.allowed.allows(rest, own_port)

    def _log(self, scope, headers: dict, why) -> None:
        client = scope.get("client") or ("?", 0)
        self.refused("refused %s %s from %s (%s): Host %s, Origin %s, Content-Type %s, user agent %s",
                     scope.get("method", "WEBSOCKET"), printable(scope.get("path", ""), 80), client[0], why,
                     *(printable(headers.get(name, "-"), 80) for name in ("host", "origin", "content-type", "user-agent")))

    async def _refuse(self, scope, receive, send, headers: dict, status: int, message: str) -> None:
        self._log(scope, headers, status)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send_error(send, status, message)


def _headers(scope) -> dict[str, str]:
    """The request's headers, lower-case names, latin-1 (the first of a repeated one)."""
    found: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        found.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return found
