"""`chroma-agent serve realtime`: the OpenAI Realtime API (GA protocol) over one `ChromaEngine`,
so unmodified clients (livekit-plugins-openai's `RealtimeModel(base_url=...)`, pipecat's
`OpenAIRealtimeLLMService(base_url=...)`, the `openai` SDK) talk to a cloned voice.

    from chroma_agent.serving.realtime_server import serve
    serve(model=model, voice=voice, port=8765, api_key="...")      # blocks; SIGTERM drains

`serve` is `chroma-agent serve realtime` (entry point `chroma_agent.servers`: `realtime`);
`check_serve_args` runs before the model loads. Admission, drain and `/health` are
`call_server.CallServer`'s (its one schema, plus `"auth"`: whether a key is required).

Routes: `WS /v1/realtime` (any `?model=`), `GET /health`, `GET /v1/voices`, `GET /metrics`
(Prometheus text: `metrics.py`'s families; per turn the time to first audio, end of speech
-> first audio where the server VAD saw the end, frames sent / late / dropped, refused
events by error code, transcripts), `GET /calls` (the sessions running: ids, client
addresses, ages; it names callers, so it is off (404) unless an admin key is set,
`admin_key` / $CHROMA_AGENT_ADMIN_KEY, and needs `Authorization: Bearer <admin key>`).

One `Session` per websocket: the session config, the input buffer with server VAD
(Silero, `vad.StreamingVAD`), the conversation items, and at most one reply at a time,
streamed as it is decoded (one `response.output_audio.delta` per 80 ms frame). The model
work runs in threads (the engine's scheduler, the conversation's per-frame hops, the VAD),
never on the event loop. FastAPI and uvicorn are imported here only: the rest of the
library does not need them. With `audio.input.transcription` set, each committed user audio
item is transcribed by the model's own reasoner (`realtime_transcripts`).

Each session's log lines carry its id (`log_format.call_context`: the `session_id` of a
JSON line). With `OTEL_EXPORTER_OTLP_ENDPOINT` set each session is one OpenTelemetry trace
(`realtime_tracing`): its call, its engine admission and a turn span per response.

Limits (`realtime_limits.Limits`; documented in the README): one websocket message, audio
per append and ahead of real time, the user turn's length, token budgets of instructions
and text, items and pending input per session, sessions at once and per client address,
the reply's length: each refused with an `invalid_request_error` event (the session goes
on) or at the upgrade; an idle session and one past its maximum length are ended, with an
`error` event first (`realtime_session_bounds`).
"""
# no `from __future__ import annotations`: FastAPI cannot resolve the route's `WebSocket`, imported in `app()`, from a string
import contextlib
import logging
import os
import signal
import time
from typing import Any


from .log_format import call_context
from .log_safety import LogLimiter
from .realtime_audio import Voices
from .realtime_limits import Limits, limits_for_serve
from .call_server import CallServer, admin_refusal, bearer_key_matches, engine_over
from .realtime_session import HANDLERS, Session  # noqa: F401 - HANDLERS: the hooks benchmarks/bench_realtime.py times
from .realtime_tracing import start_call
from .runner import DEFAULT_DRAIN_S
from .tracing import configure_tracing

log = logging.getLogger(__name__)

ADMIN_KEY_ENV = "CHROMA_AGENT_ADMIN_KEY"   # unlocks GET /calls (the phone server's admin key too)


# -- the server --------------------------------------------------------------------------

