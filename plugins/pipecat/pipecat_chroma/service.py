"""Chroma 1.0 as an in-process Pipecat speech-to-speech service.

    llm = ChromaSpeechToSpeechService(model=ChromaModel.from_pretrained(...), voice="me.voice.safetensors",
                                      settings=ChromaSpeechToSpeechService.Settings(system_instruction="..."))

A realtime service in Pipecat's conventions (modelled on `services/openai/realtime/llm.py`):
turns come from the local VAD and turn analyzer upstream (the user aggregator), the
service records each turn (with a pre-roll of the speech onset the VAD consumed), answers
it with `conversation.respond(...)` and pushes every 80 ms frame of the reply as it is
decoded. The call's logic (its conversation, replies, cancel and truncation) is
`chroma_agent.serving.voice_session.VoiceSession`'s; this service translates Pipecat's
frames to and from it. It codes against the conversation API only (`respond`, `say`,
`cancel`, `truncate`, optional `close`), so anything with `model.conversation(...)` can be passed.
"""
from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable

from loguru import logger
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    CancelFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    LLMContextFrame,
    LLMContextUserTurnFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMMessagesAppendFrame,
    LLMRunFrame,
    LLMServiceMetadataFrame,
    LLMTextFrame,
    SpeechControlParamsFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import LLMTokenUsage
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.llm_service import LLMService
from pipecat.utils.errors import ErrorCategory
from pipecat.utils.text.base_text_aggregator import TextType

from chroma_agent import AudioChunk, PromptTooLong, ResponseDone, TextDelta, Voice
from chroma_agent.events import TranscriptDelta, TranscriptDone
from chroma_agent.model.audio import USER_LIMITS
from chroma_agent.serving.pcm import to_int16
from chroma_agent.serving.voice_session import NothingToAnswer, VoiceReply, VoiceSession, answer_turn

from .reply_trace import ReplyTraces
from .service_conversation import ServiceConversation
from .settings import ChromaSpeechToSpeechSettings, defaults
from .transcripts import TranscriptRelay, transcript_language
from .turns import ReplyState, TurnAudio, system_texts, unanswered_user_texts

# The VAD confirms a turn `start_secs` after the speech began: keep that much, plus a margin.
PREROLL_MARGIN_SECS = 0.3
DEFAULT_PREROLL_SECS = 0.5


