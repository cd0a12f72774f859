"""OpenTelemetry traces for every server and plugin: one trace per call, a span per turn.

    configure_tracing()                       # once, at a server's start: OTLP when the OTEL_ variables say so
    call = CallTrace.start("realtime", id=session_id)     # NO_TRACE when nothing records
    with call.admission():                    # waiting for the engine's conversation slot
        conv = await engine.conversation(...)
    turn = call.turn(speech_end=t0)           # asked now; its span may start at the end of speech
    turn.first_audio(model_s=0.31)            # an event, and the time to first audio
    turn.end(status="completed", stop_reason="end_of_turn", frames=40, cancelled=False)
    call.end("completed")

Spans (tracer `chroma_agent`):

- `chroma.call` (the root of a realtime session's trace; a Pipecat server's call is Pipecat's
  own `conversation` span): `chroma.call.kind`, `chroma.call.id` (the server's own id, never
  a carrier's call id or a number), `chroma.call.outcome`, `chroma.call.turns`.
- `chroma.engine.admission`: the wait for a conversation on the batched engine.
- `chroma.turn`, under the call (or under Pipecat's `turn` span, or LiveKit's turn): starts
  when the caller's speech ended where that is known, else when the reply was asked for. Its
  attributes follow Pipecat's realtime services and OpenTelemetry's GenAI conventions:
  `gen_ai.provider.name`, `gen_ai.request.model`, `gen_ai.operation.name`, `gen_ai.response.id`,
  `gen_ai.usage.input_tokens` / `output_tokens`, `metrics.ttfb` (the model's time to first
  audio, seconds), and `chroma.turn.*`: `speech_end_to_first_audio_s`, `time_to_first_audio_s`,
  `frames` (80 ms reply frames), `stop_reason`, `status`, `cancelled`.

Nothing is recorded unless a tracer provider that records is installed: `configure_tracing`
installs one when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set, and an
application (a LiveKit worker, a Pipecat app) may install its own. Without one every call
gets `NO_TRACE`, whose methods do nothing. Transcripts go on spans only with the GenAI opt-in,
`OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`; phone numbers and carrier ids never.
`opentelemetry-api` is optional (`pip install 'chroma-agent[otel]'` adds the SDK and OTLP).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Iterator

log = logging.getLogger(__name__)

TRACER_NAME = "chroma_agent"
DEFAULT_SERVICE_NAME = "chroma-agent"
CONTENT_OPT_IN = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"   # the GenAI conventions' opt-in
PROVIDER_NAME = "flashlabs"
DEFAULT_MODEL = "FlashLabs/Chroma-4B"
MAX_TEXT = 4096   # a transcript attribute, opted in, is cut here

_configured: bool | None = None


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def content_opted_in() -> bool:
    """Whether transcripts may go on spans (`OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`)."""
    return _truthy(CONTENT_OPT_IN)


def exporter_requested() -> bool:
    """The standard variables ask for OTLP traces: an endpoint is set, the SDK is not
    disabled (`OTEL_SDK_DISABLED`) and `OTEL_TRACES_EXPORTER` is not "none"."""
    if _truthy("OTEL_SDK_DISABLED") or os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def configure_tracing(service_name: str = DEFAULT_SERVICE_NAME) -> bool:
    """Install an OTLP-exporting tracer provider when the OTEL_ variables ask for one (once
    per process; a provider the application installed is kept). `OTEL_EXPORTER_OTLP_PROTOCOL`
    picks "http/protobuf" (default) or "grpc"; `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES`
    name the service (default `service_name`); `OTEL_BSP_*` tune the batching. Returns whether
    spans are recorded now. A missing package is a warning naming the extra to install."""
    global _configured
    if _configured is None:
        _configured = _install(service_name) if exporter_requested() else False
    return tracing_on()


def _install(service_name: str) -> bool:
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                    or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip().lower()
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as e:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry's SDK is not installed (%s): "
                    "no traces. Install it: pip install 'chroma-agent[otel]'", e.name)
        return False
    if tracing_on():
        return True   # the application's own provider
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    log.info("OpenTelemetry: exporting traces over OTLP (%s) as %s", protocol, resource.attributes.get(SERVICE_NAME))
    return True


def tracing_on() -> bool:
    """Whether the process's tracer provider records spans (not the API's default no-op or
    proxy; False without opentelemetry-api)."""
    try:
        from opentelemetry import trace
    except ImportError:
        return False
    return not isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def tracer():
    from opentelemetry import trace

    return trace.get_tracer(TRACER_NAME)


def monotonic_of(wall: float | None) -> float | None:
    """A time.time() reading as the time.monotonic() one of the same moment (frameworks keep
    wall-clock times; spans here take monotonic ones)."""
    return None if wall is None else time.monotonic() - (time.time() - wall)


def _epoch_ns(monotonic_s: float | None) -> int | None:
    """A time.monotonic() reading as the epoch nanoseconds a span's start takes."""
    if monotonic_s is None:
        return None
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


