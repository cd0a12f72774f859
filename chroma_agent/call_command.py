"""`chroma-agent call NUMBER --from NUMBER --server URL`: place an outbound call through a
running phone server (`chroma-agent serve phone`, its `POST /calls`) and wait for its outcome.

    chroma-agent call +15105550100 --from +15105550199 --server https://phone.example.com
    export CHROMA_AGENT_PHONE_API_KEY=...        # the server's API key (or --api-key KEY)

Prints the call's id, then its outcome: answered (a person), machine (voicemail: the
message, if any, was left), busy, no-answer or failed. Exit codes: 0 answered or machine
(or placed, with --no-wait), 1 busy / no-answer / failed / no outcome in time / the server
unreachable or failing, 2 a user error (a bad number or option, no API key, the server
answers 400, 401 or 404). Standard library only (urllib): no model, no framework.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable

from .cli_args import positive_at_most
from .serving.log_safety import printable
from .serving.phone_numbers import is_e164

API_KEY_ENV = "CHROMA_AGENT_PHONE_API_KEY"
DEFAULT_TIMEOUT_S = 180.0       # ringing (~60 s) plus answering-machine detection and the message
POLL_S = 1.0
REQUEST_TIMEOUT_S = 20.0        # one HTTP request: the server's POST waits on the carrier's API
MAX_ANSWER_BYTES = 64 * 1024
MAX_VOICEMAIL_CHARS = 500
OK, FAILED, USAGE = 0, 1, 2
REACHED = {"answered", "machine"}


class CallError(Exception):
    """What ends the command: its message, and the exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _number(text: str) -> str:
    if not is_e164(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an E.164 phone number: give it as +15105550100 "
                                         "(a plus, the country code, the number; no spaces)")
    return text


def add_call_parser(subparsers) -> argparse.ArgumentParser:
    """The `call` command on a subparsers object (`run`: `run_call`, its exit code raised as
    SystemExit when not 0, since `cli.main` takes a command's failure from an exception)."""
    p = subparsers.add_parser(
        "call", help="place an outbound call through a running phone server",
        description="Place an outbound call through a running `chroma-agent serve phone` (its POST /calls) and wait "
                    "for its outcome: answered, machine (the voicemail message left), busy, no-answer or failed. "
                    "Exit 0: answered or machine; 1: busy, no-answer, failed, or the server unreachable; "
                    "2: a user error (a bad number, no API key, the server answering 400/401/404).")
    p.add_argument("number", type=_number, metavar="NUMBER", help="the number to call, E.164 (+15105550100)")
    p.add_argument("--from", dest="from_", type=_number, required=True, metavar="NUMBER",
                   help="the caller id: a number of the server's carrier account, E.164")
    p.add_argument("--server", required=True, metavar="URL",
                   help="the phone server's URL, e.g. https://phone.example.com (`chroma-agent serve phone`)")
    p.add_argument("--api-key", default=None,
                   help=f"the server's API key (default: ${API_KEY_ENV}, which is safer: a command line is "
                        "readable by every local user)")
    p.add_argument("--voicemail-message", default=None, metavar="TEXT",
                   help="said after the beep when an answering machine picks up (default: the server's "
                        "--voicemail-message; none: hang up without a message)")
    p.add_argument("--no-machine-detection", dest="machine_detection", action="store_false",
                   help="no answering-machine detection: whoever answers gets the conversation")
    p.add_argument("--no-wait", action="store_true", help="print the call's id once placed and exit")
    p.add_argument("--timeout", type=positive_at_most(24 * 3600, "a day"), default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=f"wait at most S seconds for the outcome (default {DEFAULT_TIMEOUT_S:g})")
    p.set_defaults(run=run_command)
    return p


def run_command(args) -> None:
    """`run_call` for `cli.main`: a failed call exits with its code (SystemExit), as argparse's
    own errors do; a call that reached someone returns normally (0)."""
    code = run_call(args)
    if code:
        raise SystemExit(code)


