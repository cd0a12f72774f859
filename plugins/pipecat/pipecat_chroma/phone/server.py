"""The phone server, the same for every carrier: FastAPI + uvicorn, one Pipecat pipeline per
call, the carrier's protocol from a `Carrier` (carrier.py).

    from pipecat_chroma.phone.server import serve
    serve(model=model, voice=voice, provider="telnyx", port=8765, public_url="https://abc.ngrok.app")

`serve` is `chroma-agent serve phone --provider NAME` (entry point `chroma_agent.servers`:
`phone`; `serve twilio` is this with provider twilio); `check_serve_args` runs before the
model loads. Routes:

- the carrier's answer webhook (`carrier.webhook_path`: Twilio `POST /twiml`; body capped at
  `carrier.max_webhook_bytes`, 413; verified when the carrier's secret is set, else 403):
  the answer document connecting the call to the stream (with a single-use stream token
  when verified), or the carrier's busy answer at capacity or while draining;
- `carrier.event_path`, where the carrier has one (status callbacks: `on_carrier_event`);
- `WS carrier.stream_path` (`/ws`): the media stream. Over capacity or draining: HTTP 503 at
  the upgrade. No opening within `media_timeout_s`, or no audio for that long: ended;
- `GET /health` (the schema of every server, plus `"signatures"`), `GET /metrics`
  (Prometheus text: `chroma_agent.serving.metrics`), `GET /calls` (each call's record, its
  sids: only with the admin key, `Authorization: Bearer $CHROMA_AGENT_ADMIN_KEY`; 404 when
  none is set, 401 for another key);
- whatever `add_routes(app)` adds: `phone/outbound.py`'s `POST /calls` and `GET
  /calls/{id}` (with the phone API key, not the admin key), where it exists.

Call control (`PhoneServer.on_dtmf`, `transfer`, `hangup`, `say`) and hooks
(`on_call_started`, `call_started_hooks`): see PhoneServer. Limits and SIGTERM drain:
README "Running in production".
"""
from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import time
from collections import deque
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from loguru import logger
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.frames.frames import TTSSpeakFrame
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.aggregators.llm_response_universal import LLMUserAggregatorParams
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
from pipecat.workers.runner import WorkerRunner

from chroma_agent.serving.body_limit import BodyLimit
from chroma_agent.serving.call_server import CallServer, admin_refusal, engine_over
from chroma_agent.serving.log_format import set_call_context
from chroma_agent.serving.log_safety import carrier_id, printable
from chroma_agent.serving.phone_numbers import is_e164
from chroma_agent.serving.runner import DEFAULT_DRAIN_S, END_TIMEOUT_S
from chroma_agent.serving.tracing import configure_tracing

from ..call_pipeline import chroma_service, turn_detection, voice_pipeline
from ..call_worker import call_worker
from ..call_transcript import CallTranscripts, prepare_transcripts_dir
from ..service import ChromaSpeechToSpeechService
from ..twilio_guards import AdminKey, Refusals, end_when_silent, require_public_url
from ..twilio_guards import media_timeout_s as default_media_timeout_s
from ..twilio_stream_token import TOKEN_PARAMETER, StreamTokens
from .carrier import PROVIDERS, Carrier, HandshakeError, carrier_for, public, stream_url, stream_url_of
from .control import DTMF_DIGITS, CallControl, close_stream
from .greeting import HeldGreeting
from .records import CallRecord, CallWatcher, LiveCall, OutcomeCounts, calls_report, message_kind, meter_output

# Phone audio (8 kHz mu-law): 0.1 s of speech starts a turn and a lower volume floor lets a
# quiet line through, so a one-word barge-in ("Wait.") is caught; pipecat's defaults (0.2 s,
# volume 0.6) missed 3-6 of 16 test phrases. 0.2 s of silence hands the turn to Smart Turn,
# as by default. Measured: `benchmarks/bench_call.py --vad-sweep` (benchmarks/README.md).
PHONE_VAD = VADParams(confidence=0.7, start_secs=0.1, stop_secs=0.2, min_volume=0.3)
FINISHED_CALLS_KEPT = 50     # in GET /calls


