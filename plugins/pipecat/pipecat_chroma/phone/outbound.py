"""Outbound calls on the phone server: an HTTP API that places a call through the carrier's
REST API, the carrier's status and answering-machine-detection (AMD) callbacks, and what an
outbound call does differently once it streams.

    add_outbound_routes(server, app)     # PhoneServer.app() calls it

Routes (`Authorization: Bearer KEY`: the server's `api_key`, else $CHROMA_AGENT_PHONE_API_KEY;
with no key set the API is off and its routes answer 404 saying how to turn it on):

- `POST /calls` `{"to": "+15105550100", "from": "+15105550199", "voicemail_message"?: str,
  "machine_detection"?: bool}` (E.164 numbers; the body at most 4 KiB): places the call and
  answers 201 `{"id", "state", "outcome", ...}`; 400 for a bad body or a number the carrier
  refuses, 401 for a wrong key, 503 at capacity (the running calls and the calls placed but
  not streaming yet fill `max_calls`) or while draining, 502/504 when the carrier's API fails
  (the call's outcome: failed).
- `GET /calls/{id}`: its state (queued, ringing, in-progress, completed...), `outcome`
  (answered / machine / busy / no-answer / failed, null until known), `answered_by` (AMD's
  verdict), `error`, `done`. The last CALLS_KEPT calls are kept.
- `POST /calls/{id}/events`: the carrier's status and AMD callbacks (one URL for both),
  verified as its webhooks are (`carrier.verify_webhook`: 403 otherwise).

An outbound call's stream is marked `call.outbound` (`call_started`, a hook of the server):
the server then speaks its greeting only after the callee's first words ended, or a short
pause passed with them silent (`greeting.HeldGreeting`): it is not lost to "Hello?". When
AMD says a machine answered (with DetectMessageEnd: after the recorded greeting's beep),
the call's voicemail message (the request's, else the server's) is said (`server.say`) and
the call hung up (`server.hangup`); a person gets the conversation.
Outcome counts are `server.outcomes` (for /metrics). Logs carry ids, never numbers.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from loguru import logger

from chroma_agent.serving.call_server import bearer_key_matches
from chroma_agent.serving.log_safety import carrier_id, printable
from chroma_agent.serving.phone_numbers import is_e164

from .carrier import NotSupported
from .twilio_rest import TwilioAPIError

API_KEY_ENV = "CHROMA_AGENT_PHONE_API_KEY"
OUTCOMES = ("answered", "machine", "busy", "no-answer", "failed")
MAX_BODY_BYTES = 4 * 1024          # POST /calls: two numbers and a short message
MAX_CALLBACK_BYTES = 16 * 1024     # a carrier's callback form is ~1-2 KiB
MAX_VOICEMAIL_CHARS = 500          # ~30 s spoken
CALLS_KEPT = 200                   # GET /calls/{id} answers for the latest ones
PENDING_TIMEOUT_S = 180.0          # placed, not streaming, no final status: the slot it reserved is freed
PIPELINE_WAIT_S = 10.0             # a machine's call: its pipeline up within this, or it is hung up
VOICEMAIL_MAX_S = 60.0             # saying the voicemail message takes at most this
CALL_ID = re.compile(r"[0-9a-f]{16}")
BODY_KEYS = {"to", "from", "voicemail_message", "machine_detection"}
# the carrier's call status -> the outcome it settles (in-progress: answered, unless AMD decides)
FINAL_STATUS = {"busy": "busy", "no-answer": "no-answer", "failed": "failed", "canceled": "failed"}
MACHINE = {"machine_start", "machine_end_beep", "machine_end_silence", "machine_end_other", "fax"}


@dataclass(eq=False)
class OutboundCall:
    """One placed call: our `id`, the carrier's `call_id` (once known), its `state` (the
    carrier's last status), `outcome`, `answered_by` (AMD's verdict), `error`. The numbers
    and the voicemail message are kept for the call only, never shown or logged."""

    id: str
    to: str
    from_: str
    voicemail_message: str | None
    machine_detection: bool
    created: float = field(default_factory=time.time)
    call_id: str | None = None
    state: str = "placing"
    outcome: str | None = None
    answered_by: str | None = None
    error: str | None = None
    ended: float | None = None
    streamed: bool = False              # its media stream started
    voicemail_left: bool = False
    acted: bool = False                 # the machine verdict was acted on (said, hung up)
    live: Any = None                    # weakref to the server's LiveCall once it streams

    @property
    def done(self) -> bool:
        return self.ended is not None

    def as_dict(self) -> dict[str, Any]:
        """What GET /calls/{id} answers: no numbers, no message."""
        return {"id": self.id, "state": self.state, "outcome": self.outcome, "answered_by": self.answered_by,
                "error": self.error, "done": self.done, "voicemail_left": self.voicemail_left,
                "created": self.created, "ended": self.ended}


class OutboundCalls:
    """The outbound calls of one PhoneServer (`server.outbound_calls`): placing, callbacks,
    the recent calls, the outcome counts (`outcomes`, also `server.outcomes`)."""

    def __init__(self, server, api_key: str | None = None):
        self.server = server
        self.api_key = api_key or os.environ.get(API_KEY_ENV) or None
        self.calls: OrderedDict[str, OutboundCall] = OrderedDict()
        self.by_call_id: dict[str, OutboundCall] = {}
        outcomes = getattr(server, "outcomes", None)
        self.outcomes: dict[str, int] = outcomes if isinstance(outcomes, dict) else {}
        for name in OUTCOMES:
            self.outcomes.setdefault(name, 0)
        self.pending_timeout_s = PENDING_TIMEOUT_S
        self._tasks: set[asyncio.Task] = set()

    @property
    def enabled(self) -> bool:
        return self.api_key is not None

    # -- the calls --
    def lookup(self, call_id: str | None) -> OutboundCall | None:
        """The outbound call whose carrier call id is `call_id` (None: an inbound call)."""
        return self.by_call_id.get(call_id) if call_id else None

    def pending(self) -> int:
        """Calls placed whose stream has not started (each will take a slot) and that are
        not over; a call with no news for `pending_timeout_s` is given up (failed)."""
        now, count = time.time(), 0
        for call in list(self.calls.values()):
            if call.done or call.streamed:
                continue
            if now - call.created > self.pending_timeout_s:
                self._settle(call, "failed", error=f"no call status from the carrier within {self.pending_timeout_s:g} s "
                                                   "(can it reach this server's public URL?)")
                self._end(call)
                continue
            count += 1
        return count

    def _keep(self, call: OutboundCall) -> None:
        self.calls[call.id] = call
        while len(self.calls) > CALLS_KEPT:   # the oldest finished call goes, else the oldest
            oldest = next((k for k, c in self.calls.items() if c.done), next(iter(self.calls)))
            gone = self.calls.pop(oldest)
            if gone.call_id:
                self.by_call_id.pop(gone.call_id, None)

    def _adopt(self, call: OutboundCall, call_id: str) -> None:
        if call_id and call.call_id is None:
            call.call_id = call_id
            self.by_call_id[call_id] = call

    def _settle(self, call: OutboundCall, outcome: str, *, error: str | None = None) -> None:
        """The call's outcome, once (counted then)."""
        if call.outcome is not None:
            return
        call.outcome = outcome
        if error:
            call.error = error
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        live = call.live() if call.live is not None else None
        if live is not None and live.record is not None:
            live.record.outcome = outcome
        logger.info(f"outbound call {call.id}: {outcome}")

    def _end(self, call: OutboundCall) -> None:
        if call.ended is None:
            call.ended = time.time()

    # -- placing --
    def new(self, to: str, from_: str, voicemail_message: str | None, machine_detection: bool) -> OutboundCall:
        """A call to place, kept (the oldest finished one goes past CALLS_KEPT)."""
        call = OutboundCall(secrets.token_hex(8), to, from_, voicemail_message, machine_detection)
        self._keep(call)
        return call

    async def place(self, call: OutboundCall) -> None:
        """Place `call` through the carrier; its errors (TwilioAPIError, NotSupported, ...)
        are raised, the call settled as failed first."""
        server = self.server
        public = server.public_url.rstrip("/")
        answer_url = f"{public}{server.carrier.webhook_path}?outbound={call.id}"
        status_url = f"{public}/calls/{call.id}/events"
        try:
            call_id = await server.carrier.place_call(call.to, call.from_, answer_url, status_url,
                                                      call.machine_detection)
        except Exception as e:
            known = isinstance(e, (TwilioAPIError, NotSupported))
            self._settle(call, "failed", error=str(e) if known else f"placing the call failed ({type(e).__name__})")
            call.state = "failed"
            self._end(call)
            raise
        self._adopt(call, call_id)
        if call.state == "placing":
            call.state = "queued"
        sid = carrier_id(call_id)   # the carrier's id only when the operator asked for it
        logger.info(f"outbound call {call.id} placed" + (f" (carrier call {sid})" if sid else ""))

    # -- the carrier's callbacks --
    def on_event(self, call: OutboundCall, form: dict[str, str]) -> None:
        """A status callback (CallStatus) and/or an AMD callback (AnsweredBy)."""
        self._adopt(call, form.get("CallSid", ""))
        answered_by = form.get("AnsweredBy")
        if answered_by and call.answered_by is None:   # first: a `completed` status carries the verdict too
            self._on_verdict(call, answered_by)
        status = form.get("CallStatus")
        if status:
            self._on_status(call, status)

    def _on_status(self, call: OutboundCall, status: str) -> None:
        if call.done:
            return
        call.state = printable(status, 20)
        if status == "in-progress" and not call.machine_detection:
            self._settle(call, "answered")
        elif status in FINAL_STATUS:
            self._settle(call, FINAL_STATUS[status], error=None if status != "canceled" else "canceled")
            self._end(call)
        elif status == "completed":
            self._settle(call, "answered")   # answered, and AMD said nothing before it ended
            self._end(call)

    def _on_verdict(self, call: OutboundCall, answered_by: str) -> None:
        call.answered_by = printable(answered_by, 30)
        machine = answered_by in MACHINE
        self._settle(call, "machine" if machine else "answered")   # human, unknown: a person's conversation
        live = call.live() if call.live is not None else None
        if machine and live is not None:
            self._act_on_machine(call, live)

    def _act_on_machine(self, call: OutboundCall, live) -> None:
        if call.acted:
            return
        call.acted = True
        self._spawn(self._leave_voicemail(call, live))

    async def _leave_voicemail(self, call: OutboundCall, live) -> None:
        """The voicemail message (the call's, else the server's; none: just hang up) after
        the beep, then the hang-up."""
        message = call.voicemail_message or getattr(self.server, "voicemail_message", None)
        if call.answered_by == "fax":
            message = None
        try:
            if message:
                # the hook runs before the call's pipeline exists: say() needs it running
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PIPELINE_WAIT_S):
                        while live.worker is None and not live.ended.is_set():
                            await asyncio.sleep(0.05)
                # a recorded greeting's noise must not cut the message short: not interruptible
                call.voicemail_left = await self.server.say(live, message, interruptible=False,
                                                            timeout=VOICEMAIL_MAX_S)
            await self.server.hangup(live)
        except Exception as e:  # the call may have ended meanwhile: its own business, not the server's
            logger.warning(f"outbound call {call.id}: leaving the voicemail failed: {type(e).__name__}: "
                           f"{printable(e, 200)}")

    # -- the call's stream --
    async def call_started(self, live) -> None:
        """The server's `call_started_hooks` hook, once a stream is taken: a call placed here
        (found by its carrier call id) is marked `live.outbound` (the server holds its
        greeting: `greeting.HeldGreeting`), and a machine verdict that came first is acted on."""
        call = self.lookup(getattr(live.start, "call_id", None))
        if call is None:
            return
        live.outbound = True
        live.data["outbound_id"] = call.id
        call.streamed = True
        call.live = weakref.ref(live)
        if live.record is not None:
            live.record.outcome = call.outcome
        if call.outcome == "machine":
            self._act_on_machine(call, live)

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


