"""A loopback stand-in of Twilio's REST API, and Twilio's side of an outbound call, for
testing call control without Twilio.

    with TwilioStandin() as twilio:                       # http://127.0.0.1:PORT, a thread
        rest = TwilioREST(twilio.account_sid, twilio.auth_token, base_url=twilio.base_url)
        twilio.script(status=400, code=21211, message="Invalid 'To' Phone Number")   # the next request's answer
        ...
        created = twilio.wait_for(lambda r: r.creates_call, timeout=5)
        created.form["MachineDetection"] == ["DetectMessageEnd"]

Every request is recorded (`requests`: method, path, form parameters as Twilio's API gets
them, whether its Basic auth was the account's). Unscripted, it answers as Twilio does: a
new call (201, a fresh `CA...` sid, queued), an update of a call (200), 401 for a wrong
account or token, 404 otherwise. Scripted answers (`script`) go to the next requests in
order: an error status with Twilio's error JSON (or a body that is not JSON), after a delay
(a slow or hung API).

`post_signed(url, params, auth_token)`: a Twilio webhook or callback, form-encoded and signed
(`X-Twilio-Signature`) for `url`, as Twilio sends status and AMD callbacks.
"""
from __future__ import annotations

import base64
import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from twilio.request_validator import RequestValidator

ACCOUNT_SID = "AC" + "1" * 32
AUTH_TOKEN = "standin-auth-token"
CALLS = re.compile(r"/2010-04-01/Accounts/(?P<account>[^/]+)/Calls\.json")
CALL = re.compile(r"/2010-04-01/Accounts/(?P<account>[^/]+)/Calls/(?P<sid>[^/]+)\.json")


@dataclass
class Recorded:
    """One request the stand-in got."""

    method: str
    path: str
    form: dict[str, list[str]]
    authorized: bool
    at: float = field(default_factory=time.time)
    created_sid: str | None = None     # the sid of the call it created (answered unscripted)

    def one(self, name: str) -> str | None:
        """The form parameter `name`'s single value (None when absent)."""
        values = self.form.get(name)
        return values[0] if values else None

    @property
    def creates_call(self) -> bool:
        return self.method == "POST" and bool(CALLS.fullmatch(self.path))

    @property
    def updated_sid(self) -> str | None:
        """The call sid of an update (POST .../Calls/{sid}.json), else None."""
        match = CALL.fullmatch(self.path) if self.method == "POST" else None
        return match["sid"] if match else None


@dataclass
class Scripted:
    """An answer for the next request: `status` with `body` (a dict: JSON; a str: as is),
    after `delay_s` seconds."""

    status: int
    body: dict | str | None = None
    delay_s: float = 0.0


