"""Attacks on the phone server's credentials and limits, against the real `chroma-agent serve
twilio` process (TWILIO_AUTH_TOKEN, `--public-url`, an admin key, a 3 s media timeout):
a replayed or foreign stream, a signature made for another host, a silent stream, an
oversized webhook body, a newline in a sid, per-call data without the admin key; and a
server with a token but no public URL, which must not start. Where practical a
well-behaved call runs beside the attack and must still get its reply in its usual time.

The unit parts (the token, the body cap) are checked in-process at the end."""
from __future__ import annotations

import asyncio
import json
import select
import socket
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

pytest.importorskip("pipecat")
from fastapi import FastAPI, Request  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import InvalidStatus  # noqa: E402

from chroma_agent.serving.body_limit import BodyLimit  # noqa: E402
from pipecat_chroma.twilio_server import check_serve_args  # noqa: E402
from pipecat_chroma.twilio_stream_token import TOKEN_PARAMETER, StreamTokens  # noqa: E402
from pipecat_chroma.twilio_testing import TwilioCall, sign, twiml_stream  # noqa: E402

from .conftest import speak  # noqa: E402
from .server_process import START_TIMEOUT_S  # noqa: E402
from .test_twilio_server import ADMIN_KEY, FORM, PUBLIC_URL, REPLY_TIMEOUT_S, TOKEN, ServerProcess  # noqa: E402

MEDIA_TIMEOUT_S = 3      # the guarded server's: a stream silent this long is ended
PUBLIC_WS = PUBLIC_URL.replace("https://", "wss://") + "/ws"
call_test = pytest.mark.timeout(90, func_only=True)


@pytest.fixture(scope="module")
def voice_file(voice, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hardening_voice") / "tiny.voice.safetensors"
    voice.save(path)
    return path


@pytest.fixture(scope="module")
def question(tmp_path_factory):
    import numpy as np
    import soundfile as sf

    samples, rate = sf.read(speak("What time does the store open on Saturday?",
                                  tmp_path_factory.mktemp("hardening_speech") / "q.wav"), dtype="float32")
    loud = np.flatnonzero(np.abs(samples) > 0.02)
    return samples[loud[0]:loud[-1] + 1], rate


@pytest.fixture(scope="module")
def guarded(tiny_checkpoint, voice_file, tmp_path_factory):
    log = tmp_path_factory.mktemp("guarded_server") / "server.log"
    env = {"TWILIO_AUTH_TOKEN": TOKEN, "CHROMA_AGENT_TWILIO_MEDIA_TIMEOUT_S": str(MEDIA_TIMEOUT_S),
           "CHROMA_AGENT_LOG_CARRIER_IDS": "true"}   # the carrier's sids in log lines: what the escaping test needs
    server = ServerProcess(tiny_checkpoint, voice_file, log, "--max-calls", "3", "--public-url", PUBLIC_URL, env=env)
    server.wait_ready()
    yield server
    server.stop()


def answer(server: ServerProcess, call_sid: str | None = None) -> tuple[str, str]:
    """Twilio's signed webhook for a call: (its CallSid, the TwiML answer)."""
    form = {**FORM, "CallSid": call_sid or "CA" + uuid.uuid4().hex}
    status, twiml = server.post_twiml(form, {"X-Twilio-Signature": sign(TOKEN, f"{PUBLIC_URL}/twiml", form)})
    assert status == 200, twiml
    return form["CallSid"], twiml


def answered_call(server: ServerProcess, **kwargs) -> TwilioCall:
    call_sid, twiml = answer(server)
    return TwilioCall.from_twiml(twiml, call_sid=call_sid, auth_token=TOKEN, connect_to=server.ws_url, **kwargs)


def stream_call(server: ServerProcess, call_sid: str, parameters: dict, **kwargs) -> TwilioCall:
    """A stream with a valid upgrade signature (replayable: the same for every stream)."""
    return TwilioCall(server.ws_url, call_sid=call_sid, headers={"X-Twilio-Signature": sign(TOKEN, PUBLIC_WS)},
                      custom_parameters=parameters, **kwargs)


async def refused_after_start(call: TwilioCall, timeout: float = 10) -> int | None:
    """The close code of a stream the server ends right after its `start`."""
    await call.connect()
    try:
        await asyncio.wait_for(call.closed.wait(), timeout)
    finally:
        await call.close()
    return call.close_code


async def settle(server: ServerProcess, conversations: int, timeout: float = 20) -> None:
    """Until `conversations` calls' pipelines run (their engine conversations are open), then
    half a second of the line's silence: a question asked while a call's pipeline still
    starts arrives as one burst later (on a cold server, seconds of it)."""
    deadline = time.monotonic() + timeout
    while server.health()["engine"]["conversations"] < conversations:
        assert time.monotonic() < deadline, f"fewer than {conversations} call pipelines running after {timeout} s"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)


