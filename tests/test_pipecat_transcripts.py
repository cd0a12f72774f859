"""The caller's words in Pipecat (plugins/pipecat): `ChromaSpeechToSpeechService` pushes
each transcribed user turn as `InterimTranscriptionFrame`s and one `TranscriptionFrame`,
downstream and upstream, driven by pipecat's own `run_test` on the tiny checkpoint with
espeak-ng speech. The tiny model's "words" are garbage tokens: the reference sentence gives
some (" aft aft ..."), the question only newlines (a turn with no words); every frame is
checked against the core's own transcript of the same audio."""
from __future__ import annotations

import asyncio
import datetime
import html
import itertools
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

pytest.importorskip("pipecat")
from pipecat.frames.frames import (  # noqa: E402
    ErrorFrame,
    InterimTranscriptionFrame,
    LLMFullResponseEndFrame,
    OutputTransportMessageUrgentFrame,
    STTMetadataFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    UserAudioRawFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.processors.aggregators.llm_context import LLMContext  # noqa: E402
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair  # noqa: E402
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402
from pipecat.transcriptions.language import Language  # noqa: E402
from pipecat_chroma.transcripts import transcript_language  # noqa: E402

from chroma_agent.events import TranscriptDone  # noqa: E402
from chroma_agent.runtime import transcription  # noqa: E402

from .test_pipecat_service import (  # noqa: E402
    REPLY_FRAMES,
    Player,
    SpyModel,
    input_frames,
    kinds,
    service,
    turn,
    wait_until,
)
from .test_web_server import (  # noqa: E402, F401 - server, microphone: fixtures
    CHROMIUM,
    MESSAGES,
    REPLY_TIMEOUT_S,
    Chromium,
    browser_test,
    microphone,
    needs_chromium,
    server,
)

CAP = 16   # transcript tokens per turn (the tiny model never ends one by itself)


@pytest.fixture(autouse=True)
def small_cap(monkeypatch) -> dict:
    """Transcript passes stop at `cap["tokens"]` tokens (a test may change it)."""
    real, cap = transcription.TranscriptPass.__init__, {"tokens": CAP}

    def capped(self, *a, **kw):
        kw["max_tokens"] = cap["tokens"]
        real(self, *a, **kw)

    monkeypatch.setattr(transcription.TranscriptPass, "__init__", capped)
    return cap


def at_16k(path: Path) -> np.ndarray:
    data, rate = sf.read(path, dtype="float32")
    return (soxr.resample(data, rate, 16000) * 32767).astype(np.int16)


@pytest.fixture(scope="module")
def words(speech) -> np.ndarray:
    """Speech the tiny model transcribes to some non-blank text."""
    return at_16k(speech["reference"])


@pytest.fixture(scope="module")
def no_words(speech) -> np.ndarray:
    """Speech the tiny model transcribes to newlines only: a turn with no words."""
    return at_16k(speech["question"])


def of(frames, kind) -> list:
    return [f for f in frames if type(f) is kind]


def dones(spy: SpyModel) -> list[TranscriptDone]:
    return [e for c in spy.conversations for e in c.events if isinstance(e, TranscriptDone)]


def reference_text(model, voice, audio: np.ndarray, rate: int, language: str = "English") -> str:
    """The core's standalone pass over the audio the service answered."""
    done = model.conversation(voice=voice).transcribe(audio, rate, language=language).wait(60)
    assert done is not None and done.error is None
    return done.text


class RealTimePlayer(Player):
    """Plays the reply's audio in real time, as an output transport does."""

    async def process_frame(self, frame, direction):
        if isinstance(frame, TTSAudioRawFrame):
            await asyncio.sleep(len(frame.audio) / 2 / frame.sample_rate)
        await super().process_frame(frame, direction)


# -- tests --

def test_the_language_setting_maps_to_the_prompt_and_the_frames():
    assert transcript_language(None) == ("English", Language.EN)
    assert transcript_language(Language.DE) == ("German", Language.DE)
    assert transcript_language(Language.PT_BR) == ("Portuguese", Language.PT_BR)
    assert transcript_language("fr") == ("French", Language.FR)
    assert transcript_language("pt-BR") == ("Portuguese", Language.PT_BR)
    assert transcript_language("French") == ("French", Language.FR)
    assert transcript_language("Klingon") == ("Klingon", None)   # asked for as given; Pipecat has no code


@pytest.mark.timeout(120)
async def test_transcription_frames_end_to_end(model, voice, words):
    spy, player = SpyModel(model), Player()
    # Daily / LiveKit deliver UserAudioRawFrames: the speaker's id is the frames' user_id
    audio = [UserAudioRawFrame(f.audio, f.sample_rate, f.num_channels, user_id="caller-7")
             for f in input_frames(words)]
    down, up = await run_test(Pipeline([service(spy, voice), player]),
                              frames_to_send=[UserStartedSpeakingFrame(), *audio, UserStoppedSpeakingFrame()])

    [done] = dones(spy)
    call = spy.conversations[0].calls[0][1]
    assert call["transcribe"] is True and call["language"] == "English"   # on by default
    assert done.error is None and done.text.strip()
    assert done.text == reference_text(model, voice, call["audio"], call["sample_rate"])

    # one final frame each way, siblings; the downstream one reached the processor after the service
    [final] = of(down, TranscriptionFrame)
    [final_up] = of(up, TranscriptionFrame)
    assert final in [f for _, f in player.arrivals]
    assert (final.text, final.user_id, final.language, final.result) == (done.text.strip(), "caller-7", Language.EN, done)
    assert (final_up.text, final_up.user_id, final_up.result) == (final.text, "caller-7", done)
    assert final.broadcast_sibling_id == final_up.id and final_up.broadcast_sibling_id == final.id
    assert not final.interruptible and not final_up.interruptible   # a barge-in cannot drop the record
    assert datetime.datetime.fromisoformat(final.timestamp).tzinfo is not None   # ISO 8601, UTC

    # interim frames: the words so far (cumulative), ending with the final text, both ways
    interims = of(down, InterimTranscriptionFrame)
    assert interims and [f.text for f in interims] == [f.text for f in of(up, InterimTranscriptionFrame)]
    assert all(b.text.startswith(a.text) for a, b in zip(interims, interims[1:]))
    assert interims[-1].text == final.text and all(f.user_id == "caller-7" for f in interims)

    # after the reply's first audio (which never waits for it), before the reply ends
    order = [type(f) for f in down]
    assert order.index(TTSAudioRawFrame) < order.index(InterimTranscriptionFrame)
    assert order.index(TranscriptionFrame) < order.index(LLMFullResponseEndFrame)
    assert not of(up, ErrorFrame)


@pytest.mark.timeout(120)
async def test_a_turn_with_no_words_pushes_no_transcription_frame(model, voice, no_words):
    spy = SpyModel(model)
    room_tone = np.random.default_rng(0).normal(0, 33, 16000).astype(np.int16)   # about -60 dBFS
    frames = itertools.chain(turn(no_words), wait_until(lambda: len(dones(spy)) == 1), turn(room_tone))
    down, up = await run_test(service(spy, voice, max_frames=4), frames_to_send=frames)
    assert len(dones(spy)) == 2
    assert all(d.error is None and not d.text.strip() for d in dones(spy))   # newlines; "" for the silence
    assert not of(down + up, TranscriptionFrame) and not of(down + up, InterimTranscriptionFrame)
    assert not of(up, ErrorFrame)
    assert kinds(down).count(LLMFullResponseEndFrame) == 2   # both turns answered


@pytest.mark.timeout(120)
async def test_a_failed_transcript_is_a_non_fatal_error_and_the_call_goes_on(model, voice, words, monkeypatch):
    real, broken = transcription.recognition_prompt, []

    def fails_once(*a, **kw):
        if not broken:
            broken.append(1)
            raise RuntimeError("recognition broke")
        return real(*a, **kw)

    monkeypatch.setattr(transcription, "recognition_prompt", fails_once)
    spy = SpyModel(model)
    frames = itertools.chain(turn(words), wait_until(lambda: len(dones(spy)) == 1), turn(words))
    down, up = await run_test(service(spy, voice, max_frames=4), frames_to_send=frames)
    first, second = dones(spy)
    assert first.error == "recognition broke" and second.error is None and second.text.strip()
    [error] = of(up, ErrorFrame)
    assert "transcript failed: recognition broke" in error.error and not error.fatal
    assert error.processor.is_usable
    # the failed turn: nothing else; the reply and the next turn go on
    assert [f.result for f in of(down, TranscriptionFrame)] == [second]
    reply = kinds(down)
    assert reply.count(LLMFullResponseEndFrame) == 2 and reply.count(TTSAudioRawFrame) >= 2


@pytest.mark.timeout(120)
async def test_transcribe_off_and_another_language(model, voice, words):
    spy = SpyModel(model)
    down, up = await run_test(service(spy, voice, max_frames=4, transcribe=False), frames_to_send=turn(words))
    assert "transcribe" not in spy.conversations[0].calls[0][1] and not dones(spy)
    assert not of(down + up, TranscriptionFrame) and not of(down + up, InterimTranscriptionFrame)

    spy = SpyModel(model)
    down, _ = await run_test(service(spy, voice, max_frames=4, language=Language.DE), frames_to_send=turn(words))
    call = spy.conversations[0].calls[0][1]
    assert call["language"] == "German"
    [final] = of(down, TranscriptionFrame)
    assert final.language == Language.DE and final.user_id == ""   # plain input audio has no speaker id
    assert final.result.text == reference_text(model, voice, call["audio"], call["sample_rate"], "German")


@pytest.mark.timeout(120)
async def test_the_user_aggregator_records_the_turn_once_and_it_is_not_answered_again(model, voice, words,
                                                                                        small_cap):
    small_cap["tokens"] = 4   # the transcript ends early in the reply, as a short answer's does
    context = LLMContext([{"role": "system", "content": "Be brief."}])
    pair = LLMContextAggregatorPair(context)
    spy, player = SpyModel(model), RealTimePlayer()
    pipeline = Pipeline([pair.user(), service(spy, voice, max_frames=40), player, pair.assistant()])
    # the turn frames pass the aggregator on to the service. In realtime mode it writes the turn
    # `ttfs_p99_latency` after the reply starts (2 s: the 3.2 s reply is still playing, and the
    # transcript is in) and pushes the context on to the service: a context with a user message
    # after the last assistant one, which must not be answered as a text turn
    written = lambda: any(m["role"] == "user" for m in context.get_messages())  # noqa: E731
    frames = itertools.chain([STTMetadataFrame(service_name="test", ttfs_p99_latency=2.0)], turn(words),
                             wait_until(written), [SleepFrame(0.5)])
    down, up = await run_test(pipeline, frames_to_send=frames)

    [done] = dones(spy)
    messages = context.get_messages()
    users = [m for m in messages if m["role"] == "user"]
    assert users == [{"role": "user", "content": done.text.strip()}]   # the caller's turn, in the context
    assert messages.index(users[0]) < max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    # one reply, to the audio: the context frame carrying the written turn is not a text turn
    assert [c[0] for c in spy.conversations[-1].calls] == ["respond"]
    assert "text" not in spy.conversations[-1].calls[0][1] or not spy.conversations[-1].calls[0][1]["text"]
    assert kinds([f for _, f in player.arrivals], REPLY_FRAMES).count(LLMFullResponseEndFrame) == 1
    assert not of(up, ErrorFrame)


@pytest.mark.timeout(120)
async def test_rtvi_reports_each_transcript_once_as_user_transcription(model, voice, words):
    spy = SpyModel(model)
    down, _ = await run_test(service(spy, voice, max_frames=4), frames_to_send=turn(words), enable_rtvi=True)
    messages = [f.message for f in down if isinstance(f, OutputTransportMessageUrgentFrame)]
    said = [m["data"] for m in messages if m.get("type") == "user-transcription"]
    [done] = dones(spy)
    # the downstream sibling only: each interim once, the final once
    assert [d["text"] for d in said if d["final"]] == [done.text.strip()]
    assert [d["text"] for d in said if not d["final"]] == [f.text for f in of(down, InterimTranscriptionFrame)]


# -- the browser page --

PAGE = Path(__file__).resolve().parents[1] / "plugins" / "pipecat" / "pipecat_chroma" / "web" / "index.html"


def test_the_page_handles_user_transcription():
    script = PAGE.read_text()
    assert 'case "user-transcription"' in script and "data.final" in script


# the page's own message handler, fed RTVI messages as pipecat's observer sends them
PAGE_SCRIPT = """(() => {
  const call = { seen: new Set(), you: null, reply: null, heard: null, ended: false };
  const send = (type, data) => onMessage(call, { data: JSON.stringify({ label: "rtvi-ai", type, data: data || {} }) });
  const said = (text, final) => send("user-transcription", { text, final, user_id: "", timestamp: "t" });
  const lines = () => Array.from(document.querySelectorAll("#transcript p"), (p) => p.innerText);
  const seen = [];
  send("user-started-speaking"); send("user-stopped-speaking");
  said("what time", false); seen.push(lines());
  // a barge-in: the next turn starts before the first turn's words end; they stay on the first turn
  send("bot-output", { text: "At nine.", spoken: true }); send("user-started-speaking");
  said("what time does it open", true); seen.push(lines());
  send("user-stopped-speaking"); said("thanks", false); said("thanks a lot", true); seen.push(lines());
  said("no turn messages", true); seen.push(lines());   // a server that sends no turn messages
  return seen;
})()"""


@needs_chromium
@pytest.mark.timeout(90)
def test_the_page_shows_the_callers_words_in_chromium(tmp_path):
    # the page as served, in headless Chromium; --dump-dom prints the DOM once the script has run
    page = tmp_path / "page.html"
    page.write_text(PAGE.read_text().replace("</body>", "<script>document.title = JSON.stringify("
                                             + PAGE_SCRIPT + ");</script></body>"))
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=60)
    title = out.stdout.split("<title>", 1)[1].split("</title>", 1)[0]
    seen = json.loads(html.unescape(title))
    assert seen == [
        ["You: what time"],
        ["You: what time does it open", "Voice: At nine.", "You: (speaking...)"],
        ["You: what time does it open", "Voice: At nine.", "You: thanks a lot"],
        ["You: what time does it open", "Voice: At nine.", "You: thanks a lot", "You: no turn messages"],
    ], out.stderr[-2000:]