class RealtimeServer(CallServer):
    """The routes and the sessions over one engine (`CallServer`: admission, drain, health).
    `max_calls`: sessions at once (default: the engine's capacity); `api_key`: required
    Bearer key (None: open); `admin_key`: the key of `GET /calls` (None: the route is off);
    `metrics`: a `metrics.ServerMetrics` (default: on prometheus_client's REGISTRY).
    `sessions` (the slots): session -> its client address."""

    def __init__(self, engine, voice, *, voices_dir: str | os.PathLike | None = None, api_key: str | None = None,
                 max_calls: int | None = None, max_frames: int = 375, system_prompt: str | None = None,
                 limits: Limits = Limits(), drain_seconds: float = DEFAULT_DRAIN_S, admin_key: str | None = None,
                 metrics=None):
        super().__init__(engine, max_calls=max_calls, what="sessions", drain_seconds=drain_seconds, say=log.info,
                         metrics=metrics)
        self.admin_key = admin_key or None
        self.voices = Voices(voice, voices_dir)
        self.api_key = api_key or None
        self.max_frames = max_frames
        from ..model.processor import DEFAULT_SYSTEM_PROMPT

        self.system_prompt = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt  # '' for none
        self.limits = limits
        self.log_refusal = LogLimiter(log.info)  # a flood of refused upgrades costs a few lines

    @property
    def sessions(self) -> dict[Session | object, str]:
        return self.calls

    def health_extras(self) -> dict[str, Any]:
        return {"auth": self.api_key is not None}

    def _refusal(self, websocket) -> tuple[int, str, dict, str] | None:
        """Why this upgrade is refused (status, message, headers, error code), or None."""
        if self.draining:
            return 503, "the server is shutting down", {"Retry-After": "5"}, "server_shutting_down"
        if self.api_key is not None and not bearer_key_matches(websocket.headers.get("authorization"), self.api_key):
            return 401, "missing or wrong API key (Authorization: Bearer <key>)", {}, "invalid_api_key"
        if self.busy:
            return 503, f"at capacity: {self.max_calls} sessions", {"Retry-After": "2"}, "server_at_capacity"
        cap = self.limits.max_sessions_per_client
        client = websocket.client.host if websocket.client else "?"
        if cap is not None and sum(1 for c in self.sessions.values() if c == client) >= cap:
            return 429, f"at most {cap} sessions per client address", {"Retry-After": "2"}, "rate_limit_exceeded"
        return None

    async def handle(self, websocket) -> None:
        from fastapi.responses import JSONResponse

        refusal = self._refusal(websocket)
        if refusal is not None:
            status, message, headers, code = refusal
            self.count_refusal(code)   # the protocol's code: its reason (metrics.REFUSAL_ALIASES)
            self.log_refusal("refused a session from %s: %s", websocket.client.host if websocket.client else "?",
                             message)
            body = {"error": {"type": "invalid_request_error", "code": code, "message": message}}
            await websocket.send_denial_response(JSONResponse(body, status_code=status, headers=headers))
            return
        session = Session(self, websocket, websocket.client.host if websocket.client else "?")
        self.hold(session, session.client)  # the slot, taken before any await
        started = time.monotonic()
        session.call, outcome = start_call(session.config.id), "completed"   # its trace (NO_TRACE when off)
        with call_context(session_id=session.config.id):   # its log lines (and its tasks') carry the id
            try:
                await websocket.accept()
                await session.run()
            except Exception as e:  # the socket broke mid-send or mid-receive: this session alone ends
                if not isinstance(e, (OSError, RuntimeError)) and type(e).__name__ != "WebSocketDisconnect":
                    log.exception("session %s failed", session.config.id)
                    self.fail(session)
                    outcome = "failed"
            finally:
                try:
                    await session.close()   # its replies' turns end first
                finally:
                    session.call.end(outcome)
                self.release(session)
                with contextlib.suppress(Exception):
                    await websocket.close(1001 if self.draining else 1000)
                log.info("session %s from %s ended after %.1f s", session.config.id, session.client,
                         time.monotonic() - started)

    async def end_calls(self) -> None:
        """Close every websocket (the drain's end): each session then frees its slot."""
        for session in list(self.sessions):
            session.closed = True
            with contextlib.suppress(Exception):
                await session.ws.close(1001, "server shutting down")

    close_sessions = end_calls

    def calls_json(self) -> dict[str, Any]:
        """`GET /calls`: the sessions running (id, client address, start, replies, refused events)."""
        now = time.time()
        return {"sessions": [{"id": s.config.id, "client": s.client, "started": round(s.started, 3),
                              "seconds": round(now - s.started, 1), "replies": s.replies,
                              "refused_events": s.bad_events}
                             for s in list(self.sessions) if isinstance(s, Session)]}

    def app(self):
        """The FastAPI app: WS /v1/realtime, GET /health, GET /v1/voices, GET /metrics, GET /calls."""
        from fastapi import FastAPI, Request, WebSocket
        from fastapi.responses import JSONResponse

        app = FastAPI(title="chroma-agent realtime", docs_url=None, redoc_url=None, openapi_url=None)

        @app.websocket("/v1/realtime")
        async def realtime(websocket: WebSocket) -> None:
            await self.handle(websocket)

        self.add_health(app)

        @app.get("/v1/voices")
        async def voices() -> JSONResponse:
            return JSONResponse({"default": self.voices.default_name, "voices": self.voices.names})

        self.add_metrics(app)

        @app.get("/calls")
        async def calls(request: Request) -> JSONResponse:
            status = admin_refusal(request.headers.get("authorization"), self.admin_key)
            if status is not None:
                self.log_refusal("refused GET /calls from %s: %s", request.client.host if request.client else "?",
                                 "no admin key set" if status == 404 else "missing or wrong admin key")
                message = "not found" if status == 404 else "missing or wrong admin key (Authorization: Bearer <key>)"
                return JSONResponse({"error": {"type": "invalid_request_error", "message": message}},
                                    status_code=status)
            return JSONResponse(self.calls_json())

        return app


