"""Chroma as a LiveKit realtime model: the caller's audio in, the reply in a cloned voice out.

`AgentSession` drives the turns (its VAD and turn detector decide when the caller is done,
then call `commit_audio()` and `generate_reply()`); each session holds one
`chroma_agent` voice session (`chroma_agent.serving.voice_session.VoiceSession`: its
conversation, input audio, replies and truncations) and speaks each reply frame by frame
as it is decoded; this module translates LiveKit's calls, frames and events. Each answered
audio turn is transcribed by the model itself, beside its reply (transcripts.py). Model
work runs in worker threads; events and stream sends happen on the job's event loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from chroma_agent.events import AudioChunk, TextDelta, TranscriptDelta, TranscriptDone
from chroma_agent.serving.pcm import from_int16, to_int16
from chroma_agent.serving.voice_session import NothingToAnswer, VoiceReply, VoiceSession
from livekit import rtc
from livekit.agents import llm, utils
from livekit.agents.metrics import RealtimeModelMetrics
from livekit.agents.metrics.base import Metadata
from livekit.agents.types import NOT_GIVEN, NotGivenOr
from livekit.agents.utils import is_given

from .log import logger
from .metrics import plugin_metrics, reply_ended
from .models import DEFAULT_MODEL, ModelSource, UsesChroma
from .tracing import ReplyTrace, session_trace
from .transcripts import TRANSCRIPT_WAIT_S, UserTurn

_active_lock = threading.Lock()
_active = 0


def active_sessions() -> int:
    """Realtime sessions open in this process (all jobs of a worker), for a worker's load_fnc."""
    return _active


def _count(delta: int) -> None:
    global _active
    with _active_lock:
        _active += delta
    if delta > 0:   # and on the worker's Prometheus endpoint (metrics.py)
        plugin_metrics().call_started()
    else:
        plugin_metrics().call_ended("completed")


def _watch_engine(loaded: asyncio.Future) -> None:
    """An engine's load, capacity and ticks on the metrics, once the model is loaded."""
    if not loaded.cancelled() and loaded.exception() is None:
        plugin_metrics().watch_engine(loaded.result()[0])


@dataclass
class _Options:
    instructions: str | None
    temperature: float
    top_k: int
    seed: int | None
    max_frames: int
    user_transcription: bool = True
    language: str = "en"

    def sampling(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_k": self.top_k, "seed": self.seed,
                "max_frames": self.max_frames}


class RealtimeModel(UsesChroma, llm.RealtimeModel):
    """FlashLabs Chroma 1.0, in process, as a LiveKit realtime model.

        AgentSession(llm=chroma.RealtimeModel(model="FlashLabs/Chroma-4B", voice="me.voice.safetensors"))

    `model`: a hub id, a local checkpoint directory, or a loaded `ChromaModel` (or any
    object with `.conversation(voice=..., system_prompt=...)`); paths load once per process
    (see `load_model`), on the first session, never at import. `voice`: a `Voice` or a saved
    voice file. `instructions` (alias `system_prompt`): the system prompt when the Agent
    gives none; `None` keeps the model's default. `temperature`, `top_k`, `seed`: sampling
    of the audio codes; `max_frames`: the longest reply, in 80 ms frames.
    `user_transcription` (on by default): the model also writes down what the caller said
    in each answered audio turn, in `language` (an ISO-639-1 code such as "en", or a name),
    so AgentSession fires `user_input_transcribed` and keeps the user's words in
    `session.history`; the reply never waits for it.

    Turns are detected by the AgentSession (its VAD and turn detector): Chroma has no
    server-side turn detection or tools.
    """

    def __init__(self, *, model: Any = DEFAULT_MODEL, voice: Any, instructions: str | None = None,
                 system_prompt: str | None = None, temperature: float = 0.9, top_k: int = 50,
                 seed: int | None = None, max_frames: int = 375, device: str | None = None,
                 dtype: str | None = None, revision: str | None = None, user_transcription: bool = True,
                 language: str = "en") -> None:
        super().__init__(capabilities=llm.RealtimeCapabilities(
            message_truncation=True, turn_detection=False, user_transcription=user_transcription,
            auto_tool_reply_generation=False, audio_output=True, manual_function_calls=False,
            mutable_chat_context=True, mutable_instructions=True, supports_say=True))
        if instructions is not None and system_prompt is not None and instructions != system_prompt:
            raise ValueError("give instructions or system_prompt (the same thing), not both")
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self._source = ModelSource(model, voice, device=device, dtype=dtype, revision=revision)
        self._opts = _Options(instructions if instructions is not None else system_prompt,
                              temperature, top_k, seed, max_frames, user_transcription, language)

    def session(self, *, turn_detection_disabled: bool = False) -> RealtimeSession:
        return RealtimeSession(self)

    async def aclose(self) -> None:
        pass  # the loaded model is shared by the process; sessions close their own conversations


