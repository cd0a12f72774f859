"""What the phone server needs from a carrier: `Carrier`, one subclass per carrier
(twilio.py, telnyx.py, plivo.py, exotel.py, vonage.py), found by name in `PROVIDERS`.

The server (server.py) is the same for every carrier: admission, capacity, drain, /health,
/metrics, transcripts, recordings, limits, call control. A carrier supplies only what
differs: its answer webhook and answer document, its request authentication, its media
stream's handshake and serializer (Pipecat's, made safe against bad messages), and its REST
API for hanging up, transferring and placing calls where it has one.
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping
from urllib.parse import parse_qsl, urlsplit

from fastapi import Request, WebSocket
from fastapi.responses import Response
from pipecat.serializers.base_serializer import FrameSerializer

# provider name -> module (in this package) whose `CARRIER` is its Carrier subclass
PROVIDERS = {"twilio": "twilio", "telnyx": "telnyx", "plivo": "plivo", "exotel": "exotel", "vonage": "vonage"}


class HandshakeError(Exception):
    """A media stream did not open as its carrier's does (no start, wrong fields, another
    carrier's protocol): the stream is closed (1008) and logged; no other call is touched.
    The message is a fixed phrase, never the client's text."""


class NotSupported(Exception):
    """The carrier has no API for this (e.g. transfer on Exotel): the message names the
    carrier and what to use instead."""


@dataclass
class StreamStart:
    """A media stream's opening, as its carrier sent it: `stream_id` and `call_id` (the
    carrier's own ids: never logged unescaped, never in a metric label), `parameters` (custom
    parameters the answer document passed through, e.g. the stream token), `encoding` and
    `sample_rate` of the carrier's audio, `extra` (anything else the serializer needs)."""

    stream_id: str
    call_id: str
    parameters: dict[str, str] = field(default_factory=dict)
    encoding: str = "PCMU"
    sample_rate: int = 8000
    extra: dict[str, Any] = field(default_factory=dict)


def xml_response(document: str) -> Response:
    """An XML answer document (TwiML, TeXML, Plivo XML) as the webhook's response."""
    return Response(document, media_type="application/xml")


