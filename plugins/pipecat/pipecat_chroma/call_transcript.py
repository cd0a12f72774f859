"""Each call's transcript, both sides turn by turn, for the phone and browser servers.

    class MyServer(PhoneServer):                       # or WebServer
        def on_transcript(self, call, turn):          # each turn as it is final (on the event loop)
            ...
        async def on_call_transcript(self, call, transcript):   # the whole call, when it ends
            ...
    MyServer(engine, voice, transcripts_dir="transcripts/")       # and/or one JSON Lines file per call

`TranscriptRecorder` sits right after `ChromaSpeechToSpeechService` in the call's pipeline
(`call_pipeline.voice_pipeline`) and records what the service pushes downstream: the
caller's turns from its final `TranscriptionFrame`s, the voice's from the `TTSTextFrame`s
of each reply (`LLMFullResponseStartFrame` .. `LLMFullResponseEndFrame`). A reply cut by
a barge-in (or by the call ending) keeps the text generated until then, marked
`interrupted`. A turn (`TranscriptTurn.as_dict()`, one JSON object a line):

    {"turn": 1, "role": "user", "text": "...", "started_at": "2026-01-02T10:00:01.250+00:00",
     "ended_at": "...", "language": "en"}
    {"turn": 2, "role": "assistant", "text": "...", "started_at": "...", "ended_at": "...", "interrupted": false}

User times: the turn detection's start and end of the caller's turn; assistant times: the
reply's generation (its audio plays in real time from about `started_at`). With
`transcripts_dir` each call's file, `DIR/<call id>.jsonl` (the Twilio CallSid, or the
browser session's id, reduced to [A-Za-z0-9_-]; never overwritten: `-2`, `-3`, ... instead),
is written when the call ends, off the event loop, mode 0600: a first line with the call
(`{"call_id", "server", "started_at", "ended_at", "turns", "dropped_turns", "clipped_turns"}`,
no phone numbers), then its turns.

Transcripts are personal data: nothing of them is logged or shown in /health or /metrics.
A call keeps at most MAX_TURNS turns and MAX_CHARS characters of text (each turn at most
MAX_TURN_CHARS); past that turns are dropped and counted.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from loguru import logger
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    TranscriptionFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from chroma_agent.serving.log_safety import carrier_ids_logged
from chroma_agent.serving.private_dir import prepare_private_dir

MAX_TURNS = 1000           # per call: ~8 hours of one turn each way a minute
MAX_CHARS = 500_000        # per call, all turns' text
MAX_TURN_CHARS = 20_000    # one turn (a reply is at most a few hundred words)
FILE_NAME_CHARS = 64       # a CallSid is 34


def iso_time(seconds: float | None) -> str | None:
    """Wall-clock seconds as ISO 8601 in UTC, to the millisecond."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class TranscriptTurn:
    """One turn of a call: `turn` (1, 2, ... in call order), `role` ("user" or
    "assistant"), `text`, `started_at`/`ended_at` (wall-clock seconds; ISO 8601 in
    `as_dict`), `language` (user turns: the transcript's), `interrupted` (assistant
    turns: cut before it was fully generated; `text` is what was), `clipped` (text cut at
    MAX_TURN_CHARS)."""

    turn: int
    role: str
    text: str
    started_at: float
    ended_at: float | None = None
    language: str | None = None
    interrupted: bool = False
    clipped: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The turn's JSON object (a line of the call's file)."""
        d = {"turn": self.turn, "role": self.role, "text": self.text,
             "started_at": iso_time(self.started_at), "ended_at": iso_time(self.ended_at)}
        if self.role == "user":
            d["language"] = self.language
        else:
            d["interrupted"] = self.interrupted
        if self.clipped:
            d["clipped"] = True
        return d


@dataclass
class CallTranscript:
    """The transcript of one call: `call_id`, `server` ("phone", "web"), `started_at`,
    `ended_at` (wall-clock seconds), `turns` in call order; `dropped_turns`: turns left out
    past MAX_TURNS or MAX_CHARS; `clipped_turns`: turns whose text was cut."""

    call_id: str
    server: str
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    turns: list[TranscriptTurn] = field(default_factory=list, repr=False)
    dropped_turns: int = 0
    clipped_turns: int = 0
    chars: int = 0

    def add(self, role: str, text: str, started_at: float, ended_at: float | None = None,
            **extra) -> TranscriptTurn | None:
        """Record a turn; None when the call's limits leave it out (counted)."""
        clipped = len(text) > MAX_TURN_CHARS
        text = text[:MAX_TURN_CHARS]
        if len(self.turns) >= MAX_TURNS or self.chars + len(text) > MAX_CHARS:
            self.dropped_turns += 1
            return None
        self.chars += len(text)
        self.clipped_turns += clipped
        turn = TranscriptTurn(len(self.turns) + 1, role, text, started_at, ended_at, clipped=clipped, **extra)
        self.turns.append(turn)
        return turn

    def header(self) -> dict[str, Any]:
        """The file's first line: the call, no text."""
        return {"call_id": self.call_id, "server": self.server, "started_at": iso_time(self.started_at),
                "ended_at": iso_time(self.ended_at), "turns": len(self.turns),
                "dropped_turns": self.dropped_turns, "clipped_turns": self.clipped_turns}

    def jsonl(self) -> str:
        """The call's file: the header line, then one line per turn."""
        lines = [self.header(), *(t.as_dict() for t in self.turns)]
        return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)