@dataclass
class _Generation:
    """One reply's streams, as LiveKit consumes them: one message with text and audio."""

    response_id: str = field(default_factory=lambda: utils.shortuuid("resp_"))
    message_id: str = field(default_factory=lambda: utils.shortuuid("item_"))
    created_at: float = field(default_factory=time.time)
    voice: VoiceReply | None = None   # the reply on the voice session
    user: UserTurn | None = None      # the audio turn it answers, whose transcript it carries
    interrupted: bool = False
    first_audio_at: float | None = None
    frames: int = 0
    asked_at: float = field(default_factory=time.time)   # the turn committed, or the reply asked for
    trace: ReplyTrace | None = None   # its span, made when LiveKit starts reading it (tracing.py)

    def __post_init__(self) -> None:
        self.message_ch = utils.aio.Chan[llm.MessageGeneration]()
        self.function_ch = utils.aio.Chan[llm.FunctionCall]()
        self.text_ch = utils.aio.Chan[str]()
        self.audio_ch = utils.aio.Chan[rtc.AudioFrame]()
        modalities: asyncio.Future[list[Literal["text", "audio"]]] = asyncio.get_running_loop().create_future()
        modalities.set_result(["audio", "text"])  # every reply is spoken, with its text
        self.message_ch.send_nowait(llm.MessageGeneration(  # one message per reply; no function calls
            message_id=self.message_id, text_stream=self.text_ch, audio_stream=self.audio_ch,
            modalities=modalities))
        self.messages = self.message_ch if self.trace is None else self.trace.messages(self.message_ch)

    @property
    def event(self) -> llm.GenerationCreatedEvent:
        return llm.GenerationCreatedEvent(message_stream=self.messages, function_stream=self.function_ch,
                                          user_initiated=True, response_id=self.response_id)

    def close(self) -> None:
        """End the reply: AgentSession takes closed message and function streams to mean the
        generation is over (until then an interruption also calls `interrupt()`)."""
        for ch in (self.text_ch, self.audio_ch, self.message_ch, self.function_ch):
            ch.close()


def _audio_frame(pcm: np.ndarray, sample_rate: int) -> rtc.AudioFrame:
    return rtc.AudioFrame(data=to_int16(pcm), sample_rate=sample_rate, num_channels=1, samples_per_channel=pcm.size)