async def reply_within(call: TwilioCall, question, timeout: float = REPLY_TIMEOUT_S) -> float:
    """Ask on a running call; seconds from the end of the question to the first reply audio."""
    spoken = await call.say(*question)
    heard, reply = await call.next_media(after=spoken, timeout=timeout)
    assert reply["streamSid"] == call.stream_sid
    return heard - spoken


def log_lines(server: ServerProcess, marker: str) -> list[str]:
    return [line for line in server.log.read_text().splitlines() if marker in line]


@call_test
async def test_a_replayed_or_foreign_stream_is_refused_and_a_good_call_goes_on(guarded, question):
    async with answered_call(guarded) as good:
        await settle(guarded, 1)
        asking = asyncio.create_task(reply_within(good, question))   # the good call talks all along
        call_sid, twiml = answer(guarded)
        _, parameters = twiml_stream(twiml)
        assert set(parameters) == {TOKEN_PARAMETER}
        async with stream_call(guarded, call_sid, parameters) as first:   # the token's own stream
            await guarded.wait_active(2)
            await first.stop()
        await guarded.wait_active(1)

        replayed = stream_call(guarded, call_sid, parameters)                    # the same token again
        assert await refused_after_start(replayed) == 1008
        other_sid, other_twiml = answer(guarded)
        foreign = stream_call(guarded, "CA" + uuid.uuid4().hex, twiml_stream(other_twiml)[1])   # another call's
        assert await refused_after_start(foreign) == 1008
        assert await refused_after_start(stream_call(guarded, other_sid, {})) == 1008            # no token
        forged = {TOKEN_PARAMETER: "9999999999.00.{}".format("0" * 64)}
        assert await refused_after_start(stream_call(guarded, other_sid, forged)) == 1008
        for _ in range(5):   # a flood of replays: refused, a line per kind
            assert await refused_after_start(stream_call(guarded, call_sid, parameters)) == 1008
        await guarded.wait_active(1)
        assert guarded.health_status()[0] == 200

        assert await asyncio.wait_for(asking, REPLY_TIMEOUT_S + 10) < REPLY_TIMEOUT_S
        async with stream_call(guarded, other_sid, twiml_stream(other_twiml)[1]) as late:   # still unused: fine
            await guarded.wait_active(2)
            await late.stop()
        await good.stop()
    await guarded.wait_active(0)
    assert len(log_lines(guarded, "refused a media stream: a stream token used before (a replayed stream)")) == 1
    assert len(log_lines(guarded, "refused a media stream: a stream token not issued for this call")) == 1
    assert len(log_lines(guarded, "refused a media stream: no stream token in the start message")) == 1


@call_test
async def test_a_signature_made_for_another_host_is_refused(guarded):
    other_app = "https://other-app.example.com"   # another app of the same Twilio account
    status, _ = guarded.post_twiml(FORM, {"Host": "other-app.example.com", "X-Forwarded-Proto": "https",
                                          "X-Twilio-Signature": sign(TOKEN, f"{other_app}/twiml", FORM)})
    assert status == 403
    loopback = {"X-Twilio-Signature": sign(TOKEN, f"{guarded.base}/twiml", FORM)}   # the URL the Host header names
    assert guarded.post_twiml(FORM, loopback)[0] == 403
    for signed_url, dialled in ((other_app.replace("https", "wss") + "/ws", "ws://other-app.example.com/ws"),
                                (guarded.ws_url, guarded.ws_url)):   # its Host header names the signed host
        headers = {"X-Forwarded-Proto": "https", "X-Twilio-Signature": sign(TOKEN, signed_url)}
        loopback = socket.create_connection(("127.0.0.1", guarded.port), timeout=5)
        with pytest.raises(InvalidStatus) as refused:
            async with connect(dialled, sock=loopback, additional_headers=headers, proxy=None, open_timeout=10):
                pass
        assert refused.value.response.status_code == 403
    assert guarded.post_twiml(FORM, {"X-Twilio-Signature": sign(TOKEN, f"{PUBLIC_URL}/twiml", FORM)})[0] == 200
    assert guarded.health()["active_calls"] == 0


