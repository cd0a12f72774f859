"""Talk to the cloned voice in a browser: FastAPI + uvicorn, Pipecat's SmallWebRTC
transport, one Pipecat pipeline per browser session.

    from pipecat_chroma.web_server import serve
    serve(model=model, voice=voice, port=8765)   # blocks; open http://localhost:8765

Routes:
- `GET /`: the page (`pipecat_chroma/web/index.html`): self-contained HTML and JS, no CDN.
  Its Connect button opens a native `RTCPeerConnection` (the microphone, the voice's reply,
  an `rtvi-ai` data channel for the state and transcript) against `/api/offer`.
- `POST /api/offer`: `{"sdp", "type": "offer"}` -> `{"sdp", "type": "answer", "pc_id"}`,
  through Pipecat's `SmallWebRTCRequestHandler`. Each offer is a new session: the user
  aggregator with Silero VAD and Smart Turn v3, `ChromaSpeechToSpeechService`, the output
  (`call_pipeline`, as the phone server). HTTP 503 with `Retry-After` past `max_calls`
  or while the server drains.
- `GET /health`: the schema of every server (`chroma_agent.serving.call_server`:
  `{"status", "active_calls", "max_calls", "calls_total", "engine"}`), no extras; 503 with
  status "draining" after SIGTERM.
- `GET /metrics`: Prometheus text (`chroma_agent.serving.metrics`): sessions active and
  ended, refusals by reason (capacity, draining, invalid for an offer that cannot be
  answered), each turn's time to first audio (`phone.records.CallWatcher`), the engine's
  load and ticks, the process. No per-session data is served. The Host check below applies:
  a scraper on another machine asks with an `--allowed-host` name.

Before any route (`web_guard.WebGuard`): a Host other than localhost, 127.0.0.1, [::1] on
the server's port or an `allowed_hosts` entry gets 421 (DNS rebinding); an offer from
another site's page (Origin, Sec-Fetch-Site) 403, one not `application/json` 415; a body
over 64 KiB 413, refused by its Content-Length before it is read.

`serve` runs one `ChromaEngine` over the model, as the other servers do (`chroma-agent
serve web`: entry point `chroma_agent.servers`, `web`; `check_serve_args` runs before the
model loads). SIGTERM drains (`serve`'s `drain_seconds`, `WebServer.drain`): no new
sessions, the running ones go on for up to `drain_seconds`, then end; the process exits 0.

The server binds to 127.0.0.1 by default: browsers allow the microphone on
http://localhost without TLS, and only there (see `EXPOSE_HINT` for other machines).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Sequence

import aioice.ice
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from loguru import logger
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.frames.frames import InputAudioRawFrame
from pipecat.pipeline.worker import PipelineWorker
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import IceServer, SmallWebRTCConnection
from pipecat.transports.smallwebrtc.request_handler import (
    SmallWebRTCRequest,
    SmallWebRTCRequestHandler,
)
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner

from chroma_agent.serving.call_server import CallServer, engine_over
from chroma_agent.serving.log_format import set_call_context
from chroma_agent.serving.log_safety import LogLimiter
from chroma_agent.serving.runner import DEFAULT_DRAIN_S
from chroma_agent.serving.tracing import configure_tracing

from .call_pipeline import chroma_service, turn_detection, voice_pipeline
from .call_worker import call_worker
from .call_transcript import CallTranscripts, TranscriptRecorder, prepare_transcripts_dir
from .phone.records import CallRecord, CallWatcher, meter_output
from .web_guard import AllowedHosts, WebGuard, allowed_hosts_from_env

DEFAULT_HOST = "127.0.0.1"
MAX_OFFER_BYTES = 64 * 1024   # an audio-only SDP offer is ~5 KB
RETRY_AFTER_S = 10
# A browser sends its microphone's packets without pause, silence included (50 a second):
# none for this long and it is gone. Without this a killed browser holds its session until
# ICE consent fails, ~30 s later.
DROP_AFTER_S = 10.0
EXPOSE_HINT = (
    "Browsers give a page the microphone only on https:// or on localhost. To talk to it from "
    "another machine, keep this server on 127.0.0.1 and either forward the port "
    "(ssh -L {port}:localhost:{port} THIS_HOST, then open http://localhost:{port} there) or put an "
    "HTTPS reverse proxy with authentication in front of it (e.g. caddy reverse-proxy --from "
    "voice.example.com --to localhost:{port}, and --allowed-host voice.example.com here). The audio "
    "itself flows over UDP (WebRTC) between the browser and this machine's addresses, so the browser "
    "must reach them (or give a TURN server as an ICE server). --host 0.0.0.0 opens the page, and the model, to anyone on the network.")


def page_html() -> str:
    """The page served at `/`, a package data file."""
    return resources.files("pipecat_chroma").joinpath("web/index.html").read_text(encoding="utf-8")


def _with_loopback(get_host_addresses):
    """aioice leaves 127.0.0.1 out of the addresses it offers, so on a machine whose only
    interface is loopback (a container, CI) the answer has no candidates and a browser on
    the same machine cannot connect. Offer loopback when there is nothing else."""
    def addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        found = get_host_addresses(use_ipv4, use_ipv6)
        return found if found or not use_ipv4 else ["127.0.0.1"]
    addresses.wrapped = get_host_addresses
    return addresses


class AudioHeard:
    """When the browser's audio last reached the service (monotonic seconds): one of the
    service's `frame_watchers` (a pipeline observer would cost far more per frame)."""

    def __init__(self):
        self.last = time.monotonic()

    def __call__(self, frame, direction) -> None:
        if isinstance(frame, InputAudioRawFrame):
            self.last = time.monotonic()


