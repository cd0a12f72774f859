"""What every server asks of its HTTP connections before the app sees them: a request (or a
websocket handshake) completes within `REQUEST_TIMEOUT_S` of its first byte or of the
connection, or the connection is closed; and what a log line may carry of a client's strings.

uvicorn (h11) waits forever for a request that never finishes, and only times out idle
keep-alive connections after a response: 200 connections that sent half a request held
their sockets (and a task each) for good. `bounded_h11_protocol()` is uvicorn's own h11
protocol with that deadline; `escape_client_strings()` puts a filter on the log handlers
that escapes control characters in every string argument of every record (uvicorn's
access-log path too, which it logs URL-decoded: `%0A` forged a whole access-log line).
uvicorn and h11 are imported inside the functions: importing this module loads neither.
"""
from __future__ import annotations

import logging

from .log_safety import LogLimiter, printable

REQUEST_TIMEOUT_S = 5.0          # a request's headers and body, or a websocket handshake
KEEP_ALIVE_S = 5                 # an idle keep-alive connection after a response
MAX_HEADER_BYTES = 16 * 1024     # a request's line and headers (h11's limit, set explicitly)
MAX_CONNECTIONS = 1000           # HTTP connections and requests in flight (uvicorn answers 503 past it)
WS_PING_S = 20.0                 # a websocket peer that stops answering pings is dropped after this

log = logging.getLogger(__name__)
_slow = LogLimiter(log.info)


def uvicorn_limits(request_timeout_s: float = REQUEST_TIMEOUT_S) -> dict:
    """The `uvicorn.Config` options every server runs with (set, not left to defaults)."""
    return {"http": bounded_h11_protocol(request_timeout_s), "timeout_keep_alive": KEEP_ALIVE_S,
            "h11_max_incomplete_event_size": MAX_HEADER_BYTES, "limit_concurrency": MAX_CONNECTIONS,
            "ws_ping_interval": WS_PING_S, "ws_ping_timeout": WS_PING_S}


def bounded_h11_protocol(timeout_s: float = REQUEST_TIMEOUT_S):
    """uvicorn's h11 protocol class whose requests must arrive whole within `timeout_s`."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    finished = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)

    class BoundedH11Protocol(H11Protocol):
        """A deadline from the connection (or a new request's first bytes) to the request's
        end; a websocket upgrade hands the connection over once its request is whole."""

        request_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.transport.get_protocol() is not self or self.conn.their_state in finished:
                self.disarm()  # upgraded to a websocket, or the request is whole
            elif self.request_timer is None:
                self.arm()     # the next request on a kept-alive connection has begun

        def connection_lost(self, exc) -> None:
            self.disarm()
            super().connection_lost(exc)

        def arm(self) -> None:
            self.request_timer = self.loop.call_later(timeout_s, self.too_slow)

        def disarm(self) -> None:
            if self.request_timer is not None:
                self.request_timer.cancel()
                self.request_timer = None

        def too_slow(self) -> None:
            self.request_timer = None
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                return
            client = "%s:%d" % self.client if self.client else "?"
            _slow("closed a connection from %s: no whole request within %g s", client, timeout_s)
            self.transport.close()

    return BoundedH11Protocol


class EscapeClientStrings(logging.Filter):
    """Escapes control characters in a record's string arguments (the client's strings reach
    log lines as arguments: paths, ids, names), so no argument can start a new line."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(_escaped(a) for a in args)
        elif isinstance(args, dict):
            record.args = {k: _escaped(v) for k, v in args.items()}
        return True


class HideQueryStrings(logging.Filter):
    """Drops the query string from uvicorn's access lines (a carrier's GET webhook carries
    the caller's number there): "GET /vonage/answer?... HTTP/1.1" is what is logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            path, query, _ = args[2].partition("?")
            record.args = args[:2] + (path + ("?..." if query else ""),) + args[3:]
        return True


def _escaped(value):
    return printable(value, limit=4096) if isinstance(value, str) else value


def escape_client_strings(loggers=("", "uvicorn", "uvicorn.error", "uvicorn.access")) -> None:
    """Put `EscapeClientStrings` on every handler of `loggers` (once each): call it after
    uvicorn has set up its logging."""
    for name in loggers:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, EscapeClientStrings) for f in handler.filters):
                handler.addFilter(HideQueryStrings())
                handler.addFilter(EscapeClientStrings())