def run_call(args, *, out=None, err=None, sleep: Callable[[float], None] = time.sleep) -> int:
    """Place the call `args` describe and wait for its outcome; returns the exit code."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        return _run(args, out, err, sleep)
    except CallError as e:
        print(f"error: {e}", file=err)
        return e.code


def _run(args, out, err, sleep) -> int:
    server = _server_url(args.server)
    key = args.api_key
    if key is not None:
        print("warning: --api-key on the command line is readable by other local users (ps, /proc/PID/cmdline); "
              f"set {API_KEY_ENV} in the environment instead", file=err)
    key = key or os.environ.get(API_KEY_ENV) or None
    if key is None:
        raise CallError(f"no API key: set {API_KEY_ENV} to the phone server's key (or give --api-key)", USAGE)
    if urllib.parse.urlsplit(server).scheme == "http" and urllib.parse.urlsplit(server).hostname not in (
            "127.0.0.1", "localhost", "::1"):
        print("warning: --server is plain http: the API key crosses the network unencrypted", file=err)
    message = args.voicemail_message
    if message is not None and (not message.strip() or len(message) > MAX_VOICEMAIL_CHARS):
        raise CallError(f"--voicemail-message must be 1 to {MAX_VOICEMAIL_CHARS} characters", USAGE)

    body: dict[str, Any] = {"to": args.number, "from": args.from_, "machine_detection": args.machine_detection}
    if message is not None:
        body["voicemail_message"] = message
    call = _request("POST", f"{server}/calls", key, body)
    call_id = call.get("id")
    if not isinstance(call_id, str) or not re.fullmatch(r"[0-9a-f]{16}", call_id):
        raise CallError("the server's answer has no call id: is --server a chroma-agent phone server?", FAILED)
    print(f"placed call {call_id}", file=out, flush=True)
    if args.no_wait:
        print(f"its outcome: GET {server}/calls/{call_id}", file=err)
        return OK

    deadline = time.monotonic() + args.timeout
    while call.get("outcome") is None and not call.get("done"):
        if time.monotonic() >= deadline:
            raise CallError(f"no outcome within {args.timeout:g} s (state: {printable(call.get('state'), 40)}); "
                            f"ask later: GET {server}/calls/{call_id}", FAILED)
        sleep(POLL_S)
        call = _request("GET", f"{server}/calls/{call_id}", key)
    outcome = call.get("outcome") or "failed"
    detail = []
    if call.get("answered_by"):
        detail.append(f"answered by: {printable(call['answered_by'], 40)}")
    if outcome == "machine":
        detail.append("voicemail left" if call.get("voicemail_left") else "no voicemail message")
    if call.get("error"):
        detail.append(printable(call["error"], 400))
    print(f"outcome: {outcome}" + (f" ({'; '.join(detail)})" if detail else ""), file=out, flush=True)
    return OK if outcome in REACHED else FAILED


def _server_url(text: str) -> str:
    parts = urllib.parse.urlsplit(text if "://" in text else f"https://{text}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallError(f"--server {text!r}: give the phone server's URL, e.g. https://phone.example.com", USAGE)
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def _request(method: str, url: str, key: str, body: dict | None = None) -> dict:
    """The server's JSON answer; CallError (exit 2 for the user's errors, else 1) otherwise."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as r:
            return _json(r.read(MAX_ANSWER_BYTES + 1), r.status)
    except urllib.error.HTTPError as e:
        with e:
            answer = _json(e.read(MAX_ANSWER_BYTES + 1), e.code, strict=False)
        why = printable(answer.get("error") or e.reason, 400)
        user = e.code in (400, 401, 403, 404, 405, 413, 422, 501)
        if e.code == 404 and "error" not in answer:
            why = f"{url} was not found: is --server a chroma-agent phone server?"
        raise CallError(f"the server answered {e.code}: {why}", USAGE if user else FAILED) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise CallError(f"cannot reach {url}: {reason}", FAILED) from None


def _json(raw: bytes, status: int, strict: bool = True) -> dict:
    if len(raw) > MAX_ANSWER_BYTES:
        raise CallError(f"the server's answer ({status}) is over {MAX_ANSWER_BYTES} bytes", FAILED)
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        if strict:
            raise CallError(f"the server's answer ({status}) is not a JSON object: is --server a chroma-agent "
                            "phone server?", FAILED)
        return {}
    return answer
