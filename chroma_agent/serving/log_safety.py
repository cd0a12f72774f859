"""What a log line may carry of a client: `printable(text)` escapes its control characters
(no client string may forge or break a line), `carrier_id(sid)` shows a carrier's call or
stream id only when the operator asked (`CHROMA_AGENT_LOG_CARRIER_IDS=true`), `LogLimiter`
caps the lines a stream of refusals may write."""
from __future__ import annotations

import os
import time
from typing import Callable


def printable(value, limit: int = 120) -> str:
    """A client-supplied value as a log line may show it: control characters (newlines, ESC)
    escaped so it can never forge or break a line, cut to `limit` characters."""
    text = value if isinstance(value, str) else str(value)
    cut = text[:limit]
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    return shown + ("..." if len(text) > limit else "")


CARRIER_IDS_ENV = "CHROMA_AGENT_LOG_CARRIER_IDS"   # "true": log lines may name the carrier's call ids


def carrier_ids_logged() -> bool:
    """Whether the operator asked for carriers' call and stream ids in log lines (they name
    a caller at the carrier: off by default; the server's own call id is always there)."""
    return os.environ.get(CARRIER_IDS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def carrier_id(value) -> str | None:
    """A carrier's call or stream id as a log line may show it: escaped, or None unless
    `carrier_ids_logged()`."""
    return printable(value) if value and carrier_ids_logged() else None


class LogLimiter:
    """At most `burst` lines per `period` seconds through `say` (e.g. `log.info`); the rest
    are counted and the next line written says how many were left out, so a flood of
    refused connections costs a few lines, not one each."""

    def __init__(self, say: Callable[..., None], burst: int = 10, period: float = 60.0):
        self.say, self.burst, self.period = say, burst, period
        self._window_start = -float("inf")
        self._written = 0
        self.suppressed = 0

    def __call__(self, message: str, *args) -> bool:
        """Log `message % args` unless over the rate; whether it was written."""
        now = time.monotonic()
        if now - self._window_start >= self.period:
            self._window_start, self._written = now, 0
        if self._written >= self.burst:
            self.suppressed += 1
            return False
        self._written += 1
        if self.suppressed:
            message, args = message + " (%d more like it not logged)", (*args, self.suppressed)
            self.suppressed = 0
        self.say(message, *args)
        return True