class TwilioStandin:
    """Twilio's REST API (the parts call control uses) on a loopback port, in a thread."""

    def __init__(self, account_sid: str = ACCOUNT_SID, auth_token: str = AUTH_TOKEN):
        self.account_sid, self.auth_token = account_sid, auth_token
        self.requests: list[Recorded] = []
        self.created: list[str] = []          # the sids of the calls it placed
        self._script: deque[Scripted] = deque()
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._http.daemon_threads = True      # a scripted hang does not hold up close()
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "TwilioStandin":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(5)

    # -- scripting and reading --
    def script(self, status: int, *, code: int | None = None, message: str | None = None,
               body: dict | str | None = None, delay_s: float = 0.0) -> None:
        """The next request's answer: `status` with Twilio's error JSON (`code`, `message`)
        unless `body` is given; `delay_s` first."""
        if body is None and code is not None:
            body = {"code": code, "message": message or "", "more_info": f"https://www.twilio.com/docs/errors/{code}",
                    "status": status}
        with self._lock:
            self._script.append(Scripted(status, body, delay_s))

    def wait_for(self, match: Callable[[Recorded], bool], timeout: float) -> Recorded:
        """The first recorded request that `match`es, waiting up to `timeout` seconds for it
        (AssertionError naming what came instead)."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                found = next((r for r in self.requests if match(r)), None)
                left = deadline - time.monotonic()
                if found is not None or left <= 0:
                    break
                self._arrived.wait(left)
        assert found is not None, f"no such request within {timeout} s; got {[(r.method, r.path) for r in self.requests]}"
        return found

    def updates(self, sid: str) -> list[Recorded]:
        """The updates of the call `sid` so far (hang-ups, transfers)."""
        with self._lock:
            return [r for r in self.requests if r.updated_sid == sid]

    # -- the HTTP side --
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:   # quiet: the tests read `requests`
                pass

            def do_POST(self) -> None:
                standin._answer(self)

            def do_GET(self) -> None:
                standin._answer(self)

        return Handler

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(min(length, 1 << 20)).decode("utf-8", "replace")
        path = urllib.parse.urlsplit(handler.path).path
        expected = "Basic " + base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        recorded = Recorded(handler.command, path, urllib.parse.parse_qs(body, keep_blank_values=True),
                            handler.headers.get("Authorization") == expected)
        with self._arrived:
            scripted = self._script.popleft() if self._script else None
            if scripted is None:
                scripted = self._default(recorded)
            self.requests.append(recorded)
            self._arrived.notify_all()
        if scripted.delay_s:
            time.sleep(scripted.delay_s)
        payload = scripted.body if isinstance(scripted.body, str) else json.dumps(scripted.body or {})
        data = payload.encode()
        try:
            handler.send_response(scripted.status)
            handler.send_header("Content-Type", "application/json" if not isinstance(scripted.body, str) else "text/html")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:   # the client gave up (its timeout)
            pass

    def _default(self, request: Recorded) -> Scripted:
        match = CALLS.fullmatch(request.path) or CALL.fullmatch(request.path)
        if not request.authorized or (match and match["account"] != self.account_sid):
            return Scripted(401, {"code": 20003, "message": "Authenticate", "status": 401})
        if request.creates_call:
            sid = request.created_sid = "CA" + uuid.uuid4().hex
            self.created.append(sid)
            return Scripted(201, {"sid": sid, "account_sid": self.account_sid, "status": "queued",
                                  "to": request.one("To"), "from": request.one("From")})
        if (sid := request.updated_sid) is not None:
            return Scripted(200, {"sid": sid, "account_sid": self.account_sid,
                                  "status": request.one("Status") or "in-progress"})
        return Scripted(404, {"code": 20404, "message": f"The requested resource {request.path} was not found",
                              "status": 404})


def post_signed(url: str, params: dict[str, str], auth_token: str | None, *, timeout: float = 10) -> tuple[int, str]:
    """POST `params` form-encoded to `url`, signed as Twilio signs its webhooks and callbacks
    (no signature without `auth_token`); (status, body)."""
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if auth_token is not None:
        headers["X-Twilio-Signature"] = RequestValidator(auth_token).compute_signature(url, params)
    request = urllib.request.Request(url, urllib.parse.urlencode(params).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class TwilioLeg:
    """Twilio's side of an outbound call the server placed through the stand-in (`created`:
    the request that created it): its signed status and AMD callbacks and its answer
    webhook, to the URLs the server gave. Blocking (urllib): from async code, in a thread."""

    def __init__(self, created: Recorded, auth_token: str = AUTH_TOKEN, account_sid: str = ACCOUNT_SID):
        assert created.creates_call and created.created_sid, "not a request that created a call"
        self.created, self.sid = created, created.created_sid
        self.auth_token, self.account_sid = auth_token, account_sid

    def _base(self) -> dict[str, str]:
        return {"CallSid": self.sid, "AccountSid": self.account_sid, "From": self.created.one("From") or "",
                "To": self.created.one("To") or "", "Direction": "outbound-api", "ApiVersion": "2010-04-01"}

    def status(self, status: str, **extra: str) -> tuple[int, str]:
        """A status callback (`CallStatus`: initiated, ringing, in-progress, completed, busy,
        no-answer, failed, canceled)."""
        return post_signed(self.created.one("StatusCallback"), {**self._base(), "CallStatus": status, **extra},
                           self.auth_token)

    def amd(self, answered_by: str) -> tuple[int, str]:
        """The async AMD callback: `AnsweredBy` (human, machine_end_beep, ..., unknown)."""
        params = {"CallSid": self.sid, "AccountSid": self.account_sid, "AnsweredBy": answered_by,
                  "MachineDetectionDuration": "3200"}
        return post_signed(self.created.one("AsyncAmdStatusCallback"), params, self.auth_token)

    def answer(self) -> str:
        """The callee picked up: Twilio fetches the call's answer URL (its TwiML back)."""
        status, twiml = post_signed(self.created.one("Url"), {**self._base(), "CallStatus": "in-progress"},
                                    self.auth_token)
        assert status == 200, f"the answer webhook said {status}: {twiml[:200]}"
        return twiml