@dataclass
class WebSession:
    """One browser session: its peer connection id and times (wall-clock seconds)."""

    pc_id: str
    worker: PipelineWorker | None = field(default=None, repr=False)   # cancelling it ends the session
    transcript: TranscriptRecorder | None = field(default=None, repr=False)
    watcher: CallWatcher | None = field(default=None, repr=False)   # its turns and reply audio on /metrics
    started: float = field(default_factory=time.time)
    ended: float | None = None

    def summary(self) -> str:
        return f"browser session {self.pc_id} ended after {(self.ended or time.time()) - self.started:.1f} s"


class WebServer(CallTranscripts, CallServer):
    """The browser server: its routes (`app()`), the sessions in flight, the per-session
    pipeline; admission, drain and `/health` are `CallServer`'s.

    `model`: a ChromaEngine (what `serve` runs) or a loaded ChromaModel (anything with
    `conversation(...)`), shared by all sessions; `voice`: a Voice or a voice file path;
    `max_calls`: sessions at once (None: the engine's `capacity`, else
    `call_server.DEFAULT_MAX_CALLS`); `system_prompt`,
    `max_frames` (80 ms each): per reply (None: the service's defaults); `vad_params`:
    Silero's settings (None: pipecat's, right for a browser microphone); `ice_servers`:
    STUN/TURN URLs for browsers that cannot reach this machine directly; `drop_after_s`:
    a session whose browser sent no audio for this long is ended; `allowed_hosts`: Host
    names the server answers to besides localhost, 127.0.0.1 and [::1] on its own port
    (`name`: any port, `name:port`), e.g. the name of a reverse proxy in front of it;
    `transcripts_dir`: a JSON Lines file per session's transcript there (hooks:
    `call_transcript.CallTranscripts`, `call` being the `WebSession`).

    `drain(seconds)` (what SIGTERM runs under `serve`): no new sessions, the running ones
    may go on for `seconds`, then they are ended."""

    def __init__(self, model, voice, *, max_calls: int | None = None, system_prompt: str | None = None,
                 max_frames: int | None = None, vad_params: VADParams | None = None,
                 ice_servers: list[str] | list[IceServer] | None = None, drop_after_s: float = DROP_AFTER_S,
                 allowed_hosts: Sequence[str] = (), transcripts_dir: str | None = None):
        super().__init__(model, max_calls=max_calls, what="sessions", say=logger.info)
        self.init_transcripts(transcripts_dir, server="web")   # the folder made and checked now: ValueError
        self.model, self.voice = model, voice
        self.system_prompt, self.max_frames, self.vad_params = system_prompt, max_frames, vad_params
        self.out_rate = int(getattr(getattr(model, "model", model), "sample_rate", 24000))   # an engine's model
        self.drop_after_s = drop_after_s
        self.allowed_hosts = AllowedHosts(allowed_hosts)   # ValueError for an entry that is no host
        # refusals come in floods (a hostile page, a busy server): a few lines a minute
        self.refused = LogLimiter(lambda message, *args: logger.warning(message % args))
        self.handler = SmallWebRTCRequestHandler(ice_servers=ice_servers)
        self._tasks: set[asyncio.Task] = set()
        if not hasattr(aioice.ice.get_host_addresses, "wrapped"):
            aioice.ice.get_host_addresses = _with_loopback(aioice.ice.get_host_addresses)

    @property
    def sessions(self) -> dict[object, WebSession | None]:
        """The sessions holding a slot; None: an offer being answered."""
        return self.calls

    async def offer(self, request: Request) -> JSONResponse:
        """Answer a browser's SDP offer with a new session, or refuse it with a clear
        reason (400 bad offer, 413 too large, 503 busy or draining) and nothing held.
        The body was read under `WebGuard`'s cap."""
        body = await request.body()
        if len(body) > MAX_OFFER_BYTES:
            return _error(413, f"the offer is over {MAX_OFFER_BYTES} bytes")
        try:
            offer = json.loads(body)
        except ValueError:
            return _error(400, "the body is not JSON: send {\"sdp\": ..., \"type\": \"offer\"}")
        if not (isinstance(offer, dict) and isinstance(offer.get("sdp"), str) and offer.get("type") == "offer"):
            return _error(400, "send {\"sdp\": <the offer's SDP>, \"type\": \"offer\"}")
        if not re.search(r"^m=audio ", offer["sdp"], re.M):
            return _error(400, "the offer has no audio (m=audio): a session needs the microphone")
        if self.draining:
            self.count_refusal("draining")
            self.refused("refused a browser session: the server is draining")
            return _error(503, "the server is shutting down; try again shortly",
                          headers={"Retry-After": str(RETRY_AFTER_S)})
        if self.busy:
            self.count_refusal("capacity")
            self.refused("refused a browser session: %d of %d running", len(self.sessions), self.max_calls)
            return _error(503, f"all {self.max_calls} sessions are taken; try again shortly",
                          headers={"Retry-After": str(RETRY_AFTER_S)})
        key = object()
        self.hold(key, None, count=False)   # no await since the check; counted once the session starts
        made: list[SmallWebRTCConnection] = []
        started = False

        async def start(connection: SmallWebRTCConnection) -> None:
            # the handler logs and swallows a failure here and answers anyway: note success
            nonlocal started
            made.append(connection)
            await self._start_session(connection, key)
            started = True

        answer, error = None, None
        try:
            # each offer is a new session: a pc_id from the client is not honoured
            answer = await self.handler.handle_web_request(SmallWebRTCRequest(sdp=offer["sdp"], type="offer"), start)
        except Exception as e:   # aiortc rejects an SDP it cannot parse (ValueError and others)
            error = e
        if answer is not None and started:
            return JSONResponse(answer)
        if not started:   # a started session frees its own slot when its connection closes
            self.calls.pop(key, None)   # only reserved: no call's memory to hand back
        for connection in made:
            with contextlib.suppress(Exception):
                await connection.disconnect()
        if error is not None:
            self.count_refusal("invalid")
            return _error(400, f"the offer could not be answered: {error or type(error).__name__}")
        return _error(500, "the session could not start (see the server log)")

    async def _start_session(self, connection: SmallWebRTCConnection, key: object) -> None:
        """Build the session's pipeline and run it in a task that owns the slot."""
        transport = SmallWebRTCTransport(connection, TransportParams(audio_in_enabled=True, audio_out_enabled=True))
        # the ONNX sessions load off the event loop, which other sessions share
        user_params = await asyncio.to_thread(turn_detection, self.vad_params)
        session = WebSession(connection.pc_id)
        session.transcript = self.transcript_recorder(session, session.pc_id)
        service, heard = self.make_service(), AudioHeard()
        # each turn's time to first audio, end of speech -> first audio and status, and the reply
        # audio sent, late or dropped, on /metrics
        session.watcher = CallWatcher(CallRecord(session.pc_id, ""), self.metrics)
        service.frame_watchers += [heard, session.watcher]
        meter_output(transport.output(), session.watcher)
        pipeline = voice_pipeline(transport, service, user_params, session.transcript)
        # no conversation: the session ends; one trace per session where tracing is on
        worker = call_worker(pipeline, kind="web", out_rate=self.out_rate)

        @transport.event_handler("on_client_disconnected")
        async def on_client_disconnected(transport, connection):   # hung up or dropped: free it now
            await worker.cancel(reason="browser disconnected")

        session.worker = worker
        self.hold(key, session)   # the reserved slot's session: counted now
        task = asyncio.get_running_loop().create_task(self._run_session(worker, heard, connection, key, session))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_session(self, worker: PipelineWorker, heard: AudioHeard, connection: SmallWebRTCConnection,
                           key: object, session: WebSession) -> None:
        set_call_context(session_id=session.pc_id)   # this task's log lines (and its pipeline's) carry it
        logger.info(f"browser session {session.pc_id} started")
        watchdog = asyncio.get_running_loop().create_task(self._end_when_silent(worker, heard, session))
        try:
            runner = WorkerRunner(handle_sigint=False)   # uvicorn owns the signals
            await runner.add_workers(worker)
            await runner.run()
        except Exception:   # one session's failure stays in that session
            self.fail(key)
            logger.exception(f"browser session {session.pc_id} failed")
        finally:
            watchdog.cancel()
            session.watcher.close()   # the reply audio not yet counted, a reply cut by the hang-up
            with contextlib.suppress(Exception):
                await connection.disconnect()
            try:
                await self.end_transcript(session, session.transcript)   # before the slot goes: a drain waits
            finally:
                self.release(key)
            session.ended = time.time()
            logger.info(session.summary())

    async def _end_when_silent(self, worker: PipelineWorker, heard: AudioHeard, session: WebSession) -> None:
        """End the session once its browser has sent no audio for `drop_after_s` (it was
        killed, or its network went away: nothing says goodbye)."""
        while (quiet := time.monotonic() - heard.last) < self.drop_after_s:
            await asyncio.sleep(min(1.0, self.drop_after_s - quiet))
        logger.warning(f"browser session {session.pc_id}: no audio from the browser for {quiet:.0f} s; ending it")
        await worker.cancel(reason="browser gone")

    def make_service(self):
        """The speech-to-speech service of one session (override to change it)."""
        return chroma_service(self.model, self.voice, system_prompt=self.system_prompt, max_frames=self.max_frames)

    async def end_calls(self) -> None:
        """The drain's deadline: each session's pipeline is cancelled (its conversation
        freed) and its peer connection closed."""
        for session in list(self.sessions.values()):
            if session is not None:   # None: an offer still being answered, which starts or frees its slot
                await session.worker.cancel(reason="server draining")

    async def cancel_calls(self) -> None:
        """A session that would not end: its task goes."""
        for task in list(self._tasks):
            task.cancel()

    async def close(self) -> None:
        """End every session (at shutdown)."""
        await self.handler.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def app(self) -> FastAPI:
        """The routes: GET /, POST /api/offer, GET /health, GET /metrics (Prometheus)."""
        page = page_html()

        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI):
            yield
            await self.close()

        app = FastAPI(title="chroma-agent browser server", lifespan=lifespan)
        app.state.web = self
        app.add_middleware(WebGuard, allowed=self.allowed_hosts, refused=self.refused,
                           max_body_bytes=MAX_OFFER_BYTES, json_paths=("/api/offer",))

        @app.get("/", response_class=HTMLResponse)
        async def index() -> HTMLResponse:
            return HTMLResponse(page, headers={"Cache-Control": "no-store"})

        @app.post("/api/offer")
        async def offer(request: Request) -> JSONResponse:
            return await self.offer(request)

        self.add_health(app)
        self.add_metrics(app)
        return app


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(model, voice, *, max_calls: int | None = None, system_prompt: str | None = None,
               max_frames: int | None = None, allowed_hosts: Sequence[str] = (),
               transcripts_dir: str | None = None) -> FastAPI:
    """The browser server as a FastAPI app (run it with uvicorn, or add routes of your own);
    the arguments are WebServer's."""
    return WebServer(model, voice, max_calls=max_calls, system_prompt=system_prompt, max_frames=max_frames,
                     allowed_hosts=allowed_hosts, transcripts_dir=transcripts_dir).app()