class PhoneServer(CallControl, CallTranscripts, CallServer):
    """The phone server: its routes (`app()`), the calls in flight, the per-call pipeline,
    call control; admission, drain and `/health` are `CallServer`'s.

    `model`: a `ChromaEngine` (what `serve` runs: every call's conversation is a slot of
    it), or a loaded ChromaModel, shared by all calls; `voice`: a Voice or a voice file path;
    `carrier`: the carrier's protocol (None: Twilio's, `carrier_for("twilio", public_url)`);
    `public_url`: the https URL the carrier reaches this server at (required when a carrier
    signs what it calls and its secret is set: ValueError); `max_calls`: None -> the engine's
    `capacity`; `system_prompt`, `max_frames` (80 ms each): per reply; `greeting`: a line
    spoken when a call connects (an outbound call's: held until the callee spoke or
    `greeting.OUTBOUND_GREETING_PAUSE_S` passed); `vad_params` (PHONE_VAD); `media_timeout_s`:
    a stream without its opening, or without audio after it, this long is ended (None:
    `twilio_guards.media_timeout_s()`, 10 s); `admin_key`: the key of per-call data at
    GET /calls (None: CHROMA_AGENT_ADMIN_KEY); `metrics`: a `ServerMetrics` (default: on
    prometheus_client's REGISTRY, what GET /metrics shows); `transcripts_dir`: a JSON Lines file per call
    (`call_transcript`); `record_dir`: a recording per call (`recording.CallRecording`);
    `transfer_to`, `transfer_digit`: a caller who presses the digit is transferred to the
    number (`on_dtmf`); `voicemail_message` and `api_key` (POST /calls): `outbound`'s.

    `drain(seconds)` (what SIGTERM runs under `serve`): no new calls, the running ones
    may finish for `seconds`, then their streams are closed."""

    def __init__(self, model, voice, *, carrier: Carrier | None = None, public_url: str | None = None,
                 max_calls: int | None = None, system_prompt: str | None = None, max_frames: int | None = None,
                 greeting: str | None = None, vad_params: VADParams = PHONE_VAD,
                 media_timeout_s: float | None = None, admin_key: str | None = None,
                 transcripts_dir: str | None = None, record_dir: str | None = None,
                 transfer_to: str | None = None, transfer_digit: str | None = None,
                 voicemail_message: str | None = None, api_key: str | None = None, metrics=None):
        super().__init__(model, max_calls=max_calls, what="calls", say=logger.info, metrics=metrics)
        self.init_transcripts(transcripts_dir, server="phone")   # the folder made and checked now: ValueError
        self.model, self.voice = model, voice
        self.public_url = public(public_url)
        self.carrier = carrier if carrier is not None else carrier_for("twilio", self.public_url)
        self.system_prompt, self.max_frames, self.greeting = system_prompt, max_frames, greeting
        self.vad_params = vad_params
        weights = getattr(model, "model", model)   # an engine's model
        self.out_rate = int(getattr(weights, "sample_rate", 24000))   # the service's audio, resampled once
        # without authentication nothing is checked; a carrier whose answer cannot pass a token has none
        self.tokens = StreamTokens() if self.carrier.auth_enabled and self.carrier.stream_tokens else None
        self.media_timeout_s = media_timeout_s if media_timeout_s is not None else default_media_timeout_s()
        self.admin = AdminKey(admin_key)
        self.record_dir = record_dir
        if transfer_digit is not None and transfer_digit not in DTMF_DIGITS:
            raise ValueError(f"the transfer digit must be one of {DTMF_DIGITS}")
        self.transfer_to, self.transfer_digit = transfer_to, transfer_digit
        self.voicemail_message, self.api_key = voicemail_message, api_key
        # async hooks run for each call once its stream is taken, before its pipeline is built
        self.call_started_hooks: list[Callable[[LiveCall], Awaitable[None]]] = []
        self.finished: deque[CallRecord] = deque(maxlen=FINISHED_CALLS_KEPT)
        self.outcomes: dict[str, int] = OutcomeCounts(self.metrics)   # outbound calls per outcome (outbound.py's)
        self._refused = Refusals(logger.warning)
        self._background: set[asyncio.Task] = set()

    @property
    def active(self) -> dict[int, LiveCall]:
        """The calls holding a slot, per websocket."""
        return self.calls

    def health_extras(self) -> dict[str, Any]:
        return {"signatures": self.carrier.auth_enabled}

    def call_metrics(self, per_call: bool = False) -> dict[str, Any]:
        """What GET /calls answers (`records.calls_report`): aggregates over the kept calls;
        `per_call` adds each call's record, sids included (the admin's view)."""
        return calls_report(self, per_call)

    # -- the calls --
    async def handle_stream(self, websocket: WebSocket) -> None:
        """One media stream: refuse it at the upgrade when unverified (HTTP 403), draining or
        over capacity (HTTP 503), else take a slot and run the call (closed with 1008 when its
        opening is not the carrier's, or lacks a valid, unused token of its call), releasing
        the slot however it ends."""
        if not self.carrier.verify_upgrade(websocket):
            self.count_refusal("auth")
            self._refused("a media stream", f"missing or invalid {self.carrier.signature_name}")
            await websocket.close(code=1008)
            return
        if reason := self.refusal():
            self._refused("a media stream", reason, f"{len(self.active)} of {self.max_calls} calls running")
            await _deny(websocket, reason)
            return
        key = id(websocket)
        call = LiveCall(websocket, asyncio.current_task())
        self.hold(key, call, count=False)   # no await since the check; a call once its opening is taken
        try:
            await websocket.accept()
            await self._run_call(call)
        except asyncio.CancelledError:
            if not self.draining:   # the drain's last resort cancels a call that would not end
                raise
        except Exception:  # one call's failure stays in that call
            self.fail(key)
            logger.exception("a call failed")
        finally:
            try:
                await self.end_transcript(call.record, call.transcript)   # before the slot goes: a drain waits
                if call.recording is not None:
                    await self._close_recording(call)
            finally:
                self.release(key)
                call.ended.set()
            if call.record is not None:
                call.record.ended = time.time()
                self.finished.append(call.record)
                logger.info(call.record.summary())

    async def _open(self, call: LiveCall) -> bool:
        """The stream's opening, within the media timeout, its token redeemed: `call.start`
        and `call.record` set (True), else the stream closed with 1008 (False)."""
        websocket, title = call.websocket, self.carrier.title
        try:
            start = await asyncio.wait_for(self.carrier.handshake(websocket), self.media_timeout_s)
        except HandshakeError as e:
            why = printable(e, 200)
        except Exception as e:  # timed out, closed, binary, not JSON, nested too deep, wrong types
            why = f"{type(e).__name__}: {printable(e, 200) or 'timed out'}"
        else:
            why = None
        if why is not None:   # a stream the drain closed in its handshake is no invalid one
            self.count_refusal("draining" if self.draining else "invalid")
            self._refused("a stream", f"no {title} start", why)
            await close_stream(websocket, 1008)
            return False
        if self.tokens is not None:   # the upgrade's signature is replayable: the token is one call's, once
            if problem := self.tokens.redeem(start.parameters.get(TOKEN_PARAMETER), start.call_id):
                self.count_refusal("auth")
                self._refused("a media stream", problem, f"call {carrier_id(start.call_id) or '(id not logged)'}")
                await close_stream(websocket, 1008)
                return False
        call.start = start
        call.record = CallRecord(start.call_id or "?", start.stream_id, provider=self.carrier.name)
        self.hold(id(websocket), call)   # its slot, held since the upgrade: a call from now on
        return True

    async def _run_call(self, call: LiveCall) -> None:
        if not await self._open(call):
            return
        websocket, record = call.websocket, call.record
        await self.on_call_started(call)
        record.direction = "outbound" if call.outbound else "inbound"
        call_sid = record.call_sid
        set_call_context(call_id=record.id)   # this task's lines and its pipeline's carry our id (never reset: the task ends)
        logger.info(f"call {record.label} started ({record.provider}, {record.direction})")

        worker: PipelineWorker | None = None
        ending: list[asyncio.Task] = []

        def end_call() -> None:  # from the receive loop: cancel in a task, not under our own feet
            if worker is not None and not ending:
                ending.append(asyncio.get_running_loop().create_task(worker.cancel(reason="call ended")))

        serializer = call.serializer = self.carrier.serializer(call.start, end_call)
        serializer.call_id = record.id
        watcher = CallWatcher(record, self.metrics)   # the record's turns, the Prometheus metrics
        if self.record_dir is not None:
            try:
                call.recording = self.make_recording(call)
                serializer.audio_taps.append(call.recording.tap)
            except Exception:   # a recording that cannot start never costs the call
                logger.exception(f"call {record.label}: the recording could not start")
        # carriers send no Origin: a PIPECAT_ALLOWED_ORIGINS must not refuse them. Output at the
        # model's rate in whole 80 ms frames: the serializer resamples each at once
        transport = FastAPIWebsocketTransport(websocket, FastAPIWebsocketParams(
            audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False, serializer=serializer,
            allowed_origins=[], audio_out_10ms_chunks=8,
            fixed_audio_packet_size=getattr(self.carrier, "fixed_audio_packet_size", None)))  # Vonage: 20 ms messages
        meter_output(transport.output(), watcher)   # reply audio sent, late or dropped
        # the ONNX sessions load in ~70 ms: off the event loop, which other calls share
        user_params = await asyncio.to_thread(self.make_user_params)
        call.transcript = self.transcript_recorder(record, call_sid)
        service = call.service = self.make_service()
        service.frame_watchers += [watcher, call.watch_speech, self._dtmf_watcher(call)]
        held = [HeldGreeting(self.greeting)] if self.greeting and call.outbound else []
        pipeline = voice_pipeline(transport, service, user_params, call.transcript, before_service=held)
        # no conversation (e.g. out of GPU memory) refuses this call at once; one trace per call, named by our id
        worker = call.worker = call_worker(pipeline, kind="phone", out_rate=self.out_rate, usage_metrics=True,
                                           call_id=record.id, span_attributes={"carrier": self.carrier.name},
                                           enable_rtvi=False)
        call.end = end_call

        @transport.event_handler("on_client_disconnected")
        async def on_client_disconnected(transport, websocket):  # a dropped line: free the call now
            end_call()

        if self.greeting and not call.outbound:
            @transport.event_handler("on_client_connected")
            async def greet(transport, websocket):
                await worker.queue_frame(TTSSpeakFrame(self.greeting))

        runner = WorkerRunner(handle_sigint=False)   # uvicorn owns the signals
        await runner.add_workers(worker)
        serializer.last_media = time.monotonic()   # the pipeline's start is not the caller's silence
        watchdog = asyncio.create_task(end_when_silent(
            lambda: serializer.last_media, self.media_timeout_s, end_call,
            lambda why: logger.warning(f"call {record.label}: {why}")))
        try:
            await runner.run()
        finally:
            watchdog.cancel()
            watcher.close()
            if not service.is_usable:   # no conversation (e.g. out of GPU memory): a failed call
                self.fail(id(websocket))
            record.ignored_messages = sum(serializer.ignored.values())
            for kind, count in serializer.ignored.items():
                self.metrics.invalid_message(message_kind(kind), count)
            if ending:
                await asyncio.gather(*ending, return_exceptions=True)

    async def end_calls(self) -> None:
        """The drain's deadline: each call's pipeline is cancelled (its conversation and
        engine slot freed) and its stream closed; one still in the handshake is closed."""
        for call in list(self.active.values()):
            if call.end is not None:
                call.end()
            else:
                await close_stream(call.websocket, 1001)

    async def cancel_calls(self) -> None:
        """A call that would not end: its task goes."""
        for call in list(self.active.values()):
            if call.task is not None:
                call.task.cancel()

    # -- routes --
    def app(self) -> FastAPI:
        """The routes: the carrier's webhook (and event path), its stream, GET /health,
        GET /metrics (Prometheus), GET /calls (admin key), and what `add_routes` adds."""
        carrier = self.carrier
        if not carrier.auth_enabled:
            logger.warning(carrier.auth_warning())
        app = FastAPI(title="chroma-agent phone server")
        app.state.phone = self
        # every body is capped before a route reads it (413): a carrier's webhook is ~1-2 KiB
        app.add_middleware(BodyLimit, max_bytes=carrier.max_webhook_bytes,
                           on_refused=lambda reason: self._refused("a request", reason))
        if carrier.webhook_path is not None:
            app.add_api_route(carrier.webhook_path, self._answer, methods=list(carrier.webhook_methods))
        if carrier.event_path is not None:
            app.add_api_route(carrier.event_path, self._event, methods=["POST"])

        @app.websocket(carrier.stream_path)
        async def media_stream(websocket: WebSocket) -> None:
            await self.handle_stream(websocket)

        self.add_health(app)
        self.add_metrics(app)

        @app.get("/calls")
        async def calls(request: Request) -> JSONResponse:
            """Each call's record (its sids; never a number or words): the admin's, with
            `Authorization: Bearer $CHROMA_AGENT_ADMIN_KEY` (404 when no admin key is set,
            401 for another key). outbound.py's `POST /calls`, `GET /calls/{id}` take the
            phone API key instead."""
            if status := admin_refusal(request.headers.get("authorization"), self.admin.key):
                if status == 401:
                    self._refused("a calls request", "a wrong admin key")
                why = "invalid admin key" if status == 401 else "per-call data is off: set CHROMA_AGENT_ADMIN_KEY"
                return JSONResponse({"error": why}, status_code=status,
                                    headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)
            return JSONResponse(self.call_metrics(per_call=True))

        self.add_routes(app)
        return app

    def add_routes(self, app: FastAPI) -> None:
        """More routes: `phone/outbound.py`'s (`add_outbound_routes(server, app)`: POST /calls,
        GET /calls/{id} and its callbacks, beside GET /calls), where that module exists.
        Override to add your own; call super()."""
        name = f"{__package__}.outbound"
        if importlib.util.find_spec(name) is not None:
            calls = importlib.import_module(name).add_outbound_routes(self, app)
            started = getattr(calls, "call_started", None)
            if started is not None and started not in self.call_started_hooks:   # marks its calls outbound
                self.call_started_hooks.append(started)

    async def _verified_form(self, request: Request, what: str, count: bool = False) -> dict[str, str] | Response:
        body = await request.body()   # capped by BodyLimit
        try:
            if not await self.carrier.verify_webhook(request, body):   # before any other work
                if count:   # a call's answer webhook: a call refused
                    self.count_refusal("auth")
                self._refused(what, f"missing or invalid {self.carrier.signature_name}")
                return Response(f"invalid {self.carrier.title} signature", status_code=403)
            return self.carrier.webhook_form(request, body)
        except ValueError:   # over 200 fields, a malformed signature header
            if count:
                self.count_refusal("invalid")
            self._refused(what, "a malformed request")
            return Response("malformed request", status_code=400)

    async def _answer(self, request: Request) -> Response:
        """The answer webhook: the call connected to the stream, or refused as busy."""
        form = await self._verified_form(request, "a webhook", count=True)
        if isinstance(form, Response):
            return form
        call_id = self.carrier.webhook_call_id(form)
        if reason := self.refusal():
            self._refused("a call", reason, f"call {carrier_id(call_id) or '(id not logged)'}")
            return self.carrier.busy(request, form)
        token = None if self.tokens is None else self.tokens.issue(call_id)
        url = stream_url(request, self.public_url, self.carrier.stream_path)
        return self.carrier.answer(request, form, url, token)

    async def _event(self, request: Request) -> Response:
        form = await self._verified_form(request, "an event")
        if isinstance(form, Response):
            return form
        await self.on_carrier_event(form)
        return Response(status_code=204)

    async def on_carrier_event(self, form: dict[str, str]) -> None:
        """A verified request to the carrier's `event_path` (call status): nothing by default."""

    # -- per call: override these to change the pipeline --
    def make_service(self) -> ChromaSpeechToSpeechService:
        """The speech-to-speech service of one call (the model and voice are shared); it
        transcribes the caller only when something takes the transcripts (a hook, a folder)."""
        return chroma_service(self.model, self.voice, system_prompt=self.system_prompt, max_frames=self.max_frames,
                              transcribe=self.records_transcripts)

    def make_user_params(self) -> LLMUserAggregatorParams:
        """Turn detection of one call: Silero VAD + Smart Turn v3, both local ONNX (built off
        the event loop). There is no speech-to-text, so the stop strategy must not wait for
        a transcript."""
        return turn_detection(self.vad_params)