# the RTVI user-transcription messages the page gets, recorded before its own handler runs
RECORD_WORDS = """(() => {
  window.saidToPage = [];
  const pageHandler = onMessage;
  onMessage = (call, event) => {
    try { const m = JSON.parse(event.data); if (m.type === "user-transcription") window.saidToPage.push(m.data); }
    catch (e) {}
    pageHandler(call, event);
  };
  return true;
})()"""


@needs_chromium
@browser_test
async def test_a_browser_call_shows_the_callers_words(server, microphone, tmp_path):
    # the real server and page: whatever the server transcribes of the spoken question is what the
    # page shows for that turn (the tiny model's words are whatever its garbage tokens decode to)
    browser = await Chromium(server.base + "/", microphone, tmp_path / "profile").start()
    try:
        assert await browser.evaluate(RECORD_WORDS)
        await browser.evaluate("document.getElementById('connect').click()")
        await browser.wait_for(f"{MESSAGES}.includes('bot-ready')", 30, "the call connected (RTVI bot-ready)")
        await browser.wait_for(f"{MESSAGES}.includes('bot-stopped-speaking')", REPLY_TIMEOUT_S, "the reply was played")
        said = await browser.evaluate("window.saidToPage")
        you = await browser.evaluate("Array.from(document.querySelectorAll('#transcript .you'), "
                                     "(p) => [p.querySelector('span').textContent, p.className])")
        await browser.evaluate("document.getElementById('connect').click()")   # hang up
        await server.wait_active(0)
    finally:
        await browser.close()
    finals = [d["text"] for d in said if d["final"]]
    if finals:   # the turn's words, once; its interim words grew to them
        assert you[0] == [finals[0], "you"] and len(finals) == 1, (said, you)
        interims = [d["text"] for d in said if not d["final"]]
        assert all(finals[0].startswith(t) for t in interims)
    else:   # no words in the turn (newlines from the tiny model): no transcript, the turn stays "(spoke)"
        assert not said and you[0] == ["(spoke)", "you"], (said, you)