def check_serve_args(*, allowed_hosts: Sequence[str] | None = (), transcripts_dir: str | None = None,
                     **_other) -> None:
    """What `serve` refuses, checked without a model (before one loads): an `allowed_hosts`
    entry that is no host name, a transcripts folder that cannot be made or written
    (ValueError). Takes `serve`'s options."""
    try:
        AllowedHosts(allowed_hosts or ())
    except ValueError as e:
        raise ValueError(f"--allowed-host: {e}") from None
    prepare_transcripts_dir(transcripts_dir)


def serve(*, model, voice, host: str = DEFAULT_HOST, port: int = 8765, max_calls: int | None = None,
          system_prompt: str | None = None, max_frames: int | None = None, drain_seconds: float = DEFAULT_DRAIN_S,
          allowed_hosts: Sequence[str] | None = (), transcripts_dir: str | None = None, **_other) -> None:
    """Run the browser server until SIGTERM (drained for `drain_seconds`, see
    `WebServer.drain`) or Ctrl-C (blocks). The model is loaded by the caller, before the
    port opens; the server runs one `ChromaEngine` over it (a given engine is used as is),
    whose capacity is `max_calls` when given, else measured at start. `allowed_hosts`
    (`--allowed-host`) plus $CHROMA_AGENT_WEB_ALLOWED_HOSTS (comma-separated) and a specific
    `host` bound to are the Host names answered besides the loopback ones. See `create_app`
    for the other arguments; options of other servers (`_other`, e.g. a phone server's
    `public_url`) are ignored. Traces over OTLP where the OTEL_ variables ask (`configure_tracing`)."""
    configure_tracing()
    check_serve_args(allowed_hosts=allowed_hosts, transcripts_dir=transcripts_dir)
    local = host in ("127.0.0.1", "localhost", "::1")
    bound = [] if local or host in ("0.0.0.0", "::", "") else [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    allowed = [*(allowed_hosts or ()), *allowed_hosts_from_env(), *bound]
    with engine_over(model, max_calls) as engine:
        app = create_app(engine, voice, max_calls=max_calls, system_prompt=system_prompt, max_frames=max_frames,
                         allowed_hosts=allowed, transcripts_dir=transcripts_dir)
        logger.info(f"browser page: http://localhost:{port}/" if local else f"browser page on {host}:{port}")
        logger.info(f"answering to the Host names {app.state.web.allowed_hosts.describe(port)}; others get 421 "
                    "(add a name browsers use with --allowed-host NAME)")
        if not local:
            logger.warning(f"listening on {host}: anyone who can reach it can talk to the model")
        logger.info(EXPOSE_HINT.format(port=port))
        app.state.web.serve_app(app, host=host, port=port, drain_seconds=drain_seconds)
