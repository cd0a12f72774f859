"""One Realtime websocket (`Session`): the protocol's state machine over one voice session
(its engine conversation, input audio, replies and truncations), the client's events
dispatched through `HANDLERS`."""
from __future__ import annotations

import asyncio
import json
import logging
import time

import numpy as np

from ..runtime.transcription import language_name
from ..runtime.vad import VAD_RATE
from . import realtime_protocol as rp
from .log_safety import printable
from .metrics import metrics_of
from .realtime_audio import InputAudio
from .realtime_limits import tokenizer_of, tokens_within
from .realtime_protocol import ProtocolError, event, field_of
from .realtime_reply import Reply, stream_reply
from .realtime_responses import out_of_band_input
from .realtime_session_bounds import LIMIT_CODE, AudioPace, Items, SessionClock, SessionTimeout, check_pending
from .realtime_tracing import admission, end_turn, start_turn
from .realtime_transcripts import InputTranscripts
from .tracing import NO_TRACE
from .voice_session import VoiceSession, close_conversation, speech_of

log = logging.getLogger(__name__)

MIN_COMMIT_MS = 100          # what the real API requires of a commit
PARSE_INLINE_BYTES = 64 * 1024   # a 100 ms append is ~6 KB; bigger messages are parsed in a thread
BAD_EVENTS_LOGGED = 5        # per session; the rest are counted in its closing log line


# -- one websocket -----------------------------------------------------------------------