# -- the routes ------------------------------------------------------------------------------

def _error(status: int, message: str, **extra) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({**extra, "error": message}, status_code=status, headers=headers)


def parse_call_request(body: bytes) -> tuple[str, str, str | None, bool]:
    """(to, from, voicemail message, machine detection) of POST /calls' body; ValueError
    naming the problem."""
    if len(body) > MAX_BODY_BYTES:
        raise ValueError(f"the body is over {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise ValueError("the body is not JSON: send {\"to\": \"+1...\", \"from\": \"+1...\"}") from None
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object with \"to\" and \"from\"")
    if unknown := set(data) - BODY_KEYS:
        raise ValueError(f"unknown field(s): {printable(', '.join(sorted(map(str, unknown))), 80)} "
                         f"(known: {', '.join(sorted(BODY_KEYS))})")
    numbers = []
    for key in ("to", "from"):
        value = data.get(key)
        if not is_e164(value):
            raise ValueError(f"\"{key}\" must be an E.164 phone number such as +15105550100")
        numbers.append(value)
    message = data.get("voicemail_message")
    if message is not None:
        if not isinstance(message, str) or not message.strip():
            raise ValueError("\"voicemail_message\" must be a non-empty string")
        if len(message) > MAX_VOICEMAIL_CHARS:
            raise ValueError(f"\"voicemail_message\" is over {MAX_VOICEMAIL_CHARS} characters")
        if not message.isprintable():
            raise ValueError("\"voicemail_message\" has control characters")
    detect = data.get("machine_detection", True)
    if not isinstance(detect, bool):
        raise ValueError("\"machine_detection\" must be true or false")
    return numbers[0], numbers[1], message, detect