async def _deny(websocket: WebSocket, reason: str) -> None:
    """Refuse a stream at the upgrade with HTTP 503 (a server without the ASGI denial
    response extension: 403)."""
    try:
        await websocket.send_denial_response(JSONResponse({"error": reason}, status_code=503))
    except RuntimeError:
        await websocket.close(code=1013)


def create_app(model, voice, *, provider: str = "twilio", carrier: Carrier | None = None, **options) -> FastAPI:
    """The phone server as a FastAPI app (run it with `run_app`, or add routes of your own):
    `carrier` (else `carrier_for(provider, public_url)`) and `options`, PhoneServer's. To
    change the pipeline, subclass PhoneServer and call its `app()` (examples/twilio_phone_agent.py)."""
    if carrier is None:
        carrier = carrier_for(provider, public(options.get("public_url")))
    return PhoneServer(model, voice, carrier=carrier, **options).app()


def run_app(app: FastAPI, *, host: str, port: int, drain_seconds: float = DEFAULT_DRAIN_S) -> None:
    """Run a phone server's app with uvicorn (blocks), with the limits in place (the
    carrier's `max_message_bytes` per websocket message) and SIGTERM as a drain:
    `app.state.phone` drains for `drain_seconds`, then the process exits normally (0)."""
    phone = app.state.phone
    phone.serve_app(app, host=host, port=port, drain_seconds=drain_seconds,
                    ws_max_size=phone.carrier.max_message_bytes, timeout_graceful_shutdown=END_TIMEOUT_S)


