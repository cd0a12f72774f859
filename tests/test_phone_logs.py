"""The phone server's JSON log lines (`serve phone --log-format json`), from the real process
through one call: every line is one JSON object with time, level, logger and message; the
call's own lines carry its `call_id` (the server's own id, as `/calls` shows it); and no line
names the carrier's call or stream id, a phone number, the admin key or the caller's words
(the carrier's ids only with `CHROMA_AGENT_LOG_CARRIER_IDS=true`, which the hardening tests use)."""
from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest

pytest.importorskip("pipecat")
from pipecat_chroma.twilio_testing import TwilioCall  # noqa: E402

from .test_twilio_server import ADMIN_KEY, REPLY_TIMEOUT_S, ServerProcess, phone_speech  # noqa: E402,F401  (a fixture)

CALLER, CALLED = "+15550001111", "+15550002222"


@pytest.fixture(scope="module")
def voice_file(voice, tmp_path_factory):
    path = tmp_path_factory.mktemp("phone_voice") / "tiny.voice.safetensors"
    voice.save(path)
    return path


@pytest.mark.timeout(150, func_only=True)
async def test_json_lines_carry_the_call_id_and_never_the_carriers_ids_numbers_or_keys(
        tiny_checkpoint, voice_file, tmp_path, phone_speech):
    server = ServerProcess(tiny_checkpoint, voice_file, tmp_path / "server.log", "--log-format", "json")
    call_sid, stream_sid = "CA" + uuid.uuid4().hex, "MZ" + uuid.uuid4().hex
    try:
        await asyncio.to_thread(server.wait_ready)
        status, _ = server.post_twiml({"CallSid": call_sid, "From": CALLER, "To": CALLED})
        assert status == 200
        async with TwilioCall(server.ws_url, call_sid=call_sid, stream_sid=stream_sid,
                              custom_parameters={"caller": CALLER}) as call:
            deadline = time.monotonic() + 60
            while server.health()["engine"]["conversations"] < 1:   # the pipeline runs: the question is heard whole
                assert time.monotonic() < deadline, "the call's pipeline did not start"
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            own_id = server.call_id(stream_sid)
            await call.send({"event": "media", "streamSid": stream_sid, "media": {"payload": "%%%"}})   # logged once
            spoken = await call.say(*phone_speech["question"])
            await call.next_media(after=spoken, timeout=REPLY_TIMEOUT_S)
            await call.stop()
            await asyncio.wait_for(call.closed.wait(), 10)
        await server.wait_active(0)
    finally:
        server.stop()
    text = server.log.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]   # every line: one JSON object
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    about_the_call = [line for line in lines if f"call {own_id}" in line["message"]]
    kinds = {kind for kind in ("started", "ignoring", "ended") for line in about_the_call if kind in line["message"]}
    assert kinds == {"started", "ignoring", "ended"}, about_the_call
    assert all(line.get("call_id") == own_id for line in about_the_call)
    for secret in (call_sid, stream_sid, CALLER, CALLED, CALLER.lstrip("+"), ADMIN_KEY, "store open"):
        assert secret not in text, f"{secret!r} is in the log"
