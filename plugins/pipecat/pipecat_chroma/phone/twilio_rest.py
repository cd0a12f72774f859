"""Twilio's REST API for call control: place an outbound call (with async answering-machine
detection), transfer a live call to a person, hang a call up. On the `twilio` package.

    rest = TwilioREST(account_sid, auth_token)                     # base_url=: a loopback stand-in in tests
    sid = await rest.place_call("+15105550100", "+15105550199", answer_url, status_url)
    await rest.transfer(sid, "+15105550123")                       # <Dial> the person, the agent leaves
    await rest.hangup(sid)

The package's HTTP calls block: each runs in a worker thread, bounded by `timeout_s` (the
socket's timeout and a deadline on the whole request). A 4xx/5xx answer, a timeout or an
unreachable API is a `TwilioAPIError` that names the HTTP status and Twilio's own message
and error code, never the auth token.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import re
from typing import Any, Callable

import requests
from twilio.base.exceptions import TwilioException, TwilioRestException, TwilioServiceException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client
from twilio.twiml.voice_response import VoiceResponse

from chroma_agent.serving.log_safety import printable
from chroma_agent.serving.phone_numbers import is_e164

DEFAULT_TIMEOUT_S = 10.0
TIMEOUT_ENV = "CHROMA_AGENT_TWILIO_API_TIMEOUT_S"   # the default's override
# the events a status callback reports (Twilio sends only `completed` unless asked)
STATUS_EVENTS = ["initiated", "ringing", "answered", "completed"]
# Twilio's AMD mode that waits for a voicemail greeting's end (the beep): a message left then is heard whole
DETECT_MESSAGE_END = "DetectMessageEnd"
CALL_SID = re.compile(r"[A-Za-z0-9]{2,64}")   # goes into the request's path: letters and digits only
MAX_ERROR_CHARS = 300

# the package's HTTP client logs each request's URL (the account and call sids) at INFO: ours keeps warnings
HTTP_LOG = logging.getLogger(f"{__name__}.http")
HTTP_LOG.setLevel(logging.WARNING)


class TwilioAPIError(Exception):
    """A Twilio REST request failed: `status` (the HTTP status, None for a timeout or an
    unreachable API), `code` (Twilio's error code, when it gave one), `twilio_message`
    (Twilio's text, escaped and cut), `timed_out`. Its message names them, never a secret."""

    def __init__(self, action: str, status: int | None, twilio_message: str, code: int | None = None,
                 timed_out: bool = False):
        self.action, self.status, self.code, self.timed_out = action, status, code, timed_out
        self.twilio_message = printable(twilio_message, MAX_ERROR_CHARS)
        where = f"HTTP {status}" if status is not None else "no answer"
        more = f" (Twilio error {code})" if code is not None and code != status else ""
        super().__init__(f"Twilio API: {action} failed: {where}: {self.twilio_message}{more}")


def check_number(number: str, what: str = "number") -> str:
    """`number` if it is an E.164 phone number (+ and 7-15 digits), else ValueError."""
    if not is_e164(number):
        raise ValueError(f"the {what} must be an E.164 phone number such as +15105550100")
    return number


def dial_twiml(number: str, caller_id: str | None = None) -> str:
    """The TwiML that hands a live call to `number` (the caller stays on the line with them)."""
    response = VoiceResponse()
    response.dial(check_number(number, "transfer number"), caller_id=caller_id)
    return str(response)


class TwilioREST:
    """Twilio's call-control REST API for one account.

    `account_sid`, `auth_token`: the account's (from the environment: TWILIO_ACCOUNT_SID,
    TWILIO_AUTH_TOKEN); `base_url`: where the API is (None: https://api.twilio.com; a
    loopback stand-in in tests); `timeout_s`: the most one request may take (None:
    $CHROMA_AGENT_TWILIO_API_TIMEOUT_S, else DEFAULT_TIMEOUT_S)."""

    def __init__(self, account_sid: str, auth_token: str, base_url: str | None = None,
                 timeout_s: float | None = None):
        if not account_sid or not auth_token:
            raise ValueError("Twilio's REST API needs TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN")
        if timeout_s is None:
            timeout_s = _env_seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
        if not 0 < timeout_s < math.inf:
            raise ValueError(f"timeout_s must be above 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        http = TwilioHttpClient(timeout=self.timeout_s, logger=HTTP_LOG)
        self.client = Client(account_sid, auth_token, http_client=http)
        if base_url is not None:
            self.client.api.base_url = base_url.rstrip("/")
            # TWILIO_EDGE / TWILIO_REGION would rewrite the host into *.twilio.com
            self.client.edge = self.client.region = None

    async def place_call(self, to: str, from_: str, answer_url: str, status_url: str | None = None,
                         machine_detection: bool | str | None = True, amd_url: str | None = None) -> str:
        """Call `to` from `from_` (a number of the account); once answered, Twilio fetches
        `answer_url` (this server's answer webhook) for the call's TwiML. `status_url` gets
        the call's progress (initiated, ringing, answered, completed: busy, no-answer,
        failed...); `machine_detection` (True: DetectMessageEnd; a string: that mode;
        False/None: off) runs in the background (async AMD): the call connects at once and
        `amd_url` (None: `status_url`) gets `AnsweredBy`. Returns the call's sid."""
        params: dict[str, Any] = {"to": check_number(to, "'to' number"), "from_": check_number(from_, "'from' number"),
                                  "url": answer_url, "method": "POST"}
        if status_url:
            params.update(status_callback=status_url, status_callback_method="POST",
                          status_callback_event=list(STATUS_EVENTS))
        mode = DETECT_MESSAGE_END if machine_detection is True else (machine_detection or None)
        if mode:
            params.update(machine_detection=mode, async_amd="true",
                          async_amd_status_callback=amd_url or status_url, async_amd_status_callback_method="POST")
        call = await self._request("placing a call", lambda: self.client.calls.create(**params))
        return call.sid

    async def transfer(self, call_sid: str, number: str, caller_id: str | None = None) -> None:
        """Hand the live call `call_sid` to `number`: its TwiML is replaced with `<Dial>`,
        which ends its media stream (the agent leaves) and rings the person."""
        twiml = dial_twiml(number, caller_id)
        sid = _check_sid(call_sid)
        await self._request("transferring a call", lambda: self.client.calls(sid).update(twiml=twiml))

    async def hangup(self, call_sid: str) -> None:
        """End the call `call_sid` (status=completed)."""
        sid = _check_sid(call_sid)
        await self._request("hanging up a call", lambda: self.client.calls(sid).update(status="completed"))

    async def _request(self, action: str, send: Callable[[], Any]) -> Any:
        """`send()` in a worker thread, bounded by the timeout; TwilioAPIError otherwise."""
        try:
            # the socket timeout bounds each read; this bounds a request that trickles in
            return await asyncio.wait_for(asyncio.to_thread(send), self.timeout_s + 1)
        except TwilioServiceException as e:
            raise TwilioAPIError(action, e.status, e.detail or e.title, e.code) from None
        except TwilioRestException as e:
            raise TwilioAPIError(action, e.status, e.msg, e.code) from None
        except (TimeoutError, requests.Timeout):
            raise TwilioAPIError(action, None, f"timed out after {self.timeout_s:g} s", timed_out=True) from None
        except requests.RequestException as e:
            raise TwilioAPIError(action, None, f"the API could not be reached ({type(e).__name__})") from None
        except TwilioException as e:
            raise TwilioAPIError(action, None, f"{type(e).__name__}: {e}") from None
        except ValueError:   # a 2xx whose body is not JSON: not Twilio's API
            raise TwilioAPIError(action, None, "an answer that is not the Twilio API's (not JSON)") from None


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise ValueError(f"{name}={text!r}: give a number of seconds above 0")
    return value


def _check_sid(call_sid: str) -> str:
    if not isinstance(call_sid, str) or not CALL_SID.fullmatch(call_sid):
        raise ValueError("not a Twilio call sid")
    return call_sid
