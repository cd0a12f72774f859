"""Outbound calls, answering-machine detection, transfer and hang-up through Twilio's REST
API, against a loopback stand-in of that API (tests/carrier_standin.py: no network).

- `TwilioREST` alone: the requests and parameters of place_call / transfer / hangup, and
  its errors (4xx, 5xx, a hung API, a wrong token, nothing listening).
- One phone server in this process (uvicorn in a thread, the tiny checkpoint) whose Twilio
  REST API is the stand-in (CHROMA_AGENT_TWILIO_API_URL), with signatures on: POST /calls,
  the signed status and AMD callbacks a `TwilioLeg` plays, the media stream a `TwilioCall`
  plays. A machine gets the voicemail then a hang-up request; a person gets the greeting
  only after their "Hello?" or a pause; busy / no-answer / failed outcomes; the carrier's
  errors as a failed call and a clear answer; `--transfer-digit` as a transfer request.
- `chroma-agent call` against that server.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("pipecat")
from pipecat_chroma.phone import outbound  # noqa: E402
from pipecat_chroma.phone.twilio_rest import TwilioAPIError, TwilioREST  # noqa: E402
from pipecat_chroma.twilio_testing import TwilioCall  # noqa: E402

from chroma_agent import call_command  # noqa: E402

from . import server_process  # noqa: E402
from .carrier_standin import ACCOUNT_SID, AUTH_TOKEN, TwilioLeg, TwilioStandin, post_signed  # noqa: E402
from .conftest import speak  # noqa: E402

API_KEY = "test-phone-api-key"
TO, FROM, PERSON = "+15105550100", "+15105550199", "+15105550123"
VOICEMAIL = "Sorry we missed you. Please call us back."
REPLY_TIMEOUT_S = 30            # generous for a shared 2-core CI machine
REPO = Path(__file__).resolve().parents[1]
quick = pytest.mark.timeout(30, func_only=True)
call_test = pytest.mark.timeout(90, func_only=True)


# -- TwilioREST against the stand-in ----------------------------------------------------------

@pytest.fixture
def standin():
    with TwilioStandin() as twilio:
        yield twilio


@quick
async def test_place_call_asks_twilio_for_the_stream_callbacks_and_async_amd(standin):
    rest = TwilioREST(ACCOUNT_SID, AUTH_TOKEN, base_url=standin.base_url, timeout_s=5)
    sid = await rest.place_call(TO, FROM, "https://phone.test/twiml?outbound=ab12", "https://phone.test/calls/ab12/events")
    [created] = standin.requests
    assert created.creates_call and created.authorized and sid == created.created_sid
    assert created.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json"
    assert created.form == {
        "To": [TO], "From": [FROM], "Url": ["https://phone.test/twiml?outbound=ab12"], "Method": ["POST"],
        "StatusCallback": ["https://phone.test/calls/ab12/events"], "StatusCallbackMethod": ["POST"],
        "StatusCallbackEvent": ["initiated", "ringing", "answered", "completed"],
        "MachineDetection": ["DetectMessageEnd"], "AsyncAmd": ["true"],
        "AsyncAmdStatusCallback": ["https://phone.test/calls/ab12/events"], "AsyncAmdStatusCallbackMethod": ["POST"]}

    await rest.place_call(TO, FROM, "https://phone.test/twiml", None, machine_detection=False)
    plain = standin.requests[-1].form
    assert not {"MachineDetection", "AsyncAmd", "StatusCallback"} & set(plain), plain


@quick
async def test_transfer_dials_the_person_on_the_live_call_and_hangup_completes_it(standin):
    rest = TwilioREST(ACCOUNT_SID, AUTH_TOKEN, base_url=standin.base_url, timeout_s=5)
    sid = "CA" + "a" * 32
    await rest.transfer(sid, PERSON)
    await rest.hangup(sid)
    transfer, hangup = standin.updates(sid)
    assert transfer.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{sid}.json" and transfer.authorized
    twiml = ElementTree.fromstring(transfer.one("Twiml"))
    assert twiml.tag == "Response" and [(e.tag, e.text) for e in twiml] == [("Dial", PERSON)]
    assert set(transfer.form) == {"Twiml"}
    assert hangup.form == {"Status": ["completed"]}


@quick
async def test_bad_numbers_and_sids_never_reach_the_api(standin):
    rest = TwilioREST(ACCOUNT_SID, AUTH_TOKEN, base_url=standin.base_url, timeout_s=5)
    for to in ("5105550100", "+1 510 555 0100", "+0123456789", "+1" + "5" * 20, "</Dial><Hangup/>"):
        with pytest.raises(ValueError, match="E.164"):
            await rest.place_call(to, FROM, "https://phone.test/twiml")
        with pytest.raises(ValueError, match="E.164"):
            await rest.transfer("CA" + "a" * 32, to)
    for sid in ("", "CA/../Accounts", "CA?x=1", "CA" + "a" * 70):
        with pytest.raises(ValueError, match="sid"):
            await rest.hangup(sid)
    assert standin.requests == []


@quick
async def test_api_errors_are_clear_and_name_no_secret(standin):
    rest = TwilioREST(ACCOUNT_SID, AUTH_TOKEN, base_url=standin.base_url, timeout_s=1)
    sid = "CA" + "b" * 32

    standin.script(400, code=21211, message="Invalid 'To' Phone Number: +1510555")
    with pytest.raises(TwilioAPIError) as e:
        await rest.place_call(TO, FROM, "https://phone.test/twiml")
    assert (e.value.status, e.value.code) == (400, 21211)
    assert "HTTP 400" in str(e.value) and "Invalid 'To' Phone Number" in str(e.value) and "21211" in str(e.value)

    standin.script(503, body="<html>Service Unavailable</html>")   # a 5xx that is not Twilio's JSON
    with pytest.raises(TwilioAPIError, match="HTTP 503") as e:
        await rest.hangup(sid)
    assert e.value.status == 503 and not e.value.timed_out

    standin.script(200, delay_s=3)   # a hung API: bounded by the timeout
    started = time.monotonic()
    with pytest.raises(TwilioAPIError, match="timed out after 1 s") as e:
        await rest.transfer(sid, PERSON)
    assert e.value.timed_out and e.value.status is None and time.monotonic() - started < 2.5

    wrong = TwilioREST(ACCOUNT_SID, "not-the-token", base_url=standin.base_url, timeout_s=1)
    with pytest.raises(TwilioAPIError, match="HTTP 401") as e:
        await wrong.hangup(sid)
    assert "not-the-token" not in str(e.value) and AUTH_TOKEN not in str(e.value)

    nowhere = TwilioREST(ACCOUNT_SID, AUTH_TOKEN, base_url=f"http://127.0.0.1:{server_process.free_port()}",
                         timeout_s=1)
    with pytest.raises(TwilioAPIError, match="could not be reached") as e:
        await nowhere.hangup(sid)
    assert AUTH_TOKEN not in str(e.value)


def test_call_request_bodies_are_checked():
    assert outbound.parse_call_request(json.dumps({"to": TO, "from": FROM}).encode()) == (TO, FROM, None, True)
    assert outbound.parse_call_request(json.dumps(
        {"to": TO, "from": FROM, "voicemail_message": VOICEMAIL, "machine_detection": False}).encode()) == (
        TO, FROM, VOICEMAIL, False)
    bad = {b"": "not JSON", b"[1]": "JSON object", b'{"to": "+15105550100"}': '"from"',
           json.dumps({"to": "0800", "from": FROM}).encode(): '"to" must be an E.164',
           json.dumps({"to": TO, "from": FROM, "callback": "x"}).encode(): "unknown field",
           json.dumps({"to": TO, "from": FROM, "voicemail_message": "x" * 501}).encode(): "over 500",
           json.dumps({"to": TO, "from": FROM, "voicemail_message": "a\x1b[2Jb"}).encode(): "control",
           json.dumps({"to": TO, "from": FROM, "machine_detection": "yes"}).encode(): "true or false",
           b"[" * 100000: "over 4096 bytes"}
    for body, message in bad.items():
        with pytest.raises(ValueError, match=message):
            outbound.parse_call_request(body)


# -- one phone server, in this process ----------------------------------------------------------

def phone_server(model, voice, *, port: int, env: dict, **options):
    """A PhoneServer on Twilio (`env`: its secrets and API URL) whose public URL is its
    own loopback address (Twilio signs what it calls there)."""
    from pipecat_chroma.phone.carrier import carrier_for
    from pipecat_chroma.phone.server import PhoneServer

    public = f"http://127.0.0.1:{port}"
    return PhoneServer(model, voice, carrier=carrier_for("twilio", public, env=env), public_url=public, **options)


@pytest.fixture(scope="module")
def phone(model, voice):
    """The server under test (signatures on, API key, greeting, voicemail message, transfer
    digit 0, two calls at once) and the Twilio stand-in it calls."""
    from chroma_agent.runtime.engine import ChromaEngine

    standin = TwilioStandin()
    env = {"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
           "CHROMA_AGENT_TWILIO_API_URL": standin.base_url}
    engine = ChromaEngine(model, max_conversations=2)
    port = server_process.free_port()
    server = phone_server(engine, voice, port=port, env=env, max_calls=2, max_frames=20, greeting="Hello there.",
                          voicemail_message=VOICEMAIL, transfer_to=PERSON, transfer_digit="0", api_key=API_KEY)
    running = server_process.AppThread(server.app(), port).start()
    running.phone, running.twilio = server, standin
    try:
        yield running
    finally:
        running.stop()
        standin.close()
        engine.close()


def api(base: str, method: str, path: str, body=None, key: str | None = API_KEY) -> tuple[int, dict]:
    """A request to the server's API: (status, JSON answer)."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=20) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"text": raw.decode(errors="replace")}