@pytest.mark.timeout(START_TIMEOUT_S + 30, func_only=True)
def test_a_token_without_a_public_url_does_not_start(tiny_checkpoint, voice_file, tmp_path):
    server = ServerProcess(tiny_checkpoint, voice_file, tmp_path / "server.log", env={"TWILIO_AUTH_TOKEN": TOKEN})
    try:
        code = server.proc.wait(START_TIMEOUT_S)
    finally:
        server.stop()
    log = server.log.read_text()
    assert code == 2, log[-2000:]
    assert "TWILIO_AUTH_TOKEN is set but no public URL is given" in log and "--public-url https://" in log
    assert "phone server on" not in log   # it never listened


@call_test
async def test_a_silent_stream_is_ended_and_its_slot_freed(guarded, question):
    async with answered_call(guarded) as good:   # streams audio all along: never ended for silence
        await settle(guarded, 1)
        dead = answered_call(guarded, line=False)   # a valid `start`, then nothing
        await dead.connect()
        await guarded.wait_active(2)
        started = time.monotonic()
        await asyncio.wait_for(dead.closed.wait(), MEDIA_TIMEOUT_S + 10)
        assert time.monotonic() - started >= MEDIA_TIMEOUT_S - 0.5
        await dead.close()
        await guarded.wait_active(1, timeout=5)

        headers = {"X-Twilio-Signature": sign(TOKEN, PUBLIC_WS)}
        async with connect(guarded.ws_url, additional_headers=headers, proxy=None) as mute:   # no `start` at all
            opened = time.monotonic()
            await guarded.wait_active(2)
            await asyncio.wait_for(mute.wait_closed(), MEDIA_TIMEOUT_S + 10)
            assert mute.close_code == 1008 and time.monotonic() - opened >= MEDIA_TIMEOUT_S - 0.5
        await guarded.wait_active(1, timeout=5)
        status, health = guarded.health_status()
        assert status == 200 and health["active_calls"] == 1

        assert await reply_within(good, question) < REPLY_TIMEOUT_S   # the good call was never cut
        await good.stop()
    await guarded.wait_active(0)
    assert log_lines(guarded, f"({dead.call_sid}): no audio from the caller for {MEDIA_TIMEOUT_S} s")
    assert log_lines(guarded, f"({good.call_sid}) ended")