@dataclass
class _Reply:
    started_at: float
    interruptible: bool
    user: tuple[float, float | None] | None   # the caller's turn it answers: (started, ended)
    text: list[str] = field(default_factory=list)
    chars: int = 0
    interrupted: bool = False


class TranscriptRecorder(FrameProcessor):
    """Records a call's turns from the frames `ChromaSpeechToSpeechService` pushes
    downstream; place it right after the service. It handles each frame as it is pushed
    (direct mode: no queue, so an interruption drops nothing it should see) and passes
    every frame on unchanged. `on_turn(turn)` is called with each turn as it is final;
    `finish()` closes the transcript at the call's end."""

    def __init__(self, transcript: CallTranscript, on_turn: Callable[[TranscriptTurn], None] | None = None,
                 **kwargs):
        super().__init__(enable_direct_mode=True, **kwargs)
        self.transcript = transcript
        self._on_turn = on_turn
        self._user: list[float | None] | None = None      # the caller's latest turn, not answered yet: [start, end]
        self._reply: _Reply | None = None
        self._answered: tuple[float, float | None] | None = None   # the last reply's user turn, until transcribed

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        """Record what a downstream frame adds to the transcript, then pass it on."""
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self._record(frame)
        await self.push_frame(frame, direction)

    def _record(self, frame: Frame) -> None:
        now = time.time()
        if isinstance(frame, UserStartedSpeakingFrame):
            self._user = [now, None]
        elif isinstance(frame, UserStoppedSpeakingFrame):
            if self._user is not None and self._user[1] is None:
                self._user[1] = now
        elif isinstance(frame, LLMFullResponseStartFrame):
            self._end_reply(now)
            user = tuple(self._user) if self._user is not None else None
            self._user = None
            self._reply = _Reply(now, frame.interruptible, user)
            self._answered = user
        elif isinstance(frame, TTSTextFrame):
            reply = self._reply
            if reply is not None and reply.chars <= MAX_TURN_CHARS:
                reply.text.append(frame.text)
                reply.chars += len(frame.text)
        elif isinstance(frame, TranscriptionFrame):
            self._user_turn(frame, now)
        elif isinstance(frame, InterruptionFrame):
            if self._reply is not None and self._reply.interruptible:
                self._reply.interrupted = True
        elif isinstance(frame, LLMFullResponseEndFrame):
            self._end_reply(now)
        elif isinstance(frame, (EndFrame, CancelFrame)):   # a reply still open never ended: it was cut
            self._end_reply(now, interrupted=True)

    def _user_turn(self, frame: TranscriptionFrame, now: float) -> None:
        if not frame.text.strip():
            return
        # the transcript comes while the reply to its turn plays: the turn's times are the ones that reply took
        started, ended = self._answered or (tuple(self._user) if self._user else (now, now))
        self._answered = None
        language = getattr(frame.language, "value", frame.language)
        self._add("user", frame.text, started, ended, language=str(language) if language else None)

    def _end_reply(self, now: float, interrupted: bool = False) -> None:
        reply, self._reply = self._reply, None
        if reply is None:
            return
        text = "".join(reply.text)
        if text:   # a reply that said nothing (no turn to answer, cut before its first word) is no turn
            self._add("assistant", text, reply.started_at, now, interrupted=reply.interrupted or interrupted)

    def _add(self, role: str, text: str, started: float, ended: float | None, **extra) -> None:
        turn = self.transcript.add(role, text, started, ended, **extra)
        if turn is not None and self._on_turn is not None:
            try:
                self._on_turn(turn)
            except Exception as e:   # the hook's failure is not the call's; its message may quote the text
                logger.error(f"{self}: the transcript hook failed ({type(e).__name__}); the call goes on")

    def finish(self) -> CallTranscript:
        """The call ended: a reply still open is recorded (interrupted), the end time set."""
        self._end_reply(time.time(), interrupted=True)
        if self.transcript.ended_at is None:
            self.transcript.ended_at = time.time()
        return self.transcript


