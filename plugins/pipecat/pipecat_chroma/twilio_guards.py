"""The phone server's guards around Twilio's protocol: what it needs to start with a
Twilio auth token, the admin key of per-call data, the
rate-limited log of refusals, and the end of a stream that went silent.

- `require_public_url(auth_token, public_url)`: with a token, signatures are checked
  against the public URL alone (never a request's Host header), so it must be given.
- `AdminKey`: `Authorization: Bearer KEY` against CHROMA_AGENT_ADMIN_KEY.
- `Refusals`: one `LogLimiter` per kind of refusal.
- `end_when_silent`: ends a call whose caller sent no audio for `timeout_s`.
"""
from __future__ import annotations

import asyncio
import math
import os
import time
from typing import Callable
from urllib.parse import urlsplit

from chroma_agent.serving.call_server import bearer_key_matches
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
        return self.key is not None and bearer_key_matches(authorization, self.key)


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