def _memory_kib(pid: int) -> dict[str, int]:
    """The process's VmRSS (resident now) and VmHWM (its peak), in KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}


def _reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its RSS now (Linux 4.0+); whether that worked. A body
    read whole and freed at once would show only in the peak: the server's large blocks
    go back to the OS the moment they are freed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _post_raw(port: int, head: bytes, body_chunks: int = 0, chunk: bytes = b"", timeout: float = 10) -> bytes:
    """POST /twiml over a raw socket: `head` (the headers), then up to `body_chunks` chunks
    of a chunked body, stopping once the server answers; the bytes of its answer (empty if
    it reset the connection before we could read one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        deadline = time.monotonic() + timeout
        try:
            for _ in range(body_chunks):
                if select.select([s], [], [], 0)[0]:
                    break
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            ready = select.select([s], [], [], max(0.0, deadline - time.monotonic()))[0]
            return s.recv(65536) if ready else b""
        except OSError:   # reset or timed out while sending: the server stopped reading
            return b""


@pytest.mark.timeout(90, func_only=True)
async def test_an_oversized_webhook_body_is_refused_unread(guarded, question):
    pid = guarded.proc.pid
    peak_reset = _reset_peak(pid)
    before = _memory_kib(pid)["VmRSS"]
    huge = 512 * 1024 * 1024   # declared, never sent: refused by its Content-Length alone
    head = (b"POST /twiml HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n\r\n" % huge)
    answered = await asyncio.to_thread(_post_raw, guarded.port, head)
    assert answered.startswith(b"HTTP/1.1 413"), answered[:200]
    assert b"connection: close" in answered.lower()

    chunked = (b"POST /twiml HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"CallSid=" + b"A" * (64 * 1024 - 8)
    for _ in range(3):   # 3 x up to 48 MiB, unsigned, without a Content-Length: read only up to the cap
        answered = await asyncio.to_thread(_post_raw, guarded.port, chunked, 768, chunk)
        assert answered == b"" or answered.startswith(b"HTTP/1.1 413"), answered[:200]
    # just over the cap, with a valid signature: the cap comes first
    form = {**FORM, "Padding": "x" * (16 * 1024)}
    status, _ = guarded.post_twiml(form, {"X-Twilio-Signature": sign(TOKEN, f"{PUBLIC_URL}/twiml", form)})
    assert status == 413
    after = _memory_kib(pid)
    grew = (after["VmHWM"] if peak_reset else after["VmRSS"]) - before
    assert grew < 16 * 1024, f"the server's RSS grew {grew / 1024:.0f} MiB under the attack"
    assert log_lines(guarded, "refused a request: a request body over the cap")

    assert guarded.health_status()[0] == 200   # and a call still goes through, as usual
    async with answered_call(guarded) as good:
        await settle(guarded, 1)
        assert await reply_within(good, question) < REPLY_TIMEOUT_S
        await good.stop()
    await guarded.wait_active(0)


@call_test
async def test_a_newline_in_a_sid_cannot_forge_a_log_line(guarded):
    forged = "\n2026-01-01 00:00:00.000 | ERROR    | FORGED-LINE"
    call_sid, twiml = answer(guarded, call_sid="CA" + uuid.uuid4().hex + forged)   # Twilio-signed, still hostile
    call = TwilioCall.from_twiml(twiml, call_sid=call_sid, auth_token=TOKEN, connect_to=guarded.ws_url,
                                 stream_sid="MZ" + uuid.uuid4().hex + forged)
    async with call:
        await guarded.wait_active(1)
        await call.send({"event": "media", "streamSid": call.stream_sid, "media": {"payload": "%%%"}})  # logged
        await call.stop()
    await guarded.wait_active(0)
    unsigned = {"CallSid": "CA1" + forged, "From": forged}
    assert guarded.post_twiml(unsigned)[0] == 403
    refused = stream_call(guarded, "CA2" + forged, {TOKEN_PARAMETER: forged, "x" + forged: forged},
                          stream_sid="MZ2" + forged)
    assert await refused_after_start(refused) == 1008
    await guarded.wait_active(0)

    log = guarded.log.read_text()
    assert not [line for line in log.splitlines() if "FORGED-LINE" in line and not line.startswith("20")]
    assert not [line for line in log.splitlines() if line.startswith("2026-01-01")]
    escaped = "\\n2026-01-01 00:00:00.000 | ERROR    | FORGED-LINE"
    assert f"({call_sid.split(chr(10))[0]}{escaped}) started" in log   # the sid (opted in), escaped, on its line
    assert f"({call_sid.split(chr(10))[0]}{escaped}) ended" in log


def _get(server: ServerProcess, path: str, key: str | None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(server.base + path, headers=headers), timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@call_test
async def test_metrics_have_no_call_data_and_calls_need_the_admin_key(guarded):
    from prometheus_client.parser import text_string_to_metric_families

    async with answered_call(guarded) as running:
        await guarded.wait_active(1)
        finished = answered_call(guarded)
        async with finished:
            await guarded.wait_active(2)
            await finished.stop()
        await guarded.wait_active(1)

        status, body = _get(guarded, "/metrics", None)   # Prometheus text, for any scraper: no call's data
        assert status == 200
        for secret in (running.call_sid, running.stream_sid, finished.call_sid, finished.stream_sid,
                       FORM["From"], FORM["To"], TOKEN, ADMIN_KEY):
            assert secret not in body
        samples = {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples if not s.labels}
        assert samples["chroma_calls_active"] == 1

        for wrong in (None, "not-the-key", ADMIN_KEY + "x"):   # GET /calls: the admin's only
            status, body = _get(guarded, "/calls", wrong)
            assert status == 401 and running.call_sid not in body
        status, body = _get(guarded, "/calls", ADMIN_KEY)
        admin = json.loads(body)
        assert status == 200 and running.call_sid in [c["call_sid"] for c in admin["active"]]
        assert finished.stream_sid in [c["stream_sid"] for c in admin["finished"]]
        assert admin["active_calls"] == 1 and admin["finished_calls"] >= 1 and admin["calls_total"] >= 2
        await running.stop()
    await guarded.wait_active(0)


# -- in-process: the token and the body cap --

def test_stream_tokens_are_single_use_bound_to_the_call_and_expire():
    now = [1000.0]
    tokens = StreamTokens(ttl_s=30, clock=lambda: now[0])
    token = tokens.issue("CA1")
    assert tokens.issue("CA1") != token                           # one per webhook
    assert tokens.redeem(token, "CA2") == "a stream token not issued for this call"
    assert tokens.redeem(token, "CA1") is None
    assert tokens.redeem(token, "CA1") == "a stream token used before (a replayed stream)"
    late = tokens.issue("CA3")
    now[0] += 32
    assert tokens.redeem(late, "CA3") == "an expired stream token"
    expires, nonce, mac = late.split(".")
    assert tokens.redeem(f"{int(expires) + 100}.{nonce}.{mac}", "CA3") == "a stream token not issued for this call"
    for junk in (None, "", 5, "a.b.c", "x" * 500, "1.2"):
        assert tokens.redeem(junk, "CA3") is not None
    assert StreamTokens().redeem(tokens.issue("CA4"), "CA4") is not None   # another process's secret


@pytest.mark.timeout(30)
def test_the_body_cap_refuses_by_length_and_stops_reading_a_chunked_body():
    app, refused = FastAPI(), []
    app.add_middleware(BodyLimit, max_bytes=100, on_refused=refused.append)

    @app.post("/x")
    async def read(request: Request) -> dict:
        return {"n": len(await request.body())}

    async def post(chunks: list[bytes], length: int | None) -> tuple[int, int]:
        """(status, chunks the server never asked for)."""
        headers = [(b"host", b"t")] + ([(b"content-length", b"%d" % length)] if length is not None else [])
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "path": "/x",
                 "raw_path": b"/x", "query_string": b"", "headers": headers, "scheme": "http", "root_path": "",
                 "server": ("t", 80), "client": ("c", 1)}
        pending = [{"type": "http.request", "body": c, "more_body": i + 1 < len(chunks)} for i, c in enumerate(chunks)]
        sent = []

        async def receive():
            return pending.pop(0) if pending else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        await app(scope, receive, send)
        return sent[0]["status"], len(pending)

    assert asyncio.run(post([b"a" * 100], 100)) == (200, 0)
    assert asyncio.run(post([b"a" * 50], 10 ** 9)) == (413, 1)        # by its Content-Length: nothing read
    assert asyncio.run(post([b"a" * 40] * 50, None)) == (413, 47)     # chunked: read just past the cap
    assert len(refused) == 2


def test_the_serve_arguments_are_checked_without_a_model(monkeypatch):
    monkeypatch.delenv("CHROMA_AGENT_TWILIO_MEDIA_TIMEOUT_S", raising=False)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TOKEN)
    with pytest.raises(ValueError, match="--public-url https://"):
        check_serve_args()
    with pytest.raises(ValueError, match="--public-url"):
        check_serve_args(public_url="ftp://x")
    check_serve_args(public_url="abc.ngrok.app")   # https:// is implied
    monkeypatch.setenv("CHROMA_AGENT_TWILIO_MEDIA_TIMEOUT_S", "0")
    with pytest.raises(ValueError, match="CHROMA_AGENT_TWILIO_MEDIA_TIMEOUT_S"):
        check_serve_args(public_url=PUBLIC_URL)
    with pytest.raises(ValueError, match="above 0"):
        check_serve_args(public_url=PUBLIC_URL, media_timeout_s=float("nan"))
    monkeypatch.delenv("TWILIO_AUTH_TOKEN")
    monkeypatch.setenv("CHROMA_AGENT_TWILIO_MEDIA_TIMEOUT_S", "2.5")
    check_serve_args()   # no token: no public URL needed