def add_outbound_routes(server, app: FastAPI) -> OutboundCalls:
    """Mount POST /calls, GET /calls/{id} and the carrier's callbacks on `app` for `server`
    (a PhoneServer: `carrier`, `public_url`, `api_key`, `greeting`, `voicemail_message`,
    `refusal()`, `active`, `max_calls`, `say`, `hangup`); returns the OutboundCalls, also
    `server.outbound_calls`, whose `call_started(call)` the server calls for each stream."""
    calls = OutboundCalls(server, getattr(server, "api_key", None))
    server.outbound_calls = calls
    server.outcomes = calls.outcomes
    off = _error(404, f"outbound calls are off: set {API_KEY_ENV} (or start with --api-key) to turn them on")
    if calls.enabled and not server.public_url:
        logger.warning("outbound calls need --public-url (the carrier fetches the call's answer webhook there): "
                       "POST /calls answers 503 until then")

    def authorized(request: Request) -> JSONResponse | None:
        if not calls.enabled:
            return off
        if not bearer_key_matches(request.headers.get("authorization"), calls.api_key):
            return _error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'")
        return None

    @app.post("/calls")
    async def place_call(request: Request) -> Response:
        """Place an outbound call (see the module's docstring)."""
        if (refused := authorized(request)) is not None:
            return refused
        body = await request.body()   # the server's BodyLimit caps it first
        try:
            to, from_, message, detect = parse_call_request(body)
        except ValueError as e:
            return _error(400, str(e))
        if not server.public_url:
            return _error(503, "outbound calls need the server's --public-url: the carrier fetches the call's "
                               "answer webhook there")
        if reason := server.refusal():
            return _error(503, f"not placing calls now: {reason}")
        if len(server.active) + calls.pending() >= server.max_calls:
            return _error(503, f"at capacity: {server.max_calls} calls running or being placed")
        call = calls.new(to, from_, message, detect)
        try:
            await calls.place(call)
        except NotSupported as e:
            return _error(501, str(e), **call.as_dict())
        except TwilioAPIError as e:
            logger.warning(f"outbound call {call.id}: the carrier's API refused it: "
                           f"{'timed out' if e.timed_out else f'HTTP {e.status}'}, error {e.code}")
            # the carrier refusing the request's numbers is the caller's to fix (400); the rest is ours
            status = 400 if e.status in (400, 404, 422) else 504 if e.timed_out else 502
            return _error(status, str(e), **call.as_dict())
        except Exception:
            logger.exception(f"outbound call {call.id}: placing it failed")
            return _error(502, call.error or "placing the call failed", **call.as_dict())
        return JSONResponse(call.as_dict(), status_code=201, headers={"Location": f"/calls/{call.id}"})

    @app.get("/calls/{call_id}")
    async def get_call(call_id: str, request: Request) -> Response:
        """An outbound call's state and outcome."""
        if (refused := authorized(request)) is not None:
            return refused
        calls.pending()   # gives up on calls the carrier never reported on
        call = calls.calls.get(call_id) if CALL_ID.fullmatch(call_id) else None
        if call is None:
            return _error(404, f"no such call (the last {CALLS_KEPT} are kept)")
        return JSONResponse(call.as_dict())

    @app.post("/calls/{call_id}/events")
    async def call_events(call_id: str, request: Request) -> Response:
        """The carrier's status and AMD callbacks of one call."""
        if not calls.enabled:
            return off
        body = await request.body()
        if len(body) > MAX_CALLBACK_BYTES:
            return Response("too large", status_code=413)
        if not await server.carrier.verify_webhook(request, body):   # before any other work
            logger.warning(f"refused a call event: invalid {server.carrier.title} signature")
            return Response("invalid signature", status_code=403)
        call = calls.calls.get(call_id) if CALL_ID.fullmatch(call_id) else None
        if call is None:
            return Response("no such call", status_code=404)
        try:
            form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=200))
        except ValueError:   # over 200 fields: not the carrier's
            return Response("too many fields", status_code=400)
        sid = form.get("CallSid", "")
        if call.call_id is not None and sid and sid != call.call_id:
            return Response("not this call", status_code=403)
        calls.on_event(call, form)
        return Response(status_code=204)

    return calls
