"""Each call's transcript on the phone and browser servers (`pipecat_chroma.call_transcript`):
the recorder on synthetic frames (both sides in call order, a barge-in, the limits), the
files (safe names, never overwritten, 0600, the folder checked at start), and end to end:
a phone call through the real server (the hooks and the per-call JSON Lines file, nothing
of the text in the log, /health, /metrics or /calls) and a browser call through `serve web
--transcripts DIR`. The tiny model's words are garbage tokens: the text is checked against
what the service pushed, not against English."""
from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
import threading
import time
import types

import pytest

pytest.importorskip("pipecat")
from loguru import logger  # noqa: E402
from pipecat.frames.frames import (  # noqa: E402
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TranscriptionFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402
from pipecat.transcriptions.language import Language  # noqa: E402

from pipecat_chroma import call_transcript  # noqa: E402
from pipecat_chroma.call_transcript import (  # noqa: E402
    CallTranscript,
    TranscriptRecorder,
    prepare_transcripts_dir,
    transcript_file_name,
    write_transcript,
)
from pipecat_chroma.twilio_testing import TwilioCall  # noqa: E402

from . import server_process  # noqa: E402
from .test_twilio_server import REPLY_TIMEOUT_S, phone_speech  # noqa: E402,F401  (a fixture)
from .test_web_server import (  # noqa: E402,F401  (microphone: a fixture)
    MESSAGES,
    Chromium,
    WebServerProcess,
    microphone,
    needs_chromium,
)


def heard(text: str, language=Language.EN) -> TranscriptionFrame:
    return TranscriptionFrame(text, "", "2026-01-01T00:00:00.000Z", language)


async def record(frames, **kwargs) -> tuple[CallTranscript, list, list]:
    """Run `frames` through a recorder; (its transcript after `finish`, the turns its hook
    saw, the frames that came out downstream)."""
    seen = []
    recorder = TranscriptRecorder(CallTranscript("CA1", "phone"), on_turn=seen.append, **kwargs)
    down, _ = await asyncio.wait_for(run_test(recorder, frames_to_send=frames), 10)
    return recorder.finish(), seen, down


# -- the recorder --

async def test_both_sides_are_recorded_in_call_order_and_every_frame_passes_on():
    frames = [UserStartedSpeakingFrame(), SleepFrame(0.05), UserStoppedSpeakingFrame(), SleepFrame(0.05),
              LLMFullResponseStartFrame(), LLMTextFrame("Hello "), TTSTextFrame("Hello ", "sentence"),
              heard("what time is it"), TTSTextFrame("there.", "sentence"), LLMFullResponseEndFrame()]
    transcript, seen, down = await record(frames)
    sent = [type(f) for f in frames if not isinstance(f, SleepFrame)]
    assert [type(f) for f in down] == sent   # unchanged, in order
    user, voice = transcript.turns
    assert seen == transcript.turns
    assert (user.turn, user.role, user.text, user.language) == (1, "user", "what time is it", "en")
    assert (voice.turn, voice.role, voice.text, voice.interrupted) == (2, "assistant", "Hello there.", False)
    # the caller's times are the turn's (not when the transcript came), before the reply began
    assert user.started_at < user.ended_at <= voice.started_at < voice.ended_at
    assert user.ended_at - user.started_at >= 0.04
    line = json.loads(transcript.jsonl().splitlines()[1])
    assert line == {"turn": 1, "role": "user", "text": "what time is it", "language": "en",
                    "started_at": line["started_at"], "ended_at": line["ended_at"]}
    assert line["started_at"].endswith("+00:00") and "T" in line["started_at"]


async def test_a_barged_in_reply_keeps_what_was_generated_and_is_marked_interrupted():
    frames = [UserStartedSpeakingFrame(), UserStoppedSpeakingFrame(), SleepFrame(0.05),
              LLMFullResponseStartFrame(), TTSTextFrame("One two ", "sentence"), SleepFrame(0.05),
              UserStartedSpeakingFrame(), InterruptionFrame(),   # the caller talks over it
              heard("first question"), LLMFullResponseEndFrame(), SleepFrame(0.05),
              UserStoppedSpeakingFrame(), LLMFullResponseStartFrame(), TTSTextFrame("Sure.", "sentence"),
              LLMFullResponseEndFrame(), SleepFrame(0.05)]
    transcript, seen, _ = await record(frames)
    roles = [(t.role, t.text, t.interrupted) for t in transcript.turns]
    # the second turn's transcript was empty (silence): no user turn for it
    assert roles == [("user", "first question", False), ("assistant", "One two ", True), ("assistant", "Sure.", False)]
    first_user, first_reply, second_reply = transcript.turns
    assert first_user.ended_at <= first_reply.started_at   # the first turn's times, not the barge-in's
    assert second_reply.started_at > first_reply.ended_at


async def test_empty_turns_are_left_out_and_an_uninterruptible_line_is_not_interrupted():
    frames = [LLMFullResponseStartFrame(), LLMFullResponseEndFrame(),    # a reply with nothing to say
              heard("   "), SleepFrame(0.05)]
    greeting = LLMFullResponseStartFrame()
    greeting.interruptible = False
    frames += [greeting, TTSTextFrame("Hello!", "sentence"), InterruptionFrame(), LLMFullResponseEndFrame()]
    transcript, _, _ = await record(frames)
    assert [(t.role, t.text, t.interrupted) for t in transcript.turns] == [("assistant", "Hello!", False)]


async def test_a_call_that_ends_mid_reply_keeps_the_reply_as_interrupted():
    frames = [LLMFullResponseStartFrame(), TTSTextFrame("Half a", "sentence"), SleepFrame(0.05)]
    transcript, _, _ = await record(frames)   # run_test ends with EndFrame; finish() closes what is open
    assert [(t.text, t.interrupted) for t in transcript.turns] == [("Half a", True)]
    assert transcript.ended_at is not None


async def test_a_failing_hook_is_logged_without_the_text_and_the_call_goes_on():
    lines = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG")

    def broken(turn):
        raise RuntimeError(f"cannot store {turn.text}")

    try:
        recorder = TranscriptRecorder(CallTranscript("CA3", "phone"), on_turn=broken)
        down, _ = await asyncio.wait_for(run_test(recorder, frames_to_send=[
            LLMFullResponseStartFrame(), heard("secret words"), TTSTextFrame("private reply", "sentence"),
            LLMFullResponseEndFrame()]), 10)
    finally:
        logger.remove(sink)
    assert [t.text for t in recorder.transcript.turns] == ["secret words", "private reply"]
    assert any("transcript hook failed (RuntimeError)" in line for line in lines)
    assert not any("secret" in line or "private" in line for line in lines)


def test_a_call_keeps_a_bounded_transcript(monkeypatch):
    monkeypatch.setattr(call_transcript, "MAX_TURNS", 3)
    monkeypatch.setattr(call_transcript, "MAX_TURN_CHARS", 10)
    monkeypatch.setattr(call_transcript, "MAX_CHARS", 25)
    transcript = CallTranscript("CA4", "phone")
    assert transcript.add("user", "x" * 50, 1.0).text == "x" * 10   # clipped
    assert transcript.add("assistant", "y" * 10, 2.0) is not None
    assert transcript.add("user", "z" * 6, 3.0) is None               # over MAX_CHARS: left out
    assert transcript.add("user", "z" * 5, 3.0) is not None
    assert transcript.add("assistant", "", 4.0) is None              # over MAX_TURNS
    assert (len(transcript.turns), transcript.dropped_turns, transcript.clipped_turns) == (3, 2, 1)
    assert transcript.header()["dropped_turns"] == 2 and transcript.turns[0].as_dict()["clipped"] is True


async def test_a_reply_longer_than_a_turn_may_be_stops_growing(monkeypatch):
    monkeypatch.setattr(call_transcript, "MAX_TURN_CHARS", 8)
    frames = [LLMFullResponseStartFrame(), *[TTSTextFrame("word ", "sentence") for _ in range(50)],
              LLMFullResponseEndFrame()]
    transcript, _, _ = await record(frames)
    (reply,) = transcript.turns
    assert reply.text == "word wor" and reply.clipped


# -- files --

def test_the_folder_is_made_private_and_checked_writable_at_start(tmp_path):
    made = prepare_transcripts_dir(tmp_path / "a" / "transcripts")
    assert made.is_dir() and stat.S_IMODE(made.stat().st_mode) == 0o700
    assert prepare_transcripts_dir(None) is None
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"--transcripts .*file/sub: cannot write transcripts there"):
        prepare_transcripts_dir(tmp_path / "file" / "sub")