class RealtimeSession(llm.RealtimeSession):
    """One caller's conversation with Chroma. Created by AgentSession through
    `RealtimeModel.session()`; see the module docstring for the flow.

    History follows what the caller heard: an interrupted reply is truncated to its played
    audio (`truncate`), a reply never played is dropped when the AgentSession removes it
    from the chat context. Each answered audio turn's transcript becomes its user message
    (`input_audio_transcription_completed`, interim then final). Instructions are the
    conversation's system prompt, fixed when it is created: a change (`update_instructions`)
    takes effect from the next turn by starting a fresh conversation, so the earlier turns
    are no longer in the model's context. Earlier messages in the chat context (a
    handed-over history) are not replayed into the model; new user text messages are
    answered as text turns.
    """

    def __init__(self, realtime_model: RealtimeModel) -> None:
        super().__init__(realtime_model)
        self._model = realtime_model
        self._opts = realtime_model._opts
        self._chat_ctx = llm.ChatContext.empty()
        self._chat_ctx_synced = False
        self._instructions = self._opts.instructions
        # the conversation (anew when the instructions change), the 16 kHz input, replies, truncations
        self._voice_session = VoiceSession(transcribe=self._opts.user_transcription, language=self._opts.language)
        self._committed: list[np.ndarray] = []
        self._committed_at: float | None = None  # when the pending turn was first committed
        self._transcribed: set[str] = set()      # user message ids made from transcripts, not typed
        self._pending_text: list[str] = []
        self._current: _Generation | None = None
        self._last: _Generation | None = None  # the latest reply, the one truncate() may shorten
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        # start loading now (in a thread) so the model is ready when the caller first speaks
        self._loaded = asyncio.get_running_loop().run_in_executor(None, realtime_model._source.load)
        self._loaded.add_done_callback(_watch_engine)  # a failed load: reported by the first turn
        self._trace = session_trace()  # its replies' spans go in LiveKit's turns (tracing.py)
        _count(+1)

    # -- state LiveKit reads and updates --
    @property
    def chat_ctx(self) -> llm.ChatContext:
        return self._chat_ctx.copy()

    @property
    def tools(self) -> llm.ToolContext:
        return llm.ToolContext.empty()

    async def update_instructions(self, instructions: str) -> None:
        # checked when the next turn makes the conversation: too long, an `error` event (recoverable)
        self._instructions = instructions or self._opts.instructions  # an empty Agent prompt keeps ours

    async def update_chat_ctx(self, chat_ctx: llm.ChatContext) -> None:
        known = {item.id for item in self._chat_ctx.items}
        if self._chat_ctx_synced:
            ours = known | self._transcribed  # a transcript's message may come back on a stale copy
            for msg in chat_ctx.messages():
                if msg.role == "user" and msg.id not in ours and msg.text_content:
                    self._pending_text.append(msg.text_content)
        self._chat_ctx_synced = True
        last = self._last
        if last is not None and last.message_id in known and chat_ctx.get_by_id(last.message_id) is None:
            self._after_turns(self._truncate(last, 0))  # removed unplayed: the caller heard none of it
        self._chat_ctx = chat_ctx.copy()

    async def update_tools(self, tools: list[llm.Tool]) -> None:
        if tools:
            logger.warning("Chroma has no function calling; ignoring %d tools", len(tools))

    def update_options(self, *, tool_choice: NotGivenOr[llm.ToolChoice | None] = NOT_GIVEN) -> None:
        pass

    # -- input audio --
    def push_audio(self, frame: rtc.AudioFrame) -> None:
        if not self._closed:
            self._voice_session.push(from_int16(frame.data, frame.num_channels), frame.sample_rate)

    def push_video(self, frame: rtc.VideoFrame) -> None:
        pass

    def commit_audio(self) -> None:
        """The buffered audio becomes the next user turn (its silence is trimmed when the reply starts)."""
        self._committed.append(self._voice_session.take())
        self._committed_at = self._committed_at or time.time()

    def clear_audio(self) -> None:
        self._voice_session.clear()

    # -- replies --
    def generate_reply(self, *, instructions: NotGivenOr[str] = NOT_GIVEN,
                       tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
                       tools: NotGivenOr[list[llm.Tool]] = NOT_GIVEN) -> asyncio.Future[llm.GenerationCreatedEvent]:
        """Answer the committed audio and any new user text; `instructions` join the turn as
        text (with no audio pending, the usual greeting call, it is a text turn). The turn is
        what has been committed when the reply starts: a reply given up before it starts
        (the future cancelled) leaves it to the next one."""
        return self._reply(instructions=instructions if is_given(instructions) and instructions else None)

    def say(self, text: str | AsyncIterable[str]) -> asyncio.Future[llm.GenerationCreatedEvent]:
        """Speak `text` in the cloned voice (no TTS needed); it joins the history."""
        return self._reply(line=text)

    def interrupt(self) -> None:
        """Stop the running reply: no frame after the current one is generated or sent."""
        gen = self._current
        if gen is not None:
            gen.interrupted = True
            gen.close()
            gen.voice.cancel()  # it drains to its ResponseDone: the history stays exact

    def truncate(self, *, message_id: str, modalities: list[Literal["text", "audio"]], audio_end_ms: int,
                 audio_transcript: NotGivenOr[str] = NOT_GIVEN) -> None:
        """Keep in the history what the caller heard of the last reply (`audio_end_ms` of it)."""
        last = self._last
        if last is None or last.message_id != message_id:
            logger.debug("not truncating %s: only the latest reply can be truncated", message_id)
            return
        self._after_turns(self._truncate(last, audio_end_ms))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.interrupt()
        if self._tasks:  # the running reply ends within a frame; queued ones see _closed
            _, pending = await asyncio.wait(self._tasks, timeout=10.0)
            await utils.aio.cancel_and_wait(*pending)
        await asyncio.to_thread(self._voice_session.close)  # an engine's conversation frees its slot
        _count(-1)

    # -- internals --
    def _after_turns(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _reply(self, *, instructions: str | None = None, line: str | AsyncIterable[str] | None = None
               ) -> asyncio.Future[llm.GenerationCreatedEvent]:
        """Queue a reply (generate_reply's, or say()'s `line`); it runs after the ones before it."""
        fut: asyncio.Future[llm.GenerationCreatedEvent] = asyncio.get_running_loop().create_future()
        self._after_turns(self._run_reply(fut, instructions, line, time.time()))
        return fut

    async def _conversation_for_turn(self) -> Any:
        """The conversation, created on the first turn and again after the instructions changed.
        Instructions too long for the model (`PromptTooLong`) are an error event; the session
        keeps its instructions (none yet: this turn fails), its conversation made anew."""
        session = self._voice_session
        session.model, session.voice = await asyncio.shield(self._loaded)
        session.system_prompt = self._instructions
        conversation = await session.conversation()
        if (refused := session.take_refusal()) is not None:  # not tried again: the last ones that fit stay
            self._emit_error(llm.RealtimeError(f"the new instructions were refused, the previous ones stay: {refused}"))
        return conversation

    async def _run_reply(self, fut: asyncio.Future[llm.GenerationCreatedEvent], instructions: str | None,
                         line: str | AsyncIterable[str] | None, asked_at: float) -> None:
        async with self._voice_session.turns:  # replies and truncations run one at a time, in call order
            if self._closed or fut.done():  # closed, or the caller gave up while it queued
                if not fut.done():
                    fut.set_exception(llm.RealtimeError("the session is closed"))
                return
            try:
                conv = await self._conversation_for_turn()
            except Exception as e:  # no model, or an engine at capacity: this call cannot be served
                self._emit_error(e, recoverable=False)
                fut.set_exception(llm.RealtimeError(f"no Chroma conversation for this session: {e}"))
                return
            sampling = self._opts.sampling()
            reply = self._voice_session.reply(conv)
            committed_at = None
            try:
                if line is not None:
                    if not isinstance(line, str):  # say() of streamed text
                        line = "".join([part async for part in line])
                    await reply.say(line, **sampling)
                else:  # the user turn: what was committed (and typed) by now, its silence trimmed
                    audio, typed, committed_at = self._committed, self._pending_text, self._committed_at
                    self._committed, self._pending_text, self._committed_at = [], [], None
                    text = "\n".join(typed + ([instructions] if instructions else []))
                    await reply.respond(audio, text, trim=True, **sampling)
            except NothingToAnswer as e:
                logger.debug("no reply: %s", e)
                fut.set_exception(llm.RealtimeError(str(e)))
                return
            except Exception as e:  # bad input (AudioError, empty text): this reply fails, the session goes on
                self._emit_error(e)
                fut.set_exception(llm.RealtimeError(f"Chroma could not start the reply: {e}"))
                return
            if self._closed or fut.done():  # given up meanwhile; the response never started, so
                if line is None:             # the conversation is untouched: the turn goes to the next reply
                    self._committed[:0], self._pending_text[:0] = audio, typed
                    self._committed_at = committed_at or self._committed_at
                return
            gen = _Generation(voice=reply, user=None if committed_at is None else UserTurn(committed_at),
                              asked_at=committed_at or asked_at,
                              trace=ReplyTrace(self._trace, committed_at or asked_at,
                                               "generate_reply" if line is None else "say"))
            self._current = self._last = gen
            fut.set_result(gen.event)
            self.emit("generation_created", gen.event)
            await self._stream(gen)

    async def _stream(self, gen: _Generation) -> None:
        try:
            async for event in gen.voice:  # interrupted: nothing but its ResponseDone
                if isinstance(event, AudioChunk):
                    if gen.first_audio_at is None:
                        gen.first_audio_at = time.time()
                        gen.trace.first_audio(gen.first_audio_at, gen.first_audio_at - gen.created_at)
                    gen.frames += 1
                    with contextlib.suppress(utils.aio.ChanClosed):  # the consumer closed it
                        gen.audio_ch.send_nowait(_audio_frame(event.pcm, event.sample_rate))
                elif isinstance(event, TextDelta):
                    with contextlib.suppress(utils.aio.ChanClosed):  # the consumer closed it
                        gen.text_ch.send_nowait(event.text)
                elif isinstance(event, (TranscriptDelta, TranscriptDone)) and gen.user is not None:
                    self._report(gen.user, gen.user.event(event))  # it comes even after an interruption
        except Exception as e:
            failure = e
            self._emit_error(e)
        except asyncio.CancelledError:  # the session closed past its wait: still end the span
            gen.trace.end("cancelled", frames=gen.frames, response_id=gen.response_id)
            raise
        else:
            failure = None
        finally:
            gen.close()
            self._current = None
            done = gen.voice.done
            if done is None:  # it raised: leave its history as the conversation left it
                self._last = None
            else:
                self._chat_ctx.add_message(role="assistant", content=done.text, id=gen.message_id,
                                           interrupted=gen.interrupted)
        if gen.user is not None and not gen.user.final and gen.voice.transcript is not None:
            self._after_turns(self._rest_of_transcript(gen.user, gen.voice.transcript))  # the reply raised
        if done is not None and done.stop_reason == "error":  # an engine reply that failed on its own
            self._emit_error(RuntimeError(getattr(done, "error", None) or "the reply failed"))
        input_tokens = gen.voice.input_tokens
        output_tokens = self._emit_metrics(gen, done, input_tokens, gen.voice.text_tokens)
        stop = getattr(done, "stop_reason", "error")
        status = "cancelled" if gen.interrupted or stop == "cancelled" else "failed" if stop == "error" else "completed"
        reply_ended(gen.asked_at, gen.first_audio_at, gen.frames, status)
        gen.trace.end(status, stop_reason=stop, frames=gen.frames, response_id=gen.response_id,
                      input_tokens=input_tokens, output_tokens=output_tokens,
                      reply_text=getattr(done, "text", None), caller_text=gen.user.text if gen.user else None,
                      error=str(failure) if failure is not None else getattr(done, "error", None))

    def _report(self, user: UserTurn, event: llm.InputTranscriptionCompleted | None) -> None:
        """Emit a transcript event; a final one first becomes the turn's user message here."""
        if event is None:
            return
        if event.is_final:  # known before AgentSession adds it, so update_chat_ctx never takes it as typed
            self._transcribed.add(user.item_id)
            self._chat_ctx.insert(user.message(event.transcript))
        self.emit("input_audio_transcription_completed", event)

    async def _rest_of_transcript(self, user: UserTurn, transcript: Any) -> None:
        """A transcript its failed reply stopped passing on: the rest from its handle."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(transcript.done(), TRANSCRIPT_WAIT_S)
        for event in transcript.events(user.seen):
            self._report(user, user.event(event))
        if not user.final:  # it never ended: close what streamed
            self._report(user, user.end(user.text, "it did not end"))

    async def _truncate(self, gen: _Generation, audio_end_ms: int) -> None:
        try:  # after the replies before it; only the latest reply of the current conversation
            await self._voice_session.truncate(gen.voice, audio_end_ms)
        except Exception as e:
            self._emit_error(e)

    def _emit_metrics(self, gen: _Generation, done: Any, input_tokens: int, text_tokens: int) -> int:
        """LiveKit's metrics of a reply (it puts them on its `realtime_inference` span); returns
        its output tokens."""
        duration = time.time() - gen.created_at
        output_tokens = text_tokens + gen.frames  # one audio token per 80 ms frame
        self.emit("metrics_collected", RealtimeModelMetrics(
            label=self._model.label, request_id=gen.response_id, timestamp=gen.created_at, duration=duration,
            ttft=gen.first_audio_at - gen.created_at if gen.first_audio_at else -1,
            cancelled=gen.interrupted or (done is not None and done.stop_reason == "cancelled"),
            input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=input_tokens + output_tokens,
            tokens_per_second=output_tokens / duration if duration > 0 else 0.0,
            input_token_details=RealtimeModelMetrics.InputTokenDetails(),
            output_token_details=RealtimeModelMetrics.OutputTokenDetails(text_tokens=text_tokens,
                                                                         audio_tokens=gen.frames),
            metadata=Metadata(model_name=self._model.model, model_provider=self._model.provider)))
        return output_tokens

    def _emit_error(self, error: Exception, recoverable: bool = True) -> None:
        logger.error("Chroma reply failed: %s", error, exc_info=error)
        self.emit("error", llm.RealtimeModelError(timestamp=time.time(), label=self._model.label, error=error,
                                                  recoverable=recoverable))