# -- files --------------------------------------------------------------------------------

def prepare_transcripts_dir(directory: str | os.PathLike | None) -> Path | None:
    """The transcripts folder, made (0700) if missing and checked writable now, so that a
    server fails at start, not at its first call's end (ValueError naming the problem);
    None: no folder."""
    if directory is None:
        return None
    return prepare_private_dir(directory, "--transcripts", "transcripts")


def transcript_file_name(call_id: str) -> str:
    """A call id as a file name: only [A-Za-z0-9_-] (so never a path), at most
    FILE_NAME_CHARS; the id comes from the client."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(call_id))[:FILE_NAME_CHARS] or "call"


def write_transcript(directory: Path, transcript: CallTranscript) -> Path:
    """Write the call's JSON Lines file in `directory` (blocking: run it in a thread):
    a new file, mode 0600, never an existing one nor through a symlink."""
    data = transcript.jsonl().encode("utf-8")
    stem = transcript_file_name(transcript.call_id)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    for n in range(1, 1000):
        path = directory / (f"{stem}.jsonl" if n == 1 else f"{stem}-{n}.jsonl")
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path
    raise FileExistsError(f"{stem}.jsonl and 998 more of that name exist in {directory}")


# -- the servers' side ----------------------------------------------------------------------

class CallTranscripts:
    """The transcript hooks and files of a server (a mixin of PhoneServer and WebServer).

    Override `on_transcript(call, turn)` (each turn as it is final) and/or
    `on_call_transcript(call, transcript)` (the whole call when it ends); `call` is the
    server's own record of the call (PhoneServer: its `CallRecord`, with `call_sid`;
    WebServer: its `WebSession`, with `pc_id`). With `transcripts_dir` each call's file
    is written too. A call is recorded only when something takes its transcript."""

    transcript_server = "call"          # the header's "server"
    transcripts_dir: Path | None = None

    def init_transcripts(self, transcripts_dir: str | os.PathLike | None, server: str) -> None:
        """Set the transcripts folder (None: no files), made and checked now (ValueError),
        and the server's kind ("phone", "web")."""
        self.transcripts_dir = prepare_transcripts_dir(transcripts_dir)
        self.transcript_server = server

    @property
    def records_transcripts(self) -> bool:
        """A folder is set, or a subclass takes the transcripts."""
        cls = type(self)
        return (self.transcripts_dir is not None or cls.on_transcript is not CallTranscripts.on_transcript
                or cls.on_call_transcript is not CallTranscripts.on_call_transcript)

    def on_transcript(self, call, turn: TranscriptTurn) -> None:
        """Each turn of a call as it is final (after the turn's reply began, for the
        caller's). Runs on the event loop, in the call's pipeline: keep it quick (hand slow
        work to a task or a queue). An exception is logged (its type only) and ignored."""

    async def on_call_transcript(self, call, transcript: CallTranscript) -> None:
        """The call's whole transcript, when the call has ended (after its file is
        written). The call's slot is held until this returns: keep it short."""

    def transcript_recorder(self, call, call_id: str) -> TranscriptRecorder | None:
        """A call's recorder for `voice_pipeline`, or None when nothing takes transcripts."""
        if not self.records_transcripts:
            return None
        return TranscriptRecorder(CallTranscript(str(call_id), self.transcript_server),
                                  on_turn=lambda turn: self.on_transcript(call, turn))

    async def end_transcript(self, call, recorder: TranscriptRecorder | None) -> None:
        """The call ended: its file written (in a thread), then `on_call_transcript`.
        Never raises: a failure is logged without the transcript."""
        if recorder is None:
            return
        transcript = recorder.finish()
        if self.transcripts_dir is not None:
            try:
                path = await asyncio.to_thread(write_transcript, self.transcripts_dir, transcript)
                # a phone call by its own id: the file is named by the carrier's, logged only when asked
                label = getattr(call, "label", None)
                shown = path if label is None or carrier_ids_logged() else path.parent
                logger.info(f"transcript of {self.transcript_server} call {label or path.stem}: {shown}")
            except Exception as e:
                logger.error(f"the transcript of a call could not be written to {self.transcripts_dir}: "
                             f"{type(e).__name__}: {getattr(e, 'strerror', None) or ''}")
        try:
            await self.on_call_transcript(call, transcript)
        except Exception as e:   # its message may quote the text
            logger.error(f"on_call_transcript failed ({type(e).__name__})")