def test_files_have_safe_names_are_private_and_never_overwritten(tmp_path):
    assert transcript_file_name("CA0123456789abcdef0123456789abcdef") == "CA0123456789abcdef0123456789abcdef"
    assert transcript_file_name("../../etc/passwd") == "______etc_passwd"
    assert transcript_file_name("") == "call" and len(transcript_file_name("x" * 500)) == 64
    transcript = CallTranscript("../../escape", "phone", started_at=1.0, ended_at=2.0)
    transcript.add("user", "héllo", 1.1, 1.2, language="fr")
    first = write_transcript(tmp_path, transcript)
    second = write_transcript(tmp_path, transcript)
    assert (first.name, second.name) == ("______escape.jsonl", "______escape-2.jsonl")
    assert first.parent == tmp_path and {p.name for p in tmp_path.iterdir()} == {first.name, second.name}
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    header, turn = [json.loads(line) for line in first.read_text(encoding="utf-8").splitlines()]
    assert header == {"call_id": "../../escape", "server": "phone", "started_at": "1970-01-01T00:00:01.000+00:00",
                      "ended_at": "1970-01-01T00:00:02.000+00:00", "turns": 1, "dropped_turns": 0, "clipped_turns": 0}
    assert turn == {"turn": 1, "role": "user", "text": "héllo", "language": "fr",
                    "started_at": "1970-01-01T00:00:01.100+00:00", "ended_at": "1970-01-01T00:00:01.200+00:00"}
    os.symlink(tmp_path / "elsewhere", tmp_path / "link.jsonl")   # a planted link is not followed
    linked = write_transcript(tmp_path, CallTranscript("link", "web"))
    assert linked.name == "link-2.jsonl" and not (tmp_path / "elsewhere").exists()