def check_serve_args(*, voices_dir: str | os.PathLike | None = None, **_other) -> None:
    """What `serve` refuses, checked without a model (before one loads): FastAPI or uvicorn
    not installed (ImportError), a `voices_dir` that is no folder (ValueError)."""
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
    import uvicorn  # noqa: F401

    if voices_dir is not None and not os.path.isdir(voices_dir):
        raise ValueError(f"--voices {voices_dir}: not a folder")


def serve(*, model, voice, host: str = "0.0.0.0", port: int = 8765, voices_dir: str | None = None,
          api_key: str | None = None, max_calls: int | None = None, max_frames: int | None = None,
          system_prompt: str | None = None, drain_seconds: float = DEFAULT_DRAIN_S,
          max_sessions_per_client: int | None = None, idle_timeout_s: float | None = None,
          max_session_s: float | None = None, max_audio_ahead_s: float | None = None,
          max_instructions_tokens: int | None = None, max_text_item_tokens: int | None = None,
          max_response_instructions_tokens: int | None = None, limits: Limits | None = None,
          admin_key: str | None = None) -> None:
    """Run the server (blocks): one `ChromaEngine` over `model` for every session. The limit
    options override `limits` (default `Limits()`); the time bounds not given come from the
    CHROMA_AGENT_REALTIME_* variables (`realtime_limits.ENV`); 0 seconds: no limit.
    `admin_key`: the key of `GET /calls` (default: $CHROMA_AGENT_ADMIN_KEY; none: off)."""
    configure_tracing()   # OTLP traces when OTEL_EXPORTER_OTLP_ENDPOINT is set (the CLI's call comes first: once)
    admin_key = admin_key if admin_key is not None else os.environ.get(ADMIN_KEY_ENV) or None
    limits = limits_for_serve(limits, max_sessions_per_client=max_sessions_per_client, idle_timeout_s=idle_timeout_s,
                              max_session_s=max_session_s, max_audio_ahead_s=max_audio_ahead_s,
                              max_instructions_tokens=max_instructions_tokens,
                              max_text_item_tokens=max_text_item_tokens,
                              max_response_instructions_tokens=max_response_instructions_tokens)
    if api_key is None:
        log.warning("no API key (--api-key or CHROMA_AGENT_API_KEY): anyone who can reach %s:%d can use "
                    "this server", host, port)
    with engine_over(model, max_calls) as engine:
        server = RealtimeServer(engine, voice, voices_dir=voices_dir, api_key=api_key, max_calls=max_calls,
                                max_frames=max_frames or 375, system_prompt=system_prompt,
                                drain_seconds=drain_seconds, limits=limits, admin_key=admin_key)
        log.info("serving %d sessions at once on ws://%s:%d/v1/realtime (voices: %s)", server.max_calls, host, port,
                 ", ".join(server.voices.names))
        # Ctrl-C drains too; a second signal stops at once
        server.serve_app(server.app(), host=host, port=port, drain_signals=(signal.SIGTERM, signal.SIGINT),
                         ws_max_size=server.limits.max_message_bytes)
