"""Spans in tests: `capture_spans()` installs (once per test process) a recording tracer
provider as OpenTelemetry's global one, with a processor that keeps the spans ended while a
capture is open; `OtlpCollector` is a loopback OTLP/HTTP receiver for a server process run
with the standard `OTEL_EXPORTER_OTLP_ENDPOINT`.

    with capture_spans() as spans:        # in-process: Pipecat, LiveKit, the servers' code
        ...
    names = [s.name for s in spans]

    with OtlpCollector() as collector:    # out of process: env=collector.env()
        ...
        spans = collector.wait_for(lambda spans: ..., timeout=10)
"""
from __future__ import annotations

import contextlib
import http.server
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

_lock = threading.Lock()
_listening: list[list] = []
_installed = False


def _install() -> None:
    global _installed
    with _lock:
        if _installed:
            return
        from opentelemetry import trace
        from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

        class Keep(SpanProcessor):
            def on_end(self, span) -> None:
                with _lock:
                    for spans in _listening:
                        spans.append(span)

        provider = TracerProvider()
        provider.add_span_processor(Keep())
        trace.set_tracer_provider(provider)
        if not isinstance(trace.get_tracer_provider(), TracerProvider):
            raise RuntimeError("another tracer provider was installed first")
        _installed = True


@contextlib.contextmanager
def capture_spans() -> Iterator[list]:
    """The spans (opentelemetry.sdk ReadableSpan) ended while the block runs."""
    _install()
    spans: list = []
    with _lock:
        _listening.append(spans)
    try:
        yield spans
    finally:
        with _lock:
            _listening.remove(spans)


def wait_spans(spans: list, done: Callable[[list], bool], timeout: float = 10.0) -> list:
    """Wait until `done(spans)` (spans end on other tasks and threads); AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while not done(list(spans)):
        if time.monotonic() > deadline:
            raise AssertionError(f"spans not as expected after {timeout} s: {[s.name for s in spans]}")
        time.sleep(0.05)
    return list(spans)


def children(spans: list, parent) -> list:
    """The spans whose parent is `parent`."""
    pid = parent.context.span_id
    return [s for s in spans if s.parent is not None and s.parent.span_id == pid]


@dataclass
class ExportedSpan:
    """A span as an OTLP export carried it: name, ids (hex), attributes as plain values."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    resource: dict[str, Any] = field(default_factory=dict)
    status_code: int = 0


def _value(v) -> Any:
    kind = v.WhichOneof("value")
    return None if kind is None else getattr(v, kind)


class OtlpCollector:
    """A loopback OTLP/HTTP trace receiver (`POST /v1/traces`, protobuf), for a server process
    run with `env()`; at most `max_bytes` per export."""

    def __init__(self, max_bytes: int = 8 << 20):
        self.spans: list[ExportedSpan] = []
        self.exports = 0
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
                    ExportTraceServiceRequest, ExportTraceServiceResponse)
                size = int(self.headers.get("Content-Length") or 0)
                if self.path != "/v1/traces" or not 0 < size <= max_bytes:
                    self.send_response(400)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest.FromString(self.rfile.read(size))
                collector._add(request)
                body = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _add(self, request) -> None:
        got = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(ExportedSpan(s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                                            {a.key: _value(a.value) for a in s.attributes},
                                            [e.name for e in s.events], resource, s.status.code))
        with _lock:
            self.spans += got
            self.exports += 1

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def env(self, service_name: str = "chroma-test") -> dict[str, str]:
        """The standard variables that point a process's exporter here, exporting fast."""
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_SERVICE_NAME": service_name, "OTEL_BSP_SCHEDULE_DELAY": "100"}

    def wait_for(self, done: Callable[[list[ExportedSpan]], bool], timeout: float = 15.0) -> list[ExportedSpan]:
        deadline = time.monotonic() + timeout
        while True:
            with _lock:
                spans = list(self.spans)
            if done(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"spans not as expected after {timeout} s: {[s.name for s in spans]}")
            time.sleep(0.05)

    def __enter__(self) -> "OtlpCollector":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