def test_serve_refuses_a_transcripts_folder_it_cannot_write_before_the_model_loads(voice, tmp_path, capsys):
    from chroma_agent.cli import main

    voice.save(tmp_path / "me.voice.safetensors")
    (tmp_path / "file").write_text("")
    for kind in ("twilio", "web"):
        # a model path that does not exist: were it loaded first, that would be the error
        assert main(["serve", kind, "--model", str(tmp_path / "no-model"), "--device", "cpu", "--voice",
                     str(tmp_path / "me.voice.safetensors"), "--transcripts", str(tmp_path / "file" / "t")]) == 2
        assert "cannot write transcripts there" in capsys.readouterr().err


def test_serve_passes_the_transcripts_folder_only_when_given(tiny_checkpoint, voice, tmp_path, monkeypatch):
    from chroma_agent.cli import main

    calls = []
    plugin = types.ModuleType("pipecat_chroma.twilio_server")
    plugin.serve = lambda **kwargs: calls.append(kwargs)
    monkeypatch.setitem(sys.modules, "pipecat_chroma.twilio_server", plugin)
    voice.save(tmp_path / "me.voice.safetensors")
    argv = ["serve", "twilio", "--model", str(tiny_checkpoint), "--device", "cpu", "--voice",
            str(tmp_path / "me.voice.safetensors")]
    assert main(argv) == 0 and main([*argv, "--transcripts", str(tmp_path / "t")]) == 0
    assert "transcripts_dir" not in calls[0] and calls[1]["transcripts_dir"] == str(tmp_path / "t")


def test_a_server_records_only_when_something_takes_the_transcripts(model, voice, tmp_path):
    from pipecat_chroma.twilio_server import PhoneServer
    from pipecat_chroma.web_server import WebServer

    class Hooked(PhoneServer):
        def on_transcript(self, call, turn):
            pass

    assert PhoneServer(model, voice).transcript_recorder(None, "CA1") is None
    assert Hooked(model, voice).transcript_recorder(None, "CA1") is not None
    server = WebServer(model, voice, transcripts_dir=tmp_path / "t")
    recorder = server.transcript_recorder(None, "pc")
    assert recorder.transcript.server == "web" and server.transcripts_dir == (tmp_path / "t").resolve()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot write transcripts there"):
        PhoneServer(model, voice, transcripts_dir=tmp_path / "file" / "t")


# -- end to end --

def _texts(turns) -> list[str]:
    """The turns' texts worth looking for elsewhere (the tiny model's are sometimes only
    whitespace or a character or two)."""
    return [t["text"].strip() for t in turns if len(t["text"].strip()) >= 4]