async def place(phone, **body) -> tuple[dict, TwilioLeg]:
    """POST /calls, then Twilio's side of the call it placed."""
    status, call = await asyncio.to_thread(api, phone.base, "POST", "/calls", {"to": TO, "from": FROM, **body})
    assert status == 201, call
    created = await asyncio.to_thread(
        phone.twilio.wait_for, lambda r: r.creates_call and f"outbound={call['id']}" in (r.one("Url") or ""), 5)
    return call, TwilioLeg(created)


async def answered(leg: TwilioLeg, **kwargs) -> TwilioCall:
    """The callee picks up: Twilio's in-progress status, its answer webhook, its stream."""
    assert (await asyncio.to_thread(leg.status, "in-progress"))[0] == 204
    twiml = await asyncio.to_thread(leg.answer)
    return TwilioCall.from_twiml(twiml, call_sid=leg.sid, auth_token=AUTH_TOKEN, **kwargs)


async def outcome(phone, call_id: str, *, done: bool = False, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, call = await asyncio.to_thread(api, phone.base, "GET", f"/calls/{call_id}")
        assert status == 200, call
        if (call["done"] if done else call["outcome"]) or time.monotonic() > deadline:
            return call
        await asyncio.sleep(0.1)


async def until_active(phone, n: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while len(phone.phone.active) != n:
        assert time.monotonic() < deadline, f"{len(phone.phone.active)} calls active, expected {n}"
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def hello(tmp_path_factory) -> tuple[np.ndarray, int]:
    """A callee's pickup line, longer than the greeting's pause (2 s), without a pause in it."""
    path = speak("Hello this is Sam Johnson speaking from the downtown office",
                 tmp_path_factory.mktemp("outbound") / "hello.wav")
    samples, rate = sf.read(path, dtype="float32")
    loud = np.flatnonzero(np.abs(samples) > 0.02)
    return samples[loud[0]:loud[-1] + 1], rate


@quick
async def test_the_api_needs_its_key_and_checks_what_it_is_given(phone):
    base = phone.base
    assert (await asyncio.to_thread(api, base, "POST", "/calls", {"to": TO, "from": FROM}, None))[0] == 401
    status, answer = await asyncio.to_thread(api, base, "POST", "/calls", {"to": TO, "from": FROM}, "wrong-key")
    assert status == 401 and "API key" in answer["error"]
    assert (await asyncio.to_thread(api, base, "GET", "/calls/0123456789abcdef", None, "wrong-key"))[0] == 401
    status, answer = await asyncio.to_thread(api, base, "POST", "/calls", {"to": "5551234", "from": FROM})
    assert status == 400 and "E.164" in answer["error"]
    status, answer = await asyncio.to_thread(api, base, "POST", "/calls", b"{not json")
    assert status == 400 and "not JSON" in answer["error"]
    status, answer = await asyncio.to_thread(api, base, "POST", "/calls", b" " * 5000)
    assert status == 400 and "over 4096 bytes" in answer["error"]
    status, _ = await asyncio.to_thread(api, base, "POST", "/calls", b" " * 20000)
    assert status == 413   # over the server's body cap, before it is read
    for missing in ("/calls/0123456789abcdef", "/calls/..%2f..%2fmetrics", "/calls/" + "a" * 300):
        assert (await asyncio.to_thread(api, base, "GET", missing))[0] == 404
    assert not phone.twilio.requests, "nothing reached Twilio"


@quick
async def test_without_a_key_outbound_calls_are_off(model, voice, monkeypatch):
    monkeypatch.delenv(outbound.API_KEY_ENV, raising=False)
    port = server_process.free_port()
    server = phone_server(model, voice, port=port, env={}, max_calls=1)
    running = server_process.AppThread(server.app(), port)
    await asyncio.to_thread(running.start)
    try:
        for method, path in (("POST", "/calls"), ("GET", "/calls/0123456789abcdef")):
            status, answer = await asyncio.to_thread(api, running.base, method, path,
                                                     {"to": TO, "from": FROM} if method == "POST" else None)
            assert status == 404 and "outbound calls are off" in answer["error"]
            assert outbound.API_KEY_ENV in answer["error"]
    finally:
        await asyncio.to_thread(running.stop)


@call_test
async def test_a_machine_gets_the_voicemail_after_the_beep_then_a_hangup(phone):
    before = dict(phone.phone.outcomes)
    call, leg = await place(phone)
    assert call["outcome"] is None and call["state"] == "queued" and "to" not in call
    async with await answered(leg) as line:
        await until_active(phone, 1)
        assert (await asyncio.to_thread(leg.amd, "machine_end_beep"))[0] == 204
        beep = time.time()
        hangup = await asyncio.to_thread(
            phone.twilio.wait_for, lambda r: r.updated_sid == leg.sid and r.one("Status") == "completed",
            REPLY_TIMEOUT_S)
        spoken = line.media(after=beep)
        assert spoken, "no voicemail message was said before the hang-up"
        assert spoken[0][0] < hangup.at, "hung up before the message"
        assert hangup.authorized
    assert not any(r.one("Twiml") for r in phone.twilio.updates(leg.sid)), "a machine is not transferred"
    assert (await asyncio.to_thread(leg.status, "completed", AnsweredBy="machine_end_beep"))[0] == 204
    result = await outcome(phone, call["id"], done=True)
    assert result["outcome"] == "machine" and result["answered_by"] == "machine_end_beep"
    assert result["voicemail_left"] and result["done"]
    assert phone.phone.outcomes["machine"] == before["machine"] + 1   # what /metrics shows under "outbound"
    await until_active(phone, 0)


@call_test
async def test_a_person_hears_the_greeting_only_after_a_pause_and_talks_with_the_agent(phone):
    call, leg = await place(phone)
    async with await answered(leg) as line:
        connected = time.time()
        assert (await asyncio.to_thread(leg.amd, "human"))[0] == 204
        first, _ = await line.next_media(timeout=REPLY_TIMEOUT_S)   # the greeting, held for the pause
        assert first - connected > 1.5, f"the greeting came {first - connected:.2f} s after pickup: not held"
        result = await outcome(phone, call["id"])
        assert result["outcome"] == "answered" and result["answered_by"] == "human"
        assert not phone.twilio.updates(leg.sid), "a person is neither hung up on nor transferred"
        await line.until_quiet(timeout=REPLY_TIMEOUT_S)
        await line.stop()
    await until_active(phone, 0)
    assert (await asyncio.to_thread(leg.status, "completed"))[0] == 204
    assert (await outcome(phone, call["id"], done=True))["outcome"] == "answered"


@call_test
async def test_the_greeting_waits_for_the_callees_hello(phone, hello):
    call, leg = await place(phone, machine_detection=False)
    assert "MachineDetection" not in leg.created.form
    async with await answered(leg) as line:
        spoken_until = await line.say(*hello)   # starts at once, lasts past the pause
        first, _ = await line.next_media(timeout=REPLY_TIMEOUT_S)
        assert first > spoken_until, "the agent spoke over the callee's hello"
        assert (await outcome(phone, call["id"]))["outcome"] == "answered"   # no AMD: in-progress is a person
        await line.stop()
    await until_active(phone, 0)


@quick
async def test_busy_no_answer_and_failed_calls_have_their_outcome(phone):
    before = dict(phone.phone.outcomes)
    (one, first), (two, second) = await place(phone), await place(phone)
    status, answer = await asyncio.to_thread(api, phone.base, "POST", "/calls", {"to": TO, "from": FROM})
    assert status == 503 and "capacity" in answer["error"]   # two ringing calls fill max_calls 2
    for leg, status in ((first, "ringing"), (first, "busy"), (second, "no-answer")):
        assert (await asyncio.to_thread(leg.status, status))[0] == 204
    three, third = await place(phone)   # a slot is free again
    assert (await asyncio.to_thread(third.status, "failed"))[0] == 204
    assert [(await outcome(phone, c["id"], done=True))["outcome"] for c in (one, two, three)] == [
        "busy", "no-answer", "failed"]
    for name in ("busy", "no-answer", "failed"):
        assert phone.phone.outcomes[name] == before[name] + 1


@quick
async def test_callbacks_must_be_signed_by_twilio_and_be_about_their_call(phone):
    call, leg = await place(phone)
    url = leg.created.one("StatusCallback")
    params = {"CallSid": leg.sid, "AccountSid": ACCOUNT_SID, "CallStatus": "busy"}
    assert (await asyncio.to_thread(post_signed, url, params, None))[0] == 403
    assert (await asyncio.to_thread(post_signed, url, params, "another-token"))[0] == 403
    other = {**params, "CallSid": "CA" + "f" * 32}
    assert (await asyncio.to_thread(post_signed, url, other, AUTH_TOKEN))[0] == 403
    unknown = url.replace(call["id"], "0" * 16)
    assert (await asyncio.to_thread(post_signed, unknown, params, AUTH_TOKEN))[0] == 404
    assert (await outcome(phone, call["id"], timeout=0))["outcome"] is None   # nothing above counted
    assert (await asyncio.to_thread(leg.status, "canceled"))[0] == 204


@pytest.mark.timeout(60, func_only=True)
async def test_the_carriers_errors_fail_the_call_with_a_clear_answer(phone, monkeypatch):
    monkeypatch.setenv("CHROMA_AGENT_TWILIO_API_TIMEOUT_S", "1")
    before = phone.phone.outcomes["failed"]
    body = {"to": TO, "from": FROM}
    cases = [((400,), {"code": 21211, "message": "Invalid 'To' Phone Number"}, 400, "21211"),
             ((500,), {"code": 20500, "message": "Internal Server Error"}, 502, "HTTP 500"),
             ((401,), {"code": 20003, "message": "Authenticate"}, 502, "HTTP 401"),
             ((201,), {"delay_s": 3}, 504, "timed out")]
    for (status,), script, expected, words in cases:
        phone.twilio.script(status, **script)
        answer_status, answer = await asyncio.to_thread(api, phone.base, "POST", "/calls", body)
        assert answer_status == expected and words in answer["error"], answer
        assert answer["outcome"] == "failed" and answer["done"] and AUTH_TOKEN not in answer["error"]
        result = await outcome(phone, answer["id"])
        assert result["outcome"] == "failed" and words in result["error"]
    assert phone.phone.outcomes["failed"] == before + len(cases)


@call_test
async def test_the_transfer_digit_hands_the_caller_to_the_person(phone):
    sid = "CA" + "c" * 32
    status, twiml = await asyncio.to_thread(
        post_signed, phone.base + "/twiml", {"CallSid": sid, "AccountSid": ACCOUNT_SID, "From": TO,
                                            "To": FROM, "CallStatus": "ringing"}, AUTH_TOKEN)
    assert status == 200
    async with TwilioCall.from_twiml(twiml, call_sid=sid, auth_token=AUTH_TOKEN) as line:
        await line.next_media(timeout=REPLY_TIMEOUT_S)   # the inbound greeting: the pipeline runs
        await line.send({"event": "dtmf", "streamSid": line.stream_sid, "sequenceNumber": "99",
                         "dtmf": {"track": "inbound_track", "digit": "0"}})
        transfer = await asyncio.to_thread(phone.twilio.wait_for,
                                           lambda r: r.updated_sid == sid and r.one("Twiml"), 10)
        assert [(e.tag, e.text) for e in ElementTree.fromstring(transfer.one("Twiml"))] == [("Dial", PERSON)]
        await asyncio.wait_for(line.closed.wait(), 15)   # the agent left the call
    await until_active(phone, 0)
    assert not any(r.one("Status") == "completed" for r in phone.twilio.updates(sid)), \
        "a transferred call must not be hung up"


# -- chroma-agent call ----------------------------------------------------------------------------

def run_cli(*argv: str) -> tuple[int, str, str]:
    """`chroma-agent call ...` in this process: (exit code, stdout, stderr)."""
    import argparse

    parser = argparse.ArgumentParser(prog="chroma-agent")
    call_command.add_call_parser(parser.add_subparsers(dest="command"))
    out, err = io.StringIO(), io.StringIO()
    try:
        args = parser.parse_args(["call", *argv])
    except SystemExit as e:
        return int(e.code), "", ""
    code = call_command.run_call(args, out=out, err=err, sleep=lambda s: time.sleep(0.05))
    return code, out.getvalue(), err.getvalue()


@quick
async def test_the_cli_refuses_user_errors_with_exit_2(phone, monkeypatch):
    monkeypatch.delenv(call_command.API_KEY_ENV, raising=False)
    server = ["--server", phone.base]
    code, _, _ = await asyncio.to_thread(run_cli, "5105550100", "--from", FROM, *server)
    assert code == 2   # argparse: not E.164
    code, _, err = await asyncio.to_thread(run_cli, TO, "--from", FROM, *server)
    assert code == 2 and call_command.API_KEY_ENV in err
    monkeypatch.setenv(call_command.API_KEY_ENV, "not-the-key")
    code, _, err = await asyncio.to_thread(run_cli, TO, "--from", FROM, *server)
    assert code == 2 and "401" in err and "not-the-key" not in err
    monkeypatch.setenv(call_command.API_KEY_ENV, API_KEY)
    code, _, err = await asyncio.to_thread(run_cli, TO, "--from", FROM, "--server", "ftp://x")
    assert code == 2 and "--server" in err
    code, _, err = await asyncio.to_thread(run_cli, TO, "--from", FROM, *server, "--voicemail-message", " ")
    assert code == 2 and "--voicemail-message" in err
    phone.twilio.script(400, code=21211, message="Invalid 'To' Phone Number")
    code, _, err = await asyncio.to_thread(run_cli, TO, "--from", FROM, *server)
    assert code == 2 and "21211" in err
    nowhere = f"http://127.0.0.1:{server_process.free_port()}"
    code, _, err = await asyncio.to_thread(run_cli, TO, "--from", FROM, "--server", nowhere)
    assert code == 1 and "cannot reach" in err


@call_test
async def test_chroma_agent_call_prints_the_outcome(phone):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CHROMA_AGENT_")},
           call_command.API_KEY_ENV: API_KEY}
    seen = len(phone.twilio.requests)

    async def cli(*extra: str) -> subprocess.CompletedProcess:
        return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "chroma_agent.cli", "call", TO, "--from",
                                                        FROM, "--server", phone.base, *extra],
                                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)

    async def callee(answer: str) -> None:
        created = await asyncio.to_thread(phone.twilio.wait_for,
                                          lambda r: r.creates_call and phone.twilio.requests.index(r) >= seen, 30)
        leg = TwilioLeg(created)
        if answer == "busy":
            await asyncio.to_thread(leg.status, "busy")
        else:
            await asyncio.to_thread(leg.amd, answer)

    done, _ = await asyncio.gather(cli("--timeout", "30"), callee("busy"))
    assert done.returncode == 1, done.stderr
    assert done.stdout.startswith("placed call ") and "outcome: busy" in done.stdout

    seen = len(phone.twilio.requests)
    done, _ = await asyncio.gather(cli("--voicemail-message", VOICEMAIL), callee("human"))
    assert done.returncode == 0, done.stderr
    assert "outcome: answered (answered by: human)" in done.stdout
    created = [r for r in phone.twilio.requests[seen:] if r.creates_call]
    assert created and created[0].one("To") == TO and created[0].one("From") == FROM
    # that call is answered but never streams here: let it go
    await asyncio.to_thread(TwilioLeg(created[0]).status, "completed")