def check_serve_args(*, provider: str = "twilio", public_url: str | None = None, media_timeout_s: float | None = None,
                     transcripts_dir: str | None = None, record_dir: str | None = None,
                     transfer_to: str | None = None, transfer_digit: str | None = None,
                     voicemail_message: str | None = None, **_other) -> None:
    """What `serve` refuses (ValueError, naming the fix), checked without a model so that a
    command line can fail before it loads one: an unknown provider, the carrier's own
    configuration (e.g. TWILIO_AUTH_TOKEN without `public_url`), a media timeout (given, or
    CHROMA_AGENT_TWILIO_MEDIA_TIMEOUT_S) not above 0, a transcripts or recordings folder that
    cannot be made or written, a transfer number that is not E.164, a transfer
    digit that is not a key, or one without a number. Takes `serve`'s options."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}: choose one of {', '.join(PROVIDERS)}")
    if provider == "twilio":   # the message of `serve twilio` since before carriers
        require_public_url(os.environ.get("TWILIO_AUTH_TOKEN"), public_url)
    carrier_for(provider, public(public_url)).check_config()
    prepare_transcripts_dir(transcripts_dir)
    if record_dir is not None:
        from .recording import prepare_record_dir   # only where recordings are on

        prepare_record_dir(record_dir)
    if media_timeout_s is None:
        default_media_timeout_s()
    elif not media_timeout_s > 0:
        raise ValueError(f"the media timeout must be above 0 seconds, got {media_timeout_s}")
    if transfer_to is not None and not is_e164(transfer_to):
        raise ValueError("--transfer-to: give an E.164 phone number such as +15105550100")
    if transfer_digit is not None:
        if transfer_digit not in DTMF_DIGITS or len(transfer_digit) != 1:
            raise ValueError(f"--transfer-digit: one key of {DTMF_DIGITS}")
        if transfer_to is None:
            raise ValueError("--transfer-digit needs --transfer-to NUMBER: where the call goes")
    if voicemail_message is not None and not voicemail_message.strip():
        raise ValueError("--voicemail-message is empty: give the message, or leave the option out")


def serve(*, model, voice, provider: str = "twilio", host: str = "0.0.0.0", port: int = 8765,
          public_url: str | None = None, max_calls: int | None = None, system_prompt: str | None = None,
          max_frames: int | None = None, greeting: str | None = None, drain_seconds: float = DEFAULT_DRAIN_S,
          media_timeout_s: float | None = None, transcripts_dir: str | None = None, record_dir: str | None = None,
          transfer_to: str | None = None, transfer_digit: str | None = None, voicemail_message: str | None = None,
          api_key: str | None = None) -> None:
    """Run the phone server for `provider` until SIGTERM (drained, see `run_app`) or Ctrl-C
    (blocks). The model is loaded by the caller, before the port opens; the server runs one
    `ChromaEngine` over it (a given engine is used as is), whose capacity is `max_calls`
    when given, else measured at start. `transfer_to` without `transfer_digit`: the digit
    is 0. See PhoneServer for the rest. First `check_serve_args` (ValueError, before the
    engine starts). Traces over OTLP where the OTEL_ variables ask (`configure_tracing`)."""
    configure_tracing()
    check_serve_args(provider=provider, public_url=public_url, media_timeout_s=media_timeout_s,
                     transcripts_dir=transcripts_dir, record_dir=record_dir, transfer_to=transfer_to,
                     transfer_digit=transfer_digit, voicemail_message=voicemail_message)
    if transfer_to is not None and transfer_digit is None:
        transfer_digit = "0"
    with engine_over(model, max_calls) as engine:
        app = create_app(engine, voice, provider=provider, public_url=public_url, max_calls=max_calls,
                         system_prompt=system_prompt, max_frames=max_frames, greeting=greeting,
                         media_timeout_s=media_timeout_s, transcripts_dir=transcripts_dir, record_dir=record_dir,
                         transfer_to=transfer_to, transfer_digit=transfer_digit,
                         voicemail_message=voicemail_message, api_key=api_key)
        phone = app.state.phone
        carrier, base = phone.carrier, (phone.public_url or "https://<this server's public host>").rstrip("/")
        stream = stream_url_of(base, carrier.stream_path)
        where = (f"the {carrier.title} number's voice webhook: {'/'.join(carrier.webhook_methods)} "
                 f"{base}{carrier.webhook_path}" if carrier.webhook_path is not None
                 else f"point {carrier.title}'s stream at {stream}")
        logger.info(f"phone server on {host}:{port}, up to {phone.max_calls} calls at once; {where}")
        run_app(app, host=host, port=port, drain_seconds=drain_seconds)