@pytest.mark.timeout(120, func_only=True)
async def test_a_phone_call_gets_its_transcript_file_and_hooks(model, voice, phone_speech, tmp_path):
    import urllib.request

    from chroma_agent.runtime.engine import ChromaEngine
    from pipecat_chroma.twilio_server import PhoneServer

    class Recording(PhoneServer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.turns, self.ended = [], threading.Event()   # the server runs in its own thread and loop

        def on_transcript(self, call, turn):
            self.turns.append((call.call_sid, turn.as_dict()))

        async def on_call_transcript(self, call, transcript):
            self.whole = (call.call_sid, transcript)
            self.ended.set()

    lines = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG")   # everything the server logs
    engine = ChromaEngine(model, max_conversations=1)
    phone = Recording(engine, voice, max_calls=1, max_frames=25, transcripts_dir=tmp_path / "transcripts",
                      admin_key="admin")
    running = server_process.AppThread(phone.app())
    try:
        async with asyncio.timeout(100):
            await asyncio.to_thread(running.start)
            async with TwilioCall(f"ws://127.0.0.1:{running.port}/ws") as call:
                while not any(c.end for c in phone.active.values()):   # its pipeline is built
                    await asyncio.sleep(0.05)
                await asyncio.sleep(1.0)   # and started (on a busy machine it takes a while to hear)
                spoken = await call.say(*phone_speech["question"])
                await call.next_media(after=spoken, timeout=REPLY_TIMEOUT_S)
                await call.until_quiet(1.0, timeout=REPLY_TIMEOUT_S)   # the reply played out
                # and the caller's transcript came (the tiny model's runs to its token cap)
                while len(phone.turns) < 2:
                    await asyncio.sleep(0.1)
                await call.stop()
                await call.closed.wait()
            assert await asyncio.to_thread(phone.ended.wait, 30), "on_call_transcript was not called"
            base = running.base
            health = await asyncio.to_thread(lambda: urllib.request.urlopen(base + "/health", timeout=5).read())
            metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(base + "/metrics", timeout=5).read())
            metrics += await asyncio.to_thread(lambda: urllib.request.urlopen(urllib.request.Request(
                base + "/calls", headers={"Authorization": "Bearer admin"}), timeout=5).read())
    finally:
        await asyncio.to_thread(running.stop)
        engine.close()
        logger.remove(sink)

    path = tmp_path / "transcripts" / f"{call.call_sid}.jsonl"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    header, *turns = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert header["call_id"] == call.call_sid and header["server"] == "phone" and header["turns"] == len(turns)
    assert not {"from", "to", "from_number", "to_number"} & set(header)
    # both sides of the turn, in order: the caller's words (the model's transcript), then the reply
    assert [t["role"] for t in turns[:2]] == ["user", "assistant"], turns
    assert turns[0]["text"] and turns[0]["language"] == "en" and turns[1]["text"]
    assert [t["turn"] for t in turns] == list(range(1, len(turns) + 1))
    assert turns[0]["started_at"] <= turns[0]["ended_at"] <= turns[1]["started_at"] <= turns[1]["ended_at"]
    # the hooks saw the same turns as the file, for this call
    assert phone.turns == [(call.call_sid, t) for t in turns]
    assert phone.whole[0] == call.call_sid and [t.as_dict() for t in phone.whole[1].turns] == turns
    # personal data: nothing of the text in the log, /health, /metrics or /calls
    log, public = "\n".join(lines), health.decode() + metrics.decode()
    own_id = phone.finished[-1].id   # log lines name the call by the server's own id, never the carrier's
    assert f"call {own_id} ended" in log and f"transcript of phone call {own_id}: {path.parent}" in log
    # the carrier's call id: in no line at the served level (Pipecat's DEBUG lines print a stream's call data)
    assert call.call_sid not in "\n".join(line for line in lines if "| DEBUG " not in line)
    for text in _texts(turns):
        assert text not in log and json.dumps(text)[1:-1] not in public


@needs_chromium
@pytest.mark.timeout(server_process.START_TIMEOUT_S + 150, func_only=True)
async def test_a_browser_call_gets_its_transcript_file(tiny_checkpoint, voice, microphone, tmp_path):
    voice.save(tmp_path / "tiny.voice.safetensors")
    folder = tmp_path / "transcripts"
    server = WebServerProcess(tiny_checkpoint, tmp_path / "tiny.voice.safetensors", tmp_path / "server.log",
                              "--max-calls", "1", "--transcripts", str(folder))
    try:
        await asyncio.to_thread(server.wait_ready)
        assert folder.is_dir() and not list(folder.iterdir())   # made at start
        browser = await Chromium(server.base + "/", microphone, tmp_path / "profile").start()
        try:
            await browser.evaluate("document.getElementById('connect').click()")
            await browser.wait_for(f"{MESSAGES}.includes('bot-ready')", 30, "the call connected (RTVI bot-ready)")
            await browser.wait_for(f"{MESSAGES}.includes('bot-stopped-speaking')", 90, "a reply was played")
            # and the caller's final transcript came (RTVI; the tiny model's runs to its token cap)
            await browser.wait_for(f"{MESSAGES}.includes('user-transcription') && "
                                   "!document.querySelector('#transcript .interim')", 60, "the caller's transcript")
            await browser.evaluate("document.getElementById('connect').click()")   # hang up
            await server.wait_active(0)
        finally:
            await browser.close()
        deadline = time.monotonic() + 10
        while not (files := list(folder.glob("*.jsonl"))):
            assert time.monotonic() < deadline, "no transcript file after the session ended"
            await asyncio.sleep(0.2)
        (path,) = files
        header, *turns = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert header["server"] == "web" and header["turns"] == len(turns) and path.stem.startswith("SmallWebRTC")
        assert [t["role"] for t in turns[:2]] == ["user", "assistant"], turns
        assert turns[0]["text"] and turns[1]["text"]
        log, health = server.log.read_text(), json.dumps(server.health())
        for text in _texts(turns):
            assert text not in log and json.dumps(text)[1:-1] not in health
    finally:
        server.stop()