class TurnTrace:
    """One turn's span (`chroma.turn`): see the module's docstring. Ends once."""

    def __init__(self, span, asked_at: float, speech_end: float | None):
        self.span, self.asked_at, self.speech_end = span, asked_at, speech_end
        self.ended = False

    def set(self, **attributes: Any) -> None:
        """`chroma.turn.<name>` attributes (None values are left out)."""
        for name, value in attributes.items():
            if value is not None:
                self.span.set_attribute(f"chroma.turn.{name}", value)

    def first_audio(self, at: float | None = None, model_s: float | None = None) -> None:
        """The reply's first audio went out at `at` (time.monotonic(); default now): the
        time to first audio from the ask (or `model_s`, the model's own TTFB), and from the
        end of speech where known."""
        at = time.monotonic() if at is None else at
        ttfa = model_s if model_s is not None else at - self.asked_at
        self.span.add_event("first_audio")
        self.span.set_attribute("metrics.ttfb", ttfa)
        self.set(time_to_first_audio_s=ttfa,
                 speech_end_to_first_audio_s=None if self.speech_end is None else at - self.speech_end)

    def end(self, status: str, *, stop_reason: str | None = None, frames: int | None = None,
            response_id: str | None = None, input_tokens: int | None = None, output_tokens: int | None = None,
            reply_text: str | None = None, caller_text: str | None = None, error: str | None = None) -> None:
        """The reply ended with `status` ("completed", "cancelled", "incomplete", "failed");
        `reply_text` / `caller_text` go on only with the content opt-in."""
        if self.ended:
            return
        self.ended = True
        span = self.span
        self.set(status=status, cancelled=status == "cancelled", stop_reason=stop_reason, frames=frames)
        for name, value in (("gen_ai.response.id", response_id), ("gen_ai.usage.input_tokens", input_tokens),
                            ("gen_ai.usage.output_tokens", output_tokens)):
            if value is not None:
                span.set_attribute(name, value)
        if content_opted_in():
            if reply_text:
                span.set_attribute("chroma.turn.reply_text", reply_text[:MAX_TEXT])
            if caller_text:
                span.set_attribute("chroma.turn.caller_text", caller_text[:MAX_TEXT])
        if status == "failed":
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, (error or "the reply failed")[:256]))
        span.end()


class CallTrace:
    """One call's trace: its root span (`chroma.call`), or a parent given (a framework's
    conversation), under which its turns and admissions go."""

    def __init__(self, span, context, owned: bool, model: str = DEFAULT_MODEL):
        self.span, self.context, self.owned, self.model = span, context, owned, model
        self.turns = 0

    @classmethod
    def start(cls, kind: str, *, id: str | None = None, model: str = DEFAULT_MODEL, parent=None,
              **attributes: Any) -> "CallTrace | NoTrace":
        """A call of `kind` ("realtime", "phone", "web", "livekit"): its root span, or, with
        `parent` (an OpenTelemetry Context: a framework's conversation), no span of its own
        and turns under `parent`. NO_TRACE when nothing records."""
        if not tracing_on():
            return NO_TRACE
        from opentelemetry import trace

        if parent is not None:
            return cls(trace.get_current_span(parent), parent, owned=False, model=model)
        attrs = {"chroma.call.kind": kind, **({"chroma.call.id": id} if id else {}),
                 **{k: v for k, v in attributes.items() if v is not None}}
        span = tracer().start_span("chroma.call", context=trace.set_span_in_context(trace.INVALID_SPAN),
                                   attributes=attrs, kind=trace.SpanKind.SERVER)
        return cls(span, trace.set_span_in_context(span), owned=True, model=model)

    def turn(self, *, speech_end: float | None = None, asked_at: float | None = None, parent=None,
             trigger: str | None = None) -> TurnTrace:
        """A turn's span under the call (or `parent`, e.g. Pipecat's turn), starting at the
        end of speech (`speech_end`, time.monotonic()) when known, else at `asked_at` (default
        now); `trigger`: what asked ("server_vad", "client", "turn_detector")."""
        asked_at = time.monotonic() if asked_at is None else asked_at
        self.turns += 1
        attrs = {"gen_ai.provider.name": PROVIDER_NAME, "gen_ai.request.model": self.model,
                 "gen_ai.operation.name": "generate_content", "service.operation": "llm_response"}
        if trigger:
            attrs["chroma.turn.trigger"] = trigger
        span = tracer().start_span("chroma.turn", context=parent if parent is not None else self.context,
                                   attributes=attrs, start_time=_epoch_ns(speech_end or asked_at))
        return TurnTrace(span, asked_at, speech_end)

    @contextlib.contextmanager
    def admission(self, **attributes: Any) -> Iterator[Any]:
        """A `chroma.engine.admission` span around the wait for the engine's conversation;
        `attributes` as `chroma.engine.<name>` (load, capacity, ...)."""
        attrs = {f"chroma.engine.{k}": v for k, v in attributes.items() if v is not None}
        with tracer().start_as_current_span("chroma.engine.admission", context=self.context, attributes=attrs) as span:
            yield span

    def set(self, **attributes: Any) -> None:
        for name, value in attributes.items():
            if value is not None:
                self.span.set_attribute(f"chroma.call.{name}", value)

    def end(self, outcome: str = "completed") -> None:
        """The call ended (`outcome`: "completed", "failed", ...): its span ends, if it is its own."""
        if not self.owned:
            return
        self.owned = False
        self.set(outcome=outcome, turns=self.turns)
        if outcome == "failed":
            from opentelemetry.trace import Status, StatusCode

            self.span.set_status(Status(StatusCode.ERROR, "the call failed"))
        self.span.end()


class _NoTurn:
    ended = True

    def set(self, **attributes: Any) -> None:
        pass

    def first_audio(self, *args: Any, **kwargs: Any) -> None:
        pass

    def end(self, *args: Any, **kwargs: Any) -> None:
        pass


class NoTrace:
    """Nothing records: every method does nothing (the default, at no cost)."""

    turns = 0
    context = None
    _turn = _NoTurn()

    def turn(self, **kwargs: Any) -> _NoTurn:
        return self._turn

    @contextlib.contextmanager
    def admission(self, **attributes: Any) -> Iterator[None]:
        yield None

    def set(self, **attributes: Any) -> None:
        pass

    def end(self, outcome: str = "completed") -> None:
        pass


NO_TRACE = NoTrace()
NO_TURN = NoTrace._turn
