"""`chroma-agent serve realtime`: the OpenAI Realtime API (GA protocol) over one `ChromaEngine`,
so unmodified clients (livekit-plugins-openai's `RealtimeModel(base_url=...)`, pipecat's
`OpenAIRealtimeLLMService(base_url=...)`, the `openai` SDK) talk to a cloned voice.

    from chroma_agent.serving.realtime_server import serve
    serve(model=model, voice=voice, port=8765, api_key="...")      # blocks; SIGTERM drains

Routes: `WS /v1/realtime` (any `?model=`), `GET /health`, `GET /v1/voices`.

One `Session` per websocket: the session config, the input buffer with server VAD
(Silero, `vad.StreamingVAD`), the conversation items, and at most one reply at a time,
streamed as it is decoded (one `response.output_audio.delta` per 80 ms frame). The model
work runs in threads (the engine's scheduler, the conversation's per-frame hops, the VAD),
never on the event loop. FastAPI and uvicorn are imported here only: the rest of the
library does not need them.

Limits (`realtime_limits.Limits`; documented in the README): one websocket message, audio
per append and ahead of real time, the user turn's length, token budgets of instructions
and text, items and pending input per session, sessions at once and per client address,
the reply's length: each refused with an `invalid_request_error` event (the session goes
on) or at the upgrade; an idle session and one past its maximum length are ended, with an
`error` event first (`realtime_session_bounds`).
"""
from __future__ import annotations

import contextlib
import hmac
import logging
import os
import signal
import time
from typing import Any


from .log_safety import LogLimiter
from .realtime_audio import Voices
from .realtime_limits import Limits, limits_for_serve
from .realtime_session import HANDLERS, Session  # noqa: F401 - HANDLERS: the hooks benchmarks/bench_realtime.py times
from .runner import DEFAULT_DRAIN_S, add_health, call_ended, drain_calls, run

log = logging.getLogger(__name__)