class Carrier:
    """One carrier's protocol. Subclasses set the class attributes and override the methods;
    the defaults are what a carrier without the feature does.

    `public_url`: the https URL the carrier reaches this server at (needed when the
    carrier signs the URL it calls); `env`: where secrets come from (os.environ)."""

    name: ClassVar[str]                      # "twilio": the --provider value
    title: ClassVar[str]                     # "Twilio": in messages and the README
    webhook_path: ClassVar[str | None]       # the answer webhook ("/twiml"); None: configured in the dashboard (Exotel)
    webhook_methods: ClassVar[tuple[str, ...]] = ("POST",)
    event_path: ClassVar[str | None] = None  # call status / AMD callbacks ("/status"), if the carrier sends them
    stream_path: ClassVar[str] = "/ws"       # the media websocket
    secret_env: ClassVar[tuple[str, ...]] = ()   # environment variables of its request-authentication secret(s)
    signature_name: ClassVar[str] = "signature"  # what a refused request lacked, in the log ("X-Twilio-Signature")
    busy_xml: ClassVar[str | None] = None        # an XML carrier's document refusing a call (TwiML's <Reject>, ...)
    call_id_field: ClassVar[str | None] = None   # the answer webhook's call id parameter ("CallSid")
    # the answer document passes the stream token back in the stream's start (StreamStart.parameters
    # [TOKEN_PARAMETER]): with authentication on, the server then requires it (False: Exotel)
    stream_tokens: ClassVar[bool] = True
    max_webhook_bytes: ClassVar[int] = 16 * 1024
    max_message_bytes: ClassVar[int] = 64 * 1024  # one websocket message

    def __init__(self, public_url: str | None = None, env: Mapping[str, str] = os.environ):
        self.public_url = public_url
        self.env = env

    # -- authentication: enforced when its secret is set, warned about at start when not --
    @property
    def auth_enabled(self) -> bool:
        return False

    def auth_warning(self) -> str:
        """The start-up warning when requests are not authenticated: which variable to set."""
        names = " and ".join(self.secret_env) or "its secret"
        verb = "are" if len(self.secret_env) > 1 else "is"
        return (f"{names} {verb} not set: requests are NOT verified as coming from {self.title}; "
                "anyone who finds this server can place calls on it")

    def check_config(self) -> None:
        """ValueError naming the fix when the configuration cannot work (e.g. a secret set
        but no public URL to check signatures against); run before the model loads."""

    async def verify_webhook(self, request: Request, body: bytes) -> bool:
        """A webhook request (answer or event) is the carrier's (always True without a secret)."""
        return True

    def verify_upgrade(self, websocket: WebSocket) -> bool:
        """A media stream's upgrade request is the carrier's (always True without a secret)."""
        return True

    # -- answering --
    def webhook_form(self, request: Request, body: bytes) -> dict[str, str]:
        """A webhook's parameters: a JSON object's string and number fields (a JSON body),
        else the form-encoded body, with the query string's parameters under them (GET).
        The body is capped before this (max_webhook_bytes); at most 200 fields."""
        form = dict(list(request.query_params.items())[:200])
        if "json" in request.headers.get("content-type", ""):
            try:
                data = json.loads(body or b"{}")
            except (ValueError, RecursionError):   # not JSON, or nested past Python's limit
                return form
            if isinstance(data, dict):
                form.update({str(k): str(v) for k, v in list(data.items())[:200]
                             if isinstance(v, (str, int, float)) and not isinstance(v, bool)})
            return form
        form.update(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=200))
        return form

    def answer(self, request: Request, form: dict[str, str], stream_url: str, token: str | None) -> Response:
        """The answer document that connects the call to `stream_url` (wss://.../ws), passing
        `token` (the stream token, when signatures are on) as a custom parameter, and making
        the carrier send and accept exactly what `serializer` speaks."""
        raise NotSupported(f"{self.title} has no answer webhook: configure its stream in its dashboard")

    def busy(self, request: Request, form: dict[str, str]) -> Response:
        """The answer document that refuses a call (at capacity, draining): `busy_xml`."""
        if self.busy_xml is None:
            raise NotSupported(f"{self.title} has no answer webhook")
        return xml_response(self.busy_xml)

    def webhook_call_id(self, form: dict[str, str]) -> str:
        """The call id in an answer webhook's parameters (the stream token is bound to it):
        its `call_id_field`."""
        return form.get(self.call_id_field, "") if self.call_id_field else ""

    # -- the media stream --
    async def handshake(self, websocket: WebSocket) -> StreamStart:
        """Read the stream's opening messages (the server bounds the time); HandshakeError
        when they are not this carrier's."""
        raise NotImplementedError

    def serializer(self, start: StreamStart, on_stop: Callable[[], None]) -> FrameSerializer:
        """The call's serializer: Pipecat's for this carrier, never raising on a bad message
        (dropped and counted in its `ignored` Counter), calling `on_stop` when the carrier
        says the call ended, with `last_media` (time.monotonic() of the last audio taken)."""
        raise NotImplementedError

    # -- the REST API (call control, outbound calls) --
    async def hangup(self, start: StreamStart) -> None:
        raise NotSupported(f"{self.title}: hanging up through its API is not supported; the stream is closed instead")

    async def transfer(self, start: StreamStart, number: str) -> None:
        raise NotSupported(f"{self.title}: transfer is not supported")

    async def place_call(self, to: str, from_: str, answer_url: str, status_url: str | None,
                         machine_detection: bool, amd_url: str | None = None) -> str:
        """Place an outbound call whose answer webhook is `answer_url` (`status_url`: its
        progress; `amd_url`: the answering-machine result, None: `status_url`); returns its
        call id."""
        raise NotSupported(f"{self.title}: outbound calls are not supported; use twilio")


def public(url: str | None) -> str | None:
    """A public URL as the server reads it: https:// when no scheme is given."""
    return url if not url or "://" in url else f"https://{url}"


def stream_url_of(base: str, path: str) -> str:
    """The wss:// (ws:// for http://) URL of `path` on the public `base` URL."""
    scheme, _, rest = base.partition("://")
    return f"{'ws' if scheme == 'http' else 'wss'}://{rest}{path}"


def stream_url(request: Request, public_url: str | None, path: str = "/ws") -> str:
    """The media stream's URL for an answer document: wss on the public host (ws only for
    an explicit http:// public URL, for local tests), else on the request's Host."""
    if public_url:
        parts = urlsplit(public_url)
        scheme = "ws" if parts.scheme == "http" else "wss"
        return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}{path}"
    return f"wss://{request.headers.get('host', request.url.netloc)}{path}"


def carrier_for(provider: str, public_url: str | None = None, env: Mapping[str, str] = os.environ) -> Carrier:
    """The carrier named `provider` (ValueError naming the choices otherwise)."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}: choose one of {', '.join(PROVIDERS)}")
    module = importlib.import_module(f"{__package__}.{PROVIDERS[provider]}")
    return module.CARRIER(public_url=public_url, env=env)