class ChromaSpeechToSpeechService(ServiceConversation, LLMService):
    """Chroma speech-to-speech: answers each user turn in the cloned voice, frame by frame.

    Put it after an `LLMContextAggregatorPair` user aggregator with a VAD
    (`LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer())`); it announces itself as a
    realtime service, so the pair runs in realtime mode. Frames it handles:

    - `InputAudioRawFrame` between `UserStartedSpeakingFrame` and `UserStoppedSpeakingFrame`:
      the user's turn, answered with `LLMFullResponseStartFrame`, `TTSStartedFrame`,
      `TTSAudioRawFrame`s (24 kHz, as each frame is decoded), `TTSTextFrame`s (the
      transcript, each after the audio that speaks it), `TTSStoppedFrame`,
      `LLMFullResponseEndFrame`. With `transcribe` on (the default), the caller's words
      too, after the reply's first audio: `InterimTranscriptionFrame`s and one
      `TranscriptionFrame`, downstream and upstream (`transcripts.py`); the user
      aggregator writes them to the context as the user turn, which is not answered again.
    - `InterruptionFrame`: the reply stops within one frame and the conversation keeps
      only what the caller heard (the upstream `BotStartedSpeakingFrame` dates playback).
    - `TTSSpeakFrame`: spoken in the voice with `conversation.say()`, not passed on. Its
      `interruptible` field is honoured: set to False, the line is spoken and heard in full
      through a barge-in (its frames are uninterruptible too, so the transport plays them);
      an interruptible one that arrives while the user is speaking is dropped, as the
      interruption that started that turn would have dropped it.
    - `LLMRunFrame`, a downstream `LLMContextFrame` (what the user aggregator makes of
      `LLMRunFrame` and of messages added with `run_llm=True`), `LLMMessagesAppendFrame`
      with `run_llm=True`: a text turn. The context's user messages after its last
      assistant message, not answered yet, are answered with
      `conversation.respond(text=...)`; with none there is nothing to answer (logged).
    - `LLMContextFrame` / `LLMMessagesAppendFrame`: their system messages join
      `system_instruction` as the system prompt, from the next turn. A prompt too long for
      the model (`PromptTooLong`) is a non-fatal `ErrorFrame` and the last one that fit
      stays; at the start, with none that fit, the service cannot speak (a fatal error).
      A text turn too long for it is a non-fatal `ErrorFrame` too; the next turn goes on.

    The conversation is made when the pipeline starts (in a worker thread), so the first
    turn does not wait for it, and closed when it ends (`EndFrame`, `CancelFrame`): with a
    `ChromaEngine` as the model, that frees the pipeline's engine slot. One loaded model can
    serve every pipeline in the process; model work runs in worker threads, never on the
    event loop.

    With Pipecat's tracing on (`PipelineWorker(enable_tracing=True)` and a tracer provider
    that records), each reply is a `chroma.turn` span in Pipecat's turn span and each
    conversation opened a `chroma.engine.admission` span in its conversation span
    (`reply_trace.py`).
    """

    Settings = ChromaSpeechToSpeechSettings
    _settings: Settings

    def __init__(self, *, model, voice: Voice | str | os.PathLike, settings: Settings | None = None, **kwargs):
        """Create the service.

        Args:
            model: A loaded `chroma_agent.ChromaModel`, or anything whose
                `conversation(voice=..., system_prompt=...)` returns a conversation with
                `respond`/`say`/`cancel`/`truncate` (and optionally `close`). Load it
                before building the pipeline: Pipecat gives `setup()` only seconds.
            voice: A `chroma_agent.Voice` or the path of a voice file (`Voice.save`).
            settings: Settings to override (delta mode: only the fields given).
            **kwargs: Passed to `LLMService`.
        """
        default_settings = defaults()
        if settings is not None:
            default_settings.apply_update(settings)
        super().__init__(settings=default_settings, **kwargs)
        self._model = model
        self._voice = Voice.load(voice) if isinstance(voice, (str, os.PathLike)) else voice
        # the conversation (anew when the prompt changes; a refused prompt keeps the last one that fit)
        self._voice_session = VoiceSession(model, self._voice)
        self._ended = False                        # EndFrame/CancelFrame: no conversation any more
        self._context_system: list[str] = []      # system messages from the pipeline's context
        self._messages: list = []                 # the pipeline's context messages, for text turns
        self._answered: list = []                 # the user messages already answered (by identity)
        self._heard: deque[str] = deque(maxlen=8)  # user turns the user aggregator wrote from our transcripts
        # called with each frame pushed on: the servers' per-call records (an observer costs far more)
        self.frame_watchers: list[Callable[[Frame, FrameDirection], None]] = []

        self._preroll = TurnAudio()
        self._preroll_secs = DEFAULT_PREROLL_SECS
        self._turn: TurnAudio | None = None   # recording while the user speaks
        self._turn_secs = 0.0              # of it, the audio since UserStartedSpeakingFrame
        self._turn_dropped_secs = 0.0      # oldest audio dropped past the model's limit
        self._speech_end: float | None = None   # the VAD's end of the turn's speech (time.time())
        self._traces = ReplyTraces()       # the replies' spans, where the pipeline traces

        self._reply: ReplyState | None = None
        self._reply_task: asyncio.Task | None = None
        self._turn_task: asyncio.Task | None = None   # a turn's reply waiting for an uninterruptible line

    def can_generate_metrics(self) -> bool:
        """Chroma reports TTFB, processing time and token usage."""
        return True

    def service_metadata_frame(self) -> LLMServiceMetadataFrame:
        """A realtime service whose turns come from the local VAD and turn analyzer.

        (It emits no turn frames of its own, but skips pipecat's warning about that: it
        always runs behind local turn detection, which is what the warning advises.)"""
        return LLMServiceMetadataFrame(service_name=self.name, is_realtime_service=True)

    #
    # lifecycle
    #

    async def setup(self, setup):
        """The pipeline's tracing (AIService's fields): with it, the conversation's admission is traced."""
        await super().setup(setup)
        if self._traces.setup(self._tracing_enabled, self._tracing_context):
            self._voice_session.model = self._traces.admitting(self._voice_session.model)

    async def start(self, frame: StartFrame):
        """Make the conversation now, in a worker thread: the first turn need not wait for it."""
        await super().start(frame)
        self.create_task(self._prepare_conversation(), "conversation")

    async def stop(self, frame: EndFrame):
        """Graceful end: let the running reply finish, then close the conversation."""
        await super().stop(frame)
        if self._turn_task is not None:
            await asyncio.shield(self._turn_task)  # it starts its reply once the line ends
        await self._wait_reply()
        self._end()

    async def cancel(self, frame: CancelFrame):
        """Immediate end: stop the running reply."""
        await super().cancel(frame)
        await self._drop_turn_task()
        self._cancel_reply()
        await self._wait_reply(timeout=1.0)
        self._end()

    async def cleanup(self):
        """Release the conversation (and its caches) at teardown."""
        await super().cleanup()
        await self._drop_turn_task()
        self._cancel_reply()
        await self._wait_reply(timeout=1.0)
        self._end()

    async def _drop_turn_task(self):
        if self._turn_task is not None and not self._turn_task.done():
            await self.cancel_task(self._turn_task)

    def _end(self):
        self._ended = True
        self._traces.close()
        self._voice_session.close()

    #
    # frames
    #

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        """Handle turn, audio, interruption, playback, prompt and speak frames."""
        await super().process_frame(frame, direction)

        if isinstance(frame, InputAudioRawFrame):
            self._handle_input_audio(frame)
        elif isinstance(frame, UserStartedSpeakingFrame):
            self._turn, self._preroll = self._preroll, TurnAudio()
            self._turn_secs = self._turn_dropped_secs = 0.0
            self._speech_end = None
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._speech_end = frame.timestamp - frame.stop_secs
        elif isinstance(frame, UserStoppedSpeakingFrame):
            await self._handle_user_stopped_speaking()
        elif isinstance(frame, InterruptionFrame):
            self._interrupt()
        elif isinstance(frame, BotStartedSpeakingFrame):
            # the first one after our audio went out dates playback (not later ones, after gaps)
            reply = self._reply
            if reply and reply.pushed_ms and reply.playing_since is None:
                reply.playing_since = time.monotonic()
        elif isinstance(frame, BotStoppedSpeakingFrame):
            # the transport ran out of audio: a finished reply has been heard in full
            if self._reply and self._reply.done:
                self._reply.settled = True
        elif isinstance(frame, SpeechControlParamsFrame):
            if frame.vad_params is not None:
                self._preroll_secs = frame.vad_params.start_secs + PREROLL_MARGIN_SECS
        elif isinstance(frame, LLMContextUserTurnFrame):
            if direction == FrameDirection.DOWNSTREAM:
                self._heard.append(frame.text.strip())
        elif isinstance(frame, LLMContextFrame):
            self._messages = list(frame.context.get_messages())
            self._context_system = system_texts(self._messages)
            # downstream, from the user aggregator: LLMRunFrame or messages added with run_llm
            # (upstream ones come from the assistant aggregator, with the context it recorded)
            if direction == FrameDirection.DOWNSTREAM:
                await self._answer_context()
        elif isinstance(frame, LLMMessagesAppendFrame):
            self._messages += frame.messages
            self._context_system += system_texts(frame.messages)
            if frame.run_llm:
                await self._answer_context()
        elif isinstance(frame, LLMRunFrame):
            await self._answer_context()
        elif isinstance(frame, TTSSpeakFrame):
            await self._speak(frame)
            return  # consumed: this service is the pipeline's voice

        await self.push_frame(frame, direction)

    def _handle_input_audio(self, frame: InputAudioRawFrame):
        if self._turn is None:
            self._preroll.append(frame)
            self._preroll.trim(self._preroll_secs)
            return
        self._turn.append(frame)
        self._turn_secs += frame.num_frames / frame.sample_rate
        # the reasoner hears at most USER_LIMITS.max_seconds: keep the latest part
        self._turn_dropped_secs += self._turn.trim(USER_LIMITS.max_seconds)

    async def _handle_user_stopped_speaking(self):
        stopped_at = time.time()
        speech_end = self._speech_end if self._speech_end is not None else stopped_at
        turn, self._turn = self._turn, None
        if turn is None:
            return
        if not turn.frames or self._turn_secs < self._settings.min_turn_secs:
            logger.debug(f"{self}: ignoring a {self._turn_secs:.2f} s turn (min_turn_secs={self._settings.min_turn_secs})")
            return
        if self._turn_dropped_secs:
            logger.info(f"{self}: the turn is longer than the {USER_LIMITS.max_seconds:.0f} s the model hears; "
                        f"answering its last {turn.secs:.1f} s")
        if self._reply_task and not self._reply_task.done():
            self._interrupt()  # talked over the bot with interruptions off
        sampling, transcript = self._sampling(), None
        if self._settings.transcribe:
            name, language = transcript_language(self._settings.language)
            sampling.update(transcribe=True, language=name)
            transcript = TranscriptRelay(self, turn.user_id, language)

        def respond(reply: VoiceReply):
            def start():  # in a worker thread: joining the recording and reading it cost time
                audio, rate = turn.pcm()
                return answer_turn(reply.conversation, [audio], sample_rate=rate, **sampling)
            return reply.start(start)

        if self._reply and not self._reply.interruptible and self._reply_task and not self._reply_task.done():
            # an uninterruptible line is playing: answer once it ends, without holding up the
            # frames behind this one (system frames: the caller's audio, interruptions)
            self._turn_task = self.create_task(self._start_reply(
                respond, started_at=stopped_at, speech_end=speech_end, transcript=transcript), "turn")
            return
        await self._start_reply(respond, started_at=stopped_at, speech_end=speech_end, transcript=transcript)

    async def _speak(self, frame: TTSSpeakFrame):
        # in order after the running reply (as a TTS would); an interruption drops it
        if frame.interruptible and self._turn is not None:
            logger.debug(f"{self}: the user is speaking: dropping the interruptible {frame}")
            return
        sampling = self._sampling()
        await self._start_reply(lambda reply: reply.say(frame.text, **sampling), started_at=time.time(),
                                text_type=frame.text_type, append_to_context=frame.append_to_context,
                                interruptible=frame.interruptible)

    async def _answer_context(self):
        """A text turn: the context's user messages since its last assistant message that
        are not answered yet, joined, answered with `conversation.respond(text=...)`."""
        pending, heard = unanswered_user_texts(self._messages, self._answered), set(self._heard)
        self._heard.clear()
        self._answered += [m for m, _ in pending]
        # turns the user aggregator wrote from our transcripts were answered from their audio already
        texts = [t for _, t in pending if t not in heard]
        if not texts:
            if not heard:
                logger.info(f"{self}: asked to run, but the context has no new user text to answer "
                            "(a scripted line, such as a greeting, is a TTSSpeakFrame)")
            return
        text, sampling = "\n".join(texts), self._sampling()
        await self._start_reply(lambda reply: reply.respond(text=text, **sampling), started_at=time.time())

    #
    # replies
    #

    async def _start_reply(self, start: Callable[[VoiceReply], Awaitable], *, started_at: float,
                           text_type=TextType.SENTENCE, append_to_context: bool = True, interruptible: bool = True,
                           transcript: TranscriptRelay | None = None, speech_end: float | None = None):
        """Run the reply `start(reply)` starts (respond/say) as the reply task, one at a time;
        `started_at`: when it was asked, `speech_end`: when the speech it answers ended (time.time())."""
        while True:  # the previous reply, or its truncation, uses the conversation
            await self._wait_reply()
            try:
                conversation = await self._current_conversation()
            except Exception as e:
                await self._conversation_failed(e)
                return
            if self._reply_task is None or self._reply_task.done():
                break  # (else another reply started meanwhile: this one goes after it)
        self._reply = ReplyState(self._voice_session.reply(conversation), interruptible, transcript)
        self._traces.start(asked_at=started_at, speech_end=speech_end)
        await self.start_ttfb_metrics(start_time=started_at)
        await self.start_processing_metrics(start_time=started_at)
        self._reply_task = self.create_task(
            self._run_reply(self._reply, start, text_type, append_to_context), "reply")

    async def _run_reply(self, reply: ReplyState, start: Callable[[VoiceReply], Awaitable], text_type,
                         append_to_context: bool):
        await self._push(reply, LLMFullResponseStartFrame())
        speaking, text, failure = False, [], None
        try:
            await start(reply.voice)  # joins, reads and checks the turn's audio in a worker thread
            async for event in reply.voice:  # each frame computed in a worker thread; cancelled: only ResponseDone
                if isinstance(event, ResponseDone):
                    if not reply.cancelled:
                        await self._push_text(reply, text, text_type, append_to_context)
                    await self._report_usage(reply.voice)
                elif isinstance(event, TextDelta):
                    text.append(event.text)
                elif isinstance(event, (TranscriptDelta, TranscriptDone)):  # the caller's words, even if cancelled
                    if reply.transcript is not None:
                        await reply.transcript.push(event)
                elif isinstance(event, AudioChunk):
                    if not speaking:
                        speaking = True
                        await self.stop_ttfb_metrics()
                        self._traces.first_audio()
                        await self._push(reply, TTSStartedFrame(append_to_context=append_to_context))
                    await self._push(reply, TTSAudioRawFrame(to_int16(event.pcm), event.sample_rate, 1))
                    reply.pushed_ms += 1000 * len(event.pcm) / event.sample_rate
                    # the text of a frame goes after its audio: the transport releases it as that plays
                    await self._push_text(reply, text, text_type, append_to_context)
        except NothingToAnswer as e:
            failure = e
            logger.debug(f"{self}: no reply: {e}")
        except PromptTooLong as e:  # the caller's content, not the service's health: the next turn goes on
            failure = e
            await self.push_error(f"reply refused: {e}", exception=e, category=ErrorCategory.APPLICATION)
        except Exception as e:
            failure = e
            await self.push_error(f"reply failed: {e}", exception=e)
        self._traces.end(reply.voice, failure)
        if speaking:
            await self._push(reply, TTSStoppedFrame())
        await self._push(reply, LLMFullResponseEndFrame())
        await self.stop_processing_metrics()

    async def push_frame(self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM):
        for watch in self.frame_watchers:
            watch(frame, direction)
        await super().push_frame(frame, direction)

    async def _push(self, reply: ReplyState, frame: Frame):
        # an uninterruptible reply's frames too: no interruption drops them on the way out
        frame.interruptible = frame.interruptible and reply.interruptible
        await self.push_frame(frame)

    async def _push_text(self, reply: ReplyState, text: list[str], text_type, append_to_context: bool):
        if not text:
            return
        joined = "".join(text)
        text.clear()
        # LLMTextFrame for RTVI's bot-llm-text; the context gets the TTSTextFrame (as OpenAI Realtime)
        llm_text = LLMTextFrame(joined)
        llm_text.append_to_context = False
        await self._push(reply, llm_text)
        tts_text = TTSTextFrame(joined, text_type=text_type)
        tts_text.includes_inter_frame_spaces = True  # deltas join to the exact reply text
        tts_text.append_to_context = append_to_context
        await self._push(reply, tts_text)

    async def _report_usage(self, reply: VoiceReply):
        # history_tokens (the reasoner's context after this reply) is not part of the minimal API
        total = getattr(reply.conversation, "history_tokens", None)
        if not isinstance(total, int):
            return
        completion_tokens = reply.text_tokens
        await self.start_llm_usage_metrics(LLMTokenUsage(
            prompt_tokens=max(total - completion_tokens, 0), completion_tokens=completion_tokens,
            total_tokens=total))

    def _interrupt(self):
        """Barge-in: cancel the running reply, then cut the history to what the caller heard
        of the last reply (unless it was heard in full or is already cut)."""
        reply = self._reply
        if reply is None or reply.settled or not reply.interruptible:
            return
        self._cancel_reply()
        reply.settled = True
        played_ms = reply.played_ms()  # now: the transport drops the rest as the interruption passes
        if played_ms < reply.pushed_ms or reply.cancelled:
            self._reply_task = self.create_task(self._truncate(self._reply_task, reply, played_ms), "truncate")

    def _cancel_reply(self):
        """Nothing more is pushed, and the conversation ends the reply within a frame."""
        if self._reply_task and not self._reply_task.done():
            self._reply.voice.cancel()

    async def _truncate(self, reply_task: asyncio.Task, reply: ReplyState, played_ms: float):
        # drained, not cancelled: cancelled mid-frame, its frame would run on with the conversation busy
        await asyncio.shield(reply_task)
        if not reply.voice.truncatable:  # it failed: the conversation holds nothing of it
            return
        logger.debug(f"{self}: interrupted after {played_ms:.0f} of {reply.pushed_ms:.0f} ms")
        try:
            await self._voice_session.truncate(reply.voice, played_ms)
        except Exception as e:
            logger.warning(f"{self}: could not truncate the interrupted reply: {e}")

    async def _wait_reply(self, timeout: float | None = None) -> bool:
        """Wait for the running reply to end; past `timeout`, cancel its task (returns False)."""
        task = self._reply_task
        if task is None or task.done():
            return True
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)  # shielded: our caller may be cancelled
            return True
        except TimeoutError:
            await self.cancel_task(task)
            return False
