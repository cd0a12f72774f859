"""Log lines as text (the default, for people) or JSON (one object per line, for a log
pipeline): `configure_logging("json")` before serving (`--log-format json`).

    undo = configure_logging("json")          # stdlib logging and, when installed, loguru
    with call_context(session_id="sess_ab12"):
        log.info("session started")           # {"time": ..., "level": "INFO", "logger": ...,
                                               #  "message": "session started", "session_id": "sess_ab12"}

A JSON line has `time` (UTC, ISO 8601, milliseconds), `level`, `logger`, `message`, and
`call_id` / `session_id` where the line was written inside a `call_context` (contextvars:
the tasks and threads a call starts inherit them), plus `exception` (the traceback) when
there is one. The client's strings in a record's arguments are escaped as in text lines
(`connection_limits.EscapeClientStrings`), and JSON escapes the rest (loguru's messages,
formatted by their callers): no line can forge another. Pipecat logs through loguru: with loguru installed, its default stderr sink is
replaced by one writing the same JSON (loguru is imported here only when asked).

In JSON mode `CallServer.serve_app` starts uvicorn without its own logging setup
(`uvicorn_log_config()`), so its lines reach the root logger's JSON handler too.
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import os
import sys
from typing import Callable, Iterator, TextIO

from .connection_limits import EscapeClientStrings

FORMATS = ("text", "json")

_call_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("chroma_call_id", default=None)
_session_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("chroma_session_id", default=None)
_current = "text"


def set_call_context(*, call_id: str | None = None, session_id: str | None = None) -> Callable[[], None]:
    """Mark this context's log lines with `call_id` / `session_id` (those given); returns
    the function that puts the previous values back."""
    tokens = []
    if call_id is not None:
        tokens.append((_call_id, _call_id.set(str(call_id))))
    if session_id is not None:
        tokens.append((_session_id, _session_id.set(str(session_id))))

    def reset() -> None:
        for var, token in reversed(tokens):
            with contextlib.suppress(ValueError):   # reset from another context: leave it
                var.reset(token)
    return reset


@contextlib.contextmanager
def call_context(*, call_id: str | None = None, session_id: str | None = None) -> Iterator[None]:
    """Log lines written inside (and in the tasks and threads started inside) carry
    `call_id` / `session_id`."""
    reset = set_call_context(call_id=call_id, session_id=session_id)
    try:
        yield
    finally:
        reset()


def current_ids() -> dict[str, str]:
    """The call id and session id set in this context (those set)."""
    ids = {}
    if (call_id := _call_id.get()) is not None:
        ids["call_id"] = call_id
    if (session_id := _session_id.get()) is not None:
        ids["session_id"] = session_id
    return ids


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat(timespec="milliseconds")


def json_line(time: float, level: str, logger: str, message: str, exception: str | None = None,
              **extra) -> str:
    """One JSON log line (no newline): the fields, then the context's ids, then `extra`."""
    line = {"time": _iso(time), "level": level, "logger": logger, "message": message, **current_ids()}
    line.update((k, v) for k, v in extra.items() if v is not None)
    if exception:
        line["exception"] = exception
    return json.dumps(line, default=str)   # ASCII: a lone surrogate cannot break the stream


class JsonFormatter(logging.Formatter):
    """A stdlib record as one JSON line (`json_line`)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        exception = None
        if record.exc_info:
            exception = self.formatException(record.exc_info)
        elif record.stack_info:
            exception = self.formatStack(record.stack_info)
        return json_line(record.created, record.levelname, record.name, message, exception)


class _StreamHandler(logging.StreamHandler):
    """A handler on whatever `sys.stderr` is when a line is written (tests swap it), unless given a stream."""

    def __init__(self, stream: TextIO | None = None):
        super().__init__(stream)
        self.fixed = stream is not None

    def emit(self, record: logging.LogRecord) -> None:
        if not self.fixed:
            self.stream = sys.stderr
        super().emit(record)


def current_format() -> str:
    """The format `configure_logging` set last: "text" (the default) or "json"."""
    return _current


def uvicorn_log_config() -> dict:
    """uvicorn.Config's options for the current format: in JSON mode no logging setup of its
    own (`log_config=None`), so its lines go through the root logger's JSON handler."""
    return {"log_config": None} if _current == "json" else {}


def configure_logging(fmt: str = "text", *, level: int = logging.INFO,
                      stream: TextIO | None = None) -> Callable[[], None]:
    """Set the log format of the process, before serving: "text" keeps the human-readable
    lines (loguru's at `level` too, not DEBUG, unless `LOGURU_LEVEL` is set); "json" writes every stdlib record at `level` or above (the root
    logger's) and, with loguru installed, every loguru record as one JSON line to `stream`
    (default: stderr). Returns the function that undoes it. ValueError for another format."""
    global _current
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: one of {', '.join(FORMATS)}")
    previous = _current
    _current = fmt
    if fmt == "text":
        undo_loguru_level = _loguru_text(level)

        def undo_text() -> None:
            global _current
            _current = previous
            undo_loguru_level()
        return undo_text
    handler = _StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(EscapeClientStrings())
    root = logging.getLogger()
    root_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    undo_loguru = _loguru_json(level, stream)

    def undo() -> None:
        global _current
        _current = previous
        root.removeHandler(handler)
        root.setLevel(root_level)
        undo_loguru()
    return undo


def _loguru_text(level: int) -> Callable[[], None]:
    """Loguru's default stderr sink at `level` instead of DEBUG (Pipecat's debug lines name a
    carrier's call ids, and more), unless the operator set loguru's own `LOGURU_LEVEL`."""
    try:
        from loguru import logger
    except ImportError:
        return lambda: None
    if os.environ.get("LOGURU_LEVEL"):
        return lambda: None
    try:
        logger.remove(0)   # loguru's default stderr sink
    except ValueError:     # the application's own sinks stay as they are
        return lambda: None
    sink_id = logger.add(lambda message: sys.stderr.write(message), level=logging.getLevelName(level))

    def undo() -> None:
        with contextlib.suppress(ValueError):
            logger.remove(sink_id)
        logger.add(sys.stderr)
    return undo


def _loguru_json(level: int, stream: TextIO | None) -> Callable[[], None]:
    """Replace loguru's default stderr sink by a JSON one (when loguru is installed)."""
    try:
        from loguru import logger
    except ImportError:
        return lambda: None

    def sink(message) -> None:
        record = message.record
        exception = None
        if record["exception"] is not None:
            exception = "".join(_traceback(record["exception"]))
        extra = {k: record["extra"].get(k) for k in ("call_id", "session_id")}   # logger.bind(call_id=...)
        (stream or sys.stderr).write(json_line(record["time"].timestamp(), record["level"].name, record["name"] or "",
                                               record["message"], exception, **extra) + "\n")

    removed = True
    try:
        logger.remove(0)   # loguru's default stderr sink
    except ValueError:     # already removed by the application: its own sinks stay
        removed = False
    sink_id = logger.add(sink, level=logging.getLevelName(level), format="{message}", colorize=False)

    def undo() -> None:
        with contextlib.suppress(ValueError):
            logger.remove(sink_id)
        if removed:
            logger.add(sys.stderr)
    return undo


def _traceback(exception) -> list[str]:
    import traceback

    return traceback.format_exception(exception.type, exception.value, exception.traceback)