def authorized(header: str | None, api_key: str) -> bool:
    """`Authorization: Bearer <key>` matches, compared in constant time."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())


# -- the server --------------------------------------------------------------------------

class RealtimeServer:
    """The routes and the sessions over one engine. `max_calls`: sessions at once (default:
    the engine's capacity); `api_key`: required Bearer key (None: open)."""

    def __init__(self, engine, voice, *, voices_dir: str | os.PathLike | None = None, api_key: str | None = None,
                 max_calls: int | None = None, max_frames: int = 375, system_prompt: str | None = None,
                 limits: Limits = Limits(), drain_seconds: float = DEFAULT_DRAIN_S):
        self.engine = engine
        self.voices = Voices(voice, voices_dir)
        self.api_key = api_key or None
        self.max_calls = min(max_calls or engine.capacity, engine.capacity)
        self.max_frames = max_frames
        from ..model.processor import DEFAULT_SYSTEM_PROMPT

        self.system_prompt = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt  # '' for none
        self.limits = limits
        self.drain_seconds = drain_seconds
        self.sessions: dict[Session | object, str] = {}
        self.sessions_total = 0
        self.draining = False
        self.log_refusal = LogLimiter(log.info)  # a flood of refused upgrades costs a few lines

    def health(self) -> dict[str, Any]:
        return {"status": "draining" if self.draining else "ok", "active_sessions": len(self.sessions),
                "max_sessions": self.max_calls, "engine_capacity": self.engine.capacity,
                "load": round(len(self.sessions) / self.max_calls, 3), "sessions_total": self.sessions_total,
                "auth": self.api_key is not None, "engine_frame_ms": self.engine.frame_times()}

    def _refusal(self, websocket) -> tuple[int, str, dict, str] | None:
        """Why this upgrade is refused (status, message, headers, error code), or None."""
        if self.draining:
            return 503, "the server is shutting down", {"Retry-After": "5"}, "server_shutting_down"
        if self.api_key is not None and not authorized(websocket.headers.get("authorization"), self.api_key):
            return 401, "missing or wrong API key (Authorization: Bearer <key>)", {}, "invalid_api_key"
        if len(self.sessions) >= self.max_calls:
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
            self.log_refusal("refused a session from %s: %s", websocket.client.host if websocket.client else "?",
                             message)
            body = {"error": {"type": "invalid_request_error", "code": code, "message": message}}
            await websocket.send_denial_response(JSONResponse(body, status_code=status, headers=headers))
            return
        session = Session(self, websocket, websocket.client.host if websocket.client else "?")
        self.sessions[session] = session.client  # the slot, taken before any await
        self.sessions_total += 1
        started = time.monotonic()
        try:
            await websocket.accept()
            await session.run()
        except Exception as e:  # the socket broke mid-send or mid-receive: this session alone ends
            if not isinstance(e, (OSError, RuntimeError)) and type(e).__name__ != "WebSocketDisconnect":
                log.exception("session %s failed", session.config.id)
        finally:
            await session.close()
            self.sessions.pop(session, None)
            call_ended()
            with contextlib.suppress(Exception):
                await websocket.close(1001 if self.draining else 1000)
            log.info("session %s from %s ended after %.1f s", session.config.id, session.client,
                     time.monotonic() - started)

    async def close_sessions(self) -> None:
        """Close every websocket (the drain's end): each session then frees its slot."""
        for session in list(self.sessions):
            session.closed = True
            with contextlib.suppress(Exception):
                await session.ws.close(1001, "server shutting down")

    async def drain(self) -> None:
        """SIGTERM: refuse new sessions, let running ones finish up to `drain_seconds`,
        then close the rest. Returns when none is left."""
        self.draining = True
        await drain_calls(lambda: len(self.sessions), self.drain_seconds, [self.close_sessions], log.info, "sessions")

    def app(self):
        """The FastAPI app: WS /v1/realtime, GET /health, GET /v1/voices."""
        from fastapi import FastAPI, WebSocket
        from fastapi.responses import JSONResponse

        app = FastAPI(title="chroma-agent realtime", docs_url=None, redoc_url=None, openapi_url=None)

        @app.websocket("/v1/realtime")
        async def realtime(websocket: WebSocket) -> None:
            await self.handle(websocket)

        add_health(app, self)

        @app.get("/v1/voices")
        async def voices() -> JSONResponse:
            return JSONResponse({"default": self.voices.default_name, "voices": self.voices.names})

        return app


def serve(*, model, voice, host: str = "0.0.0.0", port: int = 8765, voices_dir: str | None = None,
          api_key: str | None = None, max_calls: int | None = None, max_frames: int | None = None,
          system_prompt: str | None = None, drain_seconds: float = DEFAULT_DRAIN_S,
          max_sessions_per_client: int | None = None, idle_timeout_s: float | None = None,
          max_session_s: float | None = None, max_audio_ahead_s: float | None = None,
          max_instructions_tokens: int | None = None, max_text_item_tokens: int | None = None,
          max_response_instructions_tokens: int | None = None, limits: Limits | None = None) -> None:
    """Run the server (blocks): one `ChromaEngine` over `model` for every session. The limit
    options override `limits` (default `Limits()`); the time bounds not given come from the
    CHROMA_AGENT_REALTIME_* variables (`realtime_limits.ENV`); 0 seconds: no limit."""
    limits = limits_for_serve(limits, max_sessions_per_client=max_sessions_per_client, idle_timeout_s=idle_timeout_s,
                              max_session_s=max_session_s, max_audio_ahead_s=max_audio_ahead_s,
                              max_instructions_tokens=max_instructions_tokens,
                              max_text_item_tokens=max_text_item_tokens,
                              max_response_instructions_tokens=max_response_instructions_tokens)
    from ..runtime.engine import ChromaEngine

    engine = ChromaEngine(model, max_conversations=max_calls)
    if api_key is None:
        log.warning("no API key (--api-key or CHROMA_AGENT_API_KEY): anyone who can reach %s:%d can use "
                    "this server", host, port)
    server = RealtimeServer(engine, voice, voices_dir=voices_dir, api_key=api_key, max_calls=max_calls,
                            max_frames=max_frames or 375, system_prompt=system_prompt, drain_seconds=drain_seconds,
                            limits=limits)
    log.info("serving %d sessions at once on ws://%s:%d/v1/realtime (voices: %s)", server.max_calls, host, port,
             ", ".join(server.voices.names))
    try:
        # Ctrl-C drains too; a second signal stops at once
        run(server.app(), host=host, port=port, drain=server.drain, drain_signals=(signal.SIGTERM, signal.SIGINT),
            log_level="info", ws_max_size=server.limits.max_message_bytes, calls=server.max_calls)
    finally:
        engine.close()