class Session:
    """One client connection: the protocol's state machine over one voice session."""

    def __init__(self, server, websocket, client: str):   # server: the RealtimeServer
        self.server, self.ws, self.client = server, websocket, client
        self.metrics = metrics_of(server)                        # its turns, frames, refused events
        self.started = time.time()
        self.replies = 0
        self.config = rp.SessionConfig(instructions=server.system_prompt or "", voice=server.voices.default_name)
        self.input = InputAudio(server.limits)
        # no fallback prompt: instructions are measured when set, and a refusal fails the reply
        self.voice_session = VoiceSession(server.engine, load_voice=lambda name: server.voices.get(name)[1],
                                          keep_fitting_prompt=False, input=self.input)
        self.items = Items(server.limits)                        # conversation items by id, in order
        self.pending: list[tuple[str, list[np.ndarray], str]] = []  # user input not yet answered
        self.pending_tokens: dict[str, int] = {}                 # the text tokens of each pending item
        self.pace, self.clock = AudioPace(server.limits), SessionClock(server.limits)
        self.config.expires_at = self.clock.expires_at
        self.tokenizer = tokenizer_of(server.engine)
        self.active: Reply | None = None
        self.last: Reply | None = None
        self.turns = self.voice_session.turns                    # replies and truncations, in order
        self.tasks: set[asyncio.Task] = set()
        self._send_lock = asyncio.Lock()
        self.closed = False
        self.bad_events = 0
        self._warned_voices: set[str] = set()
        self._speech_item: str | None = None
        self.transcripts = InputTranscripts(self)                # the committed user audio's transcripts
        self.call = NO_TRACE                                     # its trace: realtime_server.handle starts it
        self.made_for: tuple | None = None                       # (voice, prompt) of its engine conversation

    @property
    def conv(self):
        """The session's engine conversation (None before the first reply)."""
        return self.voice_session.conv

    # -- plumbing --
    async def send(self, ev: dict) -> None:
        if self.closed:
            return
        async with self._send_lock:
            try:
                await self.ws.send_text(json.dumps(ev))
            except Exception:  # the client went away; the receive loop ends the session
                self.closed = True

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # a bug: this session's alone
            log.error("session %s: task failed", self.config.id, exc_info=task.exception())

    async def run(self) -> None:
        """Serve the websocket until the client leaves (or the server closes it)."""
        await self.send(event("session.created", session=self.config.as_dict()))
        while not self.closed:
            try:
                message = await self.clock.receive(self.ws.receive, lambda: self.active is not None)
            except SessionTimeout as e:
                log.info("session %s: ended: %s", self.config.id, e.message)
                await self.send(rp.error_event(ProtocolError(e.message, code=e.code)))
                break
            if message["type"] == "websocket.disconnect":
                break
            data = message.get("text") if message.get("text") is not None else message.get("bytes")
            try:
                data = data if data is not None else b""
                # a big message (a long append, up to the size limit) is parsed off the loop
                ev = rp.parse_event(data) if len(data) < PARSE_INLINE_BYTES else \
                    await asyncio.to_thread(rp.parse_event, data)
                if log.isEnabledFor(logging.DEBUG) and ev["type"] != "input_audio_buffer.append":
                    log.debug("session %s <- %s", self.config.id, json.dumps(ev)[:300])
                handler = HANDLERS.get(ev["type"])
                if handler is None:
                    raise ProtocolError(f"unknown event type {ev['type'][:80]!r}", code="invalid_event",
                                        param="type", event_id=ev.get("event_id"))
                await handler(self, ev)
            except ProtocolError as e:
                self.bad_events += 1
                self.metrics.invalid_message(e.code or e.type)
                if self.bad_events <= BAD_EVENTS_LOGGED:
                    log.info("session %s: refused an event: %s", self.config.id, printable(e.message, 200))
                await self.send(rp.error_event(e))
            except Exception as e:  # our bug on this one event: report it, keep the session
                log.exception("session %s: event failed", self.config.id)
                await self.send(rp.error_event(ProtocolError(f"the server failed on this event: {e}",
                                                             code=None, type="server_error")))

    async def close(self) -> None:
        """End the session: the running reply stops, the engine slot is freed at once."""
        self.closed = True
        self.clock.stop()
        self.transcripts.close()
        if self.active is not None:
            self.active.cancel(self.active.cancel_reason or "client_cancelled")
        self.voice_session.close()  # cancels its reply and frees its engine slot; cheap, does not wait
        if self.tasks:
            _, pending = await asyncio.wait(list(self.tasks), timeout=5.0)
            for task in pending:
                task.cancel()
        if self.bad_events > BAD_EVENTS_LOGGED:
            log.info("session %s: %d refused events in all", self.config.id, self.bad_events)

    # -- session --
    async def session_update(self, ev: dict) -> None:
        old = self.config
        new = old.updated(field_of(ev, "session", dict, required=True))
        if new.instructions != old.instructions:  # measured before anything changes
            await tokens_within(self.tokenizer, new.instructions, self.server.limits.max_instructions_tokens,
                                "session.instructions", "session.instructions", ev.get("event_id"))
        self.config = new
        words = new.transcription  # committed audio is transcribed from now on (None: not)
        self.voice_session.transcribe = words is not None
        self.voice_session.language = language_name(words and words["language"])
        if self.config.turn_detection != old.turn_detection:
            self.input.reset_vad()
        if self.config.voice != old.voice and not self.server.voices.known(self.config.voice):
            self._warn_voice(self.config.voice)
        await self.send(event("session.updated", session=self.config.as_dict()))

    def _warn_voice(self, name: str) -> None:
        if name not in self._warned_voices:
            self._warned_voices.add(name)
            log.warning("session %s: unknown voice '%s'; using %r (voices: %s)", self.config.id, printable(name, 80),
                        self.server.voices.default_name, ", ".join(self.server.voices.names))

    # -- input audio --
    async def append(self, ev: dict) -> None:
        data = rp.decode_base64(ev.get("audio"), "audio", ev.get("event_id"))
        fmt = self.config.input_format
        rate = rp.FORMAT_RATES[fmt["type"]]
        width = 2 if fmt["type"] == "audio/pcm" else 1
        if len(data) % width:
            raise ProtocolError("pcm16 audio must be a whole number of 2-byte samples", param="audio",
                                event_id=ev.get("event_id"))
        if len(data) / width / rate > self.server.limits.max_append_s:
            raise ProtocolError(f"one append carries at most {self.server.limits.max_append_s:g} s of audio; "
                                "send it in smaller pieces", param="audio", event_id=ev.get("event_id"))
        if not data:
            return
        self.pace.take(len(data) / width / rate, ev.get("event_id"))
        was_overflowed = self.input.overflowed
        found = await self.input.append(rp.decode_audio(data, fmt), rate, self.config.turn_detection)
        if self.input.overflowed and not was_overflowed:
            log.warning("session %s: the user turn passed %g s; keeping its latest part", self.config.id,
                        self.server.limits.max_turn_s)
        for kind, at, audio in found:
            if kind == "start":
                await self._speech_started(at)
            else:
                await self._speech_stopped(at, audio)

    async def _speech_started(self, at: int) -> None:
        self._speech_item = rp.new_id("item")
        log.debug("session %s: speech started at %d ms (reply active: %s)", self.config.id, at // 16,
                  self.active is not None)
        await self.send(event("input_audio_buffer.speech_started", audio_start_ms=at * 1000 // VAD_RATE,
                              item_id=self._speech_item))
        td = self.config.turn_detection or {}
        if td.get("interrupt_response", True) and self.active is not None and self.active.cancel_reason is None:
            self.active.cancel("turn_detected")

    async def _speech_stopped(self, at: int, audio: np.ndarray) -> None:
        item_id = self._speech_item or rp.new_id("item")
        self._speech_item = None
        await self.send(event("input_audio_buffer.speech_stopped", audio_end_ms=at * 1000 // VAD_RATE,
                              item_id=item_id))
        await self._commit(audio, item_id, cut=True)
        if (self.config.turn_detection or {}).get("create_response", True):
            if self.active is None or self.active.cancel_reason is not None:
                # its time to first audio counts from now; end of speech -> first audio from the last speech's arrival
                self._respond(Reply(max_frames=self._max_frames(self.config.max_output_tokens),
                                    speech_ended_at=self.input.arrived(at)))

    async def commit(self, ev: dict) -> None:
        if self.input.ms < MIN_COMMIT_MS:
            raise ProtocolError(f"buffer too small. Expected at least {MIN_COMMIT_MS}ms of audio, but buffer "
                                f"only has {self.input.ms}ms of audio.", code="input_audio_buffer_commit_empty",
                                event_id=ev.get("event_id"))
        check_pending(self.server.limits, self.pending, self.input.size * 4, None, ev.get("event_id"))  # float32
        await self._commit(self.input.take(), rp.new_id("item"))

    async def _commit(self, audio: np.ndarray, item_id: str, *, cut: bool = False) -> None:
        """A user audio item from the input buffer. `cut`: the server's VAD has already cut it
        to the turn's speech; else (a client's commit) its leading and trailing silence is
        trimmed here, once (Silero over the whole turn: not again when the reply starts)."""
        if not cut:
            audio = await asyncio.to_thread(speech_of, audio, VAD_RATE)
        else:  # the server's VAD made this turn: over a pending cap it is dropped, with an error event
            try:
                check_pending(self.server.limits, self.pending, audio.nbytes, None)
            except ProtocolError as e:
                log.info("session %s: dropped a turn: %s", self.config.id, e.message)
                return await self.send(rp.error_event(e))
        previous = self.items.last()
        self.pending.append((item_id, [audio], ""))
        await self.send(event("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id))
        await self._add_item(rp.user_audio_item(item_id), previous)
        self.transcripts.committed(item_id)

    async def clear(self, ev: dict) -> None:
        self.input.clear()
        await self.send(event("input_audio_buffer.cleared"))

    # -- items --
    async def _add_item(self, item: dict, previous: str | None) -> None:
        self.items.put(item)
        await self.send(event("conversation.item.added", previous_item_id=previous, item=item))
        await self.send(event("conversation.item.done", previous_item_id=previous, item=item))

    def _item(self, ev: dict, code: str) -> dict:
        item_id = field_of(ev, "item_id", str, required=True)
        if item_id not in self.items:
            raise ProtocolError(f"Item with item_id not found: {item_id[:80]}", code=code, param="item_id",
                                event_id=ev.get("event_id"))
        return self.items[item_id]

    async def item_create(self, ev: dict) -> None:
        item, given = rp.parse_item(ev.get("item"), self.config.input_format)
        limits, eid = self.server.limits, ev.get("event_id")
        if item["id"] in self.items:
            raise ProtocolError(f"an item with id {item['id']!r} already exists", code="item_already_exists",
                                param="item.id", event_id=eid)
        self.items.check(item, eid)
        texts = [(f"item.content[{i}].text", p["text"]) for i, p in enumerate(item.get("content") or [])
                 if isinstance(p, dict) and p.get("type") in ("input_text", "text", "output_text") and p["text"]]
        if given is not None and item["role"] == "system":
            await tokens_within(self.tokenizer, given.text, limits.max_instructions_tokens, (texts or [("",)])[0][0],
                                "a system message (the session instructions)", eid)
            self.config.instructions = given.text  # a system message sets the prompt (from the next reply)
        elif given is not None:
            tokens = sum([await tokens_within(self.tokenizer, text, limits.max_text_item_tokens, param, param, eid)
                          for param, text in texts])
            waiting = sum(self.pending_tokens.get(p[0], 0) for p in self.pending)
            if waiting + tokens > limits.max_pending_text_tokens:
                raise ProtocolError(f"the text waiting for a reply may be at most {limits.max_pending_text_tokens} "
                                    f"tokens ({waiting} waiting, this item {tokens}); send response.create first",
                                    code=LIMIT_CODE, param="item.content", event_id=eid)
            audio = []
            if given.audio:
                fmt = self.config.input_format
                expected = len(given.audio) * (4 / 3 if fmt["type"] == "audio/pcm" else 8)  # as float32 at 16 kHz
                check_pending(limits, self.pending, int(expected), "item.content", eid)
                pcm = rp.decode_audio(given.audio, fmt)
                audio = [await asyncio.to_thread(speech_of, pcm, rp.FORMAT_RATES[fmt["type"]])]
            check_pending(limits, self.pending, sum(a.nbytes for a in audio) + len(given.text), "item.content", eid)
            self.pending.append((item["id"], audio, given.text))
            self.pending_tokens[item["id"]] = tokens
        previous = ev.get("previous_item_id")
        previous = previous if isinstance(previous, str) and previous in self.items else self.items.last()
        await self._add_item(item, previous)

    async def item_delete(self, ev: dict) -> None:
        item = self._item(ev, "item_delete_invalid_item_id")
        self.items.pop(item["id"])
        self.pending = [p for p in self.pending if p[0] != item["id"]]
        self.pending_tokens.pop(item["id"], None)
        self.transcripts.forget(item["id"])
        last = self.last
        if last is not None and last.item_id == item["id"]:  # the caller heard none of it
            self.spawn(self._truncate(last, 0))
        await self.send(event("conversation.item.deleted", item_id=item["id"]))

    async def item_retrieve(self, ev: dict) -> None:
        item = self._item(ev, "item_retrieve_invalid_item_id")
        await self.send(event("conversation.item.retrieved", item=item))

    async def item_truncate(self, ev: dict) -> None:
        item = self._item(ev, "item_truncate_invalid_item_id")
        end_ms = field_of(ev, "audio_end_ms", int, required=True)
        index = field_of(ev, "content_index", int, default=0)
        if item.get("role") != "assistant" or end_ms < 0:
            raise ProtocolError("only an assistant message's audio can be truncated, at audio_end_ms >= 0",
                                param="item_id" if end_ms >= 0 else "audio_end_ms", event_id=ev.get("event_id"))
        reply = self.last if self.last is not None and self.last.item_id == item["id"] else None
        end_ms = min(end_ms, reply.audio_ms) if reply is not None else end_ms  # clamped to the audio sent
        if reply is not None:
            self.spawn(self._truncate(reply, end_ms))
        await self.send(event("conversation.item.truncated", item_id=item["id"], content_index=index,
                              audio_end_ms=end_ms))

    async def _truncate(self, reply: Reply, end_ms: int) -> None:
        """History keeps what the caller heard; after the reply has drained (turn order)."""
        if reply.voice_reply is None:
            return
        try:
            await self.voice_session.truncate(reply.voice_reply, end_ms)
        except RuntimeError as e:
            log.warning("session %s: truncate failed: %s", self.config.id, e)

    # -- responses --
    async def response_create(self, ev: dict) -> None:
        params = ev.get("response")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ProtocolError("'response' must be an object", code="invalid_type", param="response",
                                event_id=ev.get("event_id"))
        eid, limits = ev.get("event_id"), self.server.limits
        instructions = field_of(params, "instructions", str, default="", path="response.instructions") or ""
        metadata = params.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise ProtocolError("response.metadata must be an object", code="invalid_type",
                                param="response.metadata", event_id=ev.get("event_id"))
        if self.active is not None and self.active.cancel_reason is None:  # a cancelled one is draining: queue after it
            raise ProtocolError(f"Conversation already has an active response in progress: {self.active.id}. "
                                "Wait until the response is finished before creating a new one.",
                                code="conversation_already_has_active_response", event_id=ev.get("event_id"))
        cap = params.get("max_output_tokens", self.config.max_output_tokens)
        if cap != "inf" and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ProtocolError("response.max_output_tokens must be a positive integer or 'inf'",
                                param="response.max_output_tokens", event_id=ev.get("event_id"))
        if params.get("conversation") not in (None, "auto", "none"):
            raise ProtocolError("response.conversation must be 'auto' or 'none'", param="response.conversation",
                                event_id=eid)
        session = self.config.instructions
        extra = instructions[len(session):].strip() if session and instructions.startswith(session) else instructions
        tokens = await tokens_within(self.tokenizer, extra.strip(), limits.max_response_instructions_tokens,
                                     "response.instructions", "response.instructions", eid)
        oob = params.get("conversation") == "none"
        given = await out_of_band_input(params.get("input"), self.pending, self.tokenizer, limits,
                                        self.config.input_format, eid) if oob else None
        waiting = given[2] if given is not None else sum(self.pending_tokens.get(p[0], 0) for p in self.pending)
        if waiting + tokens > limits.max_pending_text_tokens:  # what one respond() gets must fit the history
            raise ProtocolError(f"a reply's text may be at most {limits.max_pending_text_tokens} tokens: its input "
                                f"has {waiting}, these instructions {tokens}", code=LIMIT_CODE,
                                param="response.instructions", event_id=eid)
        self._respond(Reply(metadata=metadata, extra=extra.strip(), max_frames=self._max_frames(cap),
                            out_of_band=oob, given=given[:2] if given is not None else None))

    def _max_frames(self, cap: int | str) -> int:
        """A reply's length cap in frames: the server's, or the client's max_output_tokens
        (an audio token per 80 ms frame) when smaller."""
        return self.server.max_frames if cap == "inf" else min(cap, self.server.max_frames)

    async def response_cancel(self, ev: dict) -> None:
        wanted = field_of(ev, "response_id", str)
        active = self.active
        if active is None or (wanted is not None and wanted != active.id):
            raise ProtocolError("Cancellation failed: no active response found", code="response_cancel_not_active",
                                event_id=ev.get("event_id"))
        if active.cancel_reason is None:  # a second cancel of a draining reply says nothing
            active.cancel("client_cancelled")

    def _respond(self, reply: Reply) -> None:
        self.active = reply
        reply.task = self.spawn(self._run_reply(reply))

    async def _conversation(self, side: bool = False):
        """The engine conversation, anew when the voice or the instructions changed (the
        model's prompt is fixed per conversation: a change starts a fresh context); `side`:
        an out-of-band reply's own short-lived one (see realtime_responses)."""
        key = self.config.voice, self.config.instructions or ""  # "": no prompt
        session, before = self.voice_session, self.voice_session.conv
        session.voice, session.system_prompt = key
        if not side and key[0] not in self._warned_voices and not self.server.voices.known(key[0]):
            self._warn_voice(self.config.voice)
        try:   # an admission span only where a conversation is made (the session's own is reused)
            with admission(self.call, self.server.engine, side or before is None or key != self.made_for,
                           side=side or None):
                conv = await (session.side_conversation() if side else session.conversation())
        finally:
            if session.conv is not before:
                self.last = None  # the old conversation's reply can no longer be truncated
        self.made_for = self.made_for if side else key
        return conv

    def pending_input(self, take: bool) -> tuple[list[np.ndarray], str, list[tuple[str, np.ndarray]]]:
        """The pending user input's audio pieces, joined text, and (item id, audio) of each
        item with audio; `take`: it is answered now."""
        taken = self.pending
        if take:
            self.pending, self.pending_tokens = [], {}
        audio = [a for _, chunks, _ in taken for a in chunks]
        items = [(item_id, np.concatenate(chunks)) for item_id, chunks, _ in taken if chunks]
        return audio, "\n".join(t for _, _, t in taken if t), items

    async def transcript_conversation(self):
        """The conversation a transcript outside any reply runs on: the session's, made now
        (in turn with the replies) when there is none yet."""
        conv = self.conv
        if conv is None:
            async with self.turns:
                conv = self.conv or await self._conversation()
        return conv

    async def _run_reply(self, reply: Reply) -> None:
        cfg = self.config
        status, details, output, counts = "failed", None, [], (0, 0, 0)
        conversation_id = None if reply.out_of_band else "conv_default"
        await self.send(event("response.created", response=rp.response_object(
            reply.id, "in_progress", metadata=reply.metadata, config=cfg, conversation_id=conversation_id)))
        try:
            start_turn(self.call, reply)   # its span starts at the end of speech, or the ask
            async with self.turns:
                status, details, output, counts = await self._speak(reply, cfg)
        except Exception as e:
            log.exception("session %s: reply %s failed", cfg.id, reply.id)
            details = {"type": "failed", "error": {"type": "server_error", "message": str(e)}}
        finally:
            reply.finished = True
            self.replies += 1
            self.metrics.turn(status)
            end_turn(reply, status, details, counts)   # before any await: a cancelled task still ends it
            if self.active is reply:
                self.active = None
            self.clock.touch()  # the idle time counts from a reply's end
            await self.send(event("response.done", response=rp.response_object(
                reply.id, status, output=output, metadata=reply.metadata, status_details=details,
                usage=rp.usage(*counts), config=cfg, conversation_id=conversation_id)))

    async def _speak(self, reply: Reply, cfg: rp.SessionConfig):
        """The reply's output events; (status, status_details, output, usage counts)."""
        if reply.cancel_reason is not None:
            return "cancelled", {"type": "cancelled", "reason": reply.cancel_reason}, [], (0, 0, 0)
        closed = "cancelled", {"type": "cancelled", "reason": "client_cancelled"}, [], (0, 0, 0)
        if self.closed:
            return closed
        try:
            conv = await self._conversation(side=reply.out_of_band)
        except ValueError as e:  # e.g. conversation.PromptTooLong: the instructions cannot fit the history
            return "failed", {"type": "failed", "error": {"type": "invalid_request_error", "message": str(e)}}, \
                [], (0, 0, 0)
        except RuntimeError:
            if self.closed:  # the voice session closed while its conversation was made (and closed it)
                return closed
            raise
        try:
            if self.closed:
                return closed
            return await stream_reply(self, reply, cfg, self.voice_session.reply(conv))
        finally:
            if reply.out_of_band:
                close_conversation(conv)  # frees its slot; cheap, does not wait

async def _ignore(session: Session, ev: dict) -> None:
    """Accepted and not needed here (e.g. output_audio_buffer.clear: we keep no output buffer)."""


HANDLERS = {
    "session.update": Session.session_update,
    "input_audio_buffer.append": Session.append,
    "input_audio_buffer.commit": Session.commit,
    "input_audio_buffer.clear": Session.clear,
    "conversation.item.create": Session.item_create,
    "conversation.item.delete": Session.item_delete,
    "conversation.item.retrieve": Session.item_retrieve,
    "conversation.item.truncate": Session.item_truncate,
    "response.create": Session.response_create,
    "response.cancel": Session.response_cancel,
    "output_audio_buffer.clear": _ignore,
}
