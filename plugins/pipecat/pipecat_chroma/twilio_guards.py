"""The phone server's guards around Twilio's protocol: what it needs to start with a
Twilio auth token, the cap on request bodies, the admin key of per-call data, the
rate-limited log of refusals, and the end of a stream that went silent.

- `require_public_url(auth_token, public_url)`: with a token, signatures are checked
  against the public URL alone (never a request's Host header), so it must be given.
- `BodyLimit`: ASGI middleware; a request body over `max_bytes` gets 413 (by its
  Content-Length, before a byte is read; a chunked body as soon as it passes the cap).
- `AdminKey`: `Authorization: Bearer KEY` against CHROMA_AGENT_ADMIN_KEY.
- `Refusals`: one `LogLimiter` per kind of refusal.
- `end_when_silent`: ends a call whose caller sent no audio for `timeout_s`.
"""
from __future__ import annotations

import asyncio
import hmac
import math
import os
import time
from typing import Callable
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.responses import PlainTextResponse

from chroma_agent.serving.log_safety import LogLimiter

MAX_WEBHOOK_BYTES = 16 * 1024    # Twilio's voice webhook form is ~1-2 KiB
ADMIN_KEY_ENV = "CHROMA_AGENT_ADMIN_KEY"
MEDIA_TIMEOUT_ENV = "CHROMA_AGENT_TWILIO_MEDIA_TIMEOUT_S"
DEFAULT_MEDIA_TIMEOUT_S = 10.0   # Twilio streams 20 ms of audio (silence too) every 20 ms: 10 s of none is a dead line
REFUSAL_LOG_PERIOD_S = 10.0      # one line per kind of refusal per period, with the count left out


def media_timeout_s() -> float:
    """Seconds without `start`, or without media after it, that end a stream:
    CHROMA_AGENT_TWILIO_MEDIA_TIMEOUT_S, else DEFAULT_MEDIA_TIMEOUT_S (ValueError if not
    a positive number)."""
    text = os.environ.get(MEDIA_TIMEOUT_ENV)
    if text is None or not text.strip():
        return DEFAULT_MEDIA_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{MEDIA_TIMEOUT_ENV}={text!r}: give a number of seconds above 0")
    return value


def require_public_url(auth_token: str | None, public_url: str | None) -> None:
    """With `auth_token`, a `public_url` with an http(s) scheme and a host is needed (else
    ValueError naming the fix): Twilio signs the URL it calls, and rebuilt from a request's
    Host header that URL would be the caller's choice (a signature made for another app of
    the same account would pass)."""
    if not auth_token:
        return
    if not public_url:
        raise ValueError("TWILIO_AUTH_TOKEN is set but no public URL is given: start with "
                         "--public-url https://YOUR-PUBLIC-HOST (the URL of this server that Twilio calls; "
                         "signatures are checked against it, never against a request's Host header)")
    parts = urlsplit(public_url if "://" in public_url else f"https://{public_url}")   # as PhoneServer reads it
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--public-url {public_url!r}: give the https URL Twilio calls, e.g. https://abc.ngrok.app")


class BodyTooLarge(HTTPException):
    """A request body past the cap, found while reading it (a chunked body)."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"request body over {max_bytes} bytes", headers={"Connection": "close"})


class BodyLimit:
    """ASGI middleware: an HTTP request whose body is over `max_bytes` gets 413 with
    `Connection: close`. A Content-Length over the cap is refused before the app runs and
    before any of the body is read; a body without one (chunked) is passed on until it
    crosses the cap, then reading it raises `BodyTooLarge` (413 through the app's HTTP
    exception handler), so at most `max_bytes` plus one chunk is ever held.
    `on_refused(reason)` is told of each refusal (a rate-limited log)."""

    def __init__(self, app, max_bytes: int = MAX_WEBHOOK_BYTES, on_refused: Callable[[str], None] | None = None):
        self.app, self.max_bytes, self.on_refused = app, max_bytes, on_refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            declared = int(length) if length.isdigit() else None   # h11 refuses a malformed one before us
            if declared is None or declared > self.max_bytes:
                self._refused("a request body over the cap (by its Content-Length)")
                response = PlainTextResponse(f"request body over {self.max_bytes} bytes", status_code=413,
                                             headers={"Connection": "close"})
                await response(scope, receive, send)
                return
        seen = 0

        async def capped_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    self._refused("a request body over the cap (read up to the cap)")
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, capped_receive, send)

    def _refused(self, reason: str) -> None:
        if self.on_refused is not None:
            self.on_refused(reason)


class AdminKey:
    """The key that unlocks per-call data: `key`, else CHROMA_AGENT_ADMIN_KEY; none set
    means nobody gets it."""

    def __init__(self, key: str | None = None):
        self.key = key if key is not None else os.environ.get(ADMIN_KEY_ENV) or None

    def check(self, authorization: str | None) -> bool | None:
        """None when no credential was given; True when it is `Bearer KEY` with the key;
        False for anything else (a wrong key, or one given to a server without a key)."""
        if not authorization:
            return None
        scheme, _, given = authorization.partition(" ")
        if self.key is None or scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), self.key.encode("utf-8"))


class Refusals:
    """Refusal log lines through one `LogLimiter` per kind (`what` + `reason`, a fixed set of
    phrases): the first line of a kind at once, then at most one per `period` seconds,
    which says how many were left out. `detail` must already be `printable`."""

    def __init__(self, say: Callable[[str], None], period: float = REFUSAL_LOG_PERIOD_S):
        self._say, self.period = say, period
        self._limiters: dict[tuple[str, str], LogLimiter] = {}

    def __call__(self, what: str, reason: str, detail: str = "") -> bool:
        limiter = self._limiters.get((what, reason))
        if limiter is None:
            limiter = self._limiters[(what, reason)] = LogLimiter(self._formatted, burst=1, period=self.period)
        return limiter("refused %s: %s%s", what, reason, f" ({detail})" if detail else "")

    def _formatted(self, message: str, *args) -> None:
        self._say(message % args)   # %-style here: loguru would read the arguments as str.format's


async def end_when_silent(last_media: Callable[[], float], timeout_s: float, end: Callable[[], None],
                          say: Callable[[str], None]) -> None:
    """Call `end()` (and `say` why) once `last_media()` (time.monotonic() of the last audio
    taken) is `timeout_s` old; run as a task, cancelled when the call ends otherwise."""
    while (idle := time.monotonic() - last_media()) < timeout_s:
        await asyncio.sleep(timeout_s - idle + 0.01)
    say(f"no audio from the caller for {timeout_s:g} s: ending the call")
    end()
