"""The cloned voice as a plain LiveKit TTS, for cascaded STT -> LLM -> TTS agents.

Each synthesis is a Chroma conversation with no system prompt that speaks the text with
`say()` (the reasoner teacher-forced on it). A stream speaks sentence by sentence in one
conversation, so each sentence follows on from the last. Each synthesis is a `chroma.turn`
span under LiveKit's TTS spans and a turn on the plugin's Prometheus metrics (tracing.py).
"""
from __future__ import annotations

import asyncio
from typing import Any

from livekit.agents import APIConnectOptions, tokenize, tts, utils
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS

from chroma_agent.serving.pcm import to_int16

from .models import DEFAULT_MODEL, ModelSource, UsesChroma
from .tracing import SynthesisTrace

SAMPLE_RATE = 24000


class TTS(UsesChroma, tts.TTS):
    """Speak text in the voice of a Chroma `Voice`.

    `model`, `voice`, `device`, `dtype`, `revision`: as for `RealtimeModel` (paths load once
    per process, on first use). `temperature`, `top_k`, `seed`: sampling of the audio codes;
    `max_frames`: the longest line, in 80 ms frames.
    """

    def __init__(self, *, model: Any = DEFAULT_MODEL, voice: Any, temperature: float = 0.9, top_k: int = 50,
                 seed: int | None = None, max_frames: int = 375, device: str | None = None,
                 dtype: str | None = None, revision: str | None = None) -> None:
        super().__init__(capabilities=tts.TTSCapabilities(streaming=True), sample_rate=SAMPLE_RATE, num_channels=1)
        self._source = ModelSource(model, voice, device=device, dtype=dtype, revision=revision)
        self._sampling = {"temperature": temperature, "top_k": top_k, "seed": seed, "max_frames": max_frames}

    def prewarm(self) -> None:
        # called on the event loop, so load in a thread; a failure is reported by the first synthesis
        loading = asyncio.get_running_loop().run_in_executor(None, self._source.load)
        loading.add_done_callback(lambda f: f.cancelled() or f.exception())

    def synthesize(self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
                   ) -> ChunkedStream:
        return ChunkedStream(tts=self, input_text=text, conn_options=conn_options)

    def stream(self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> SynthesizeStream:
        return SynthesizeStream(tts=self, conn_options=conn_options)

    async def _conversation(self) -> Any:
        model, voice = await asyncio.to_thread(self._source.load)  # loaded once, then immediate
        return await asyncio.to_thread(model.conversation, voice=voice, system_prompt=None)

    async def _speak(self, conv: Any, text: str, emitter: tts.AudioEmitter, synthesis: SynthesisTrace) -> None:
        from chroma_agent import AudioChunk, ResponseDone

        synthesis.text.append(text)
        try:
            async for event in conv.say(text, **self._sampling):
                if isinstance(event, AudioChunk):
                    emitter.push(to_int16(event.pcm))
                    synthesis.frame()
                elif isinstance(event, ResponseDone):
                    synthesis.done(event.stop_reason, event.error)
        except BaseException:
            conv.cancel()  # closed mid-line: stop generating
            raise


async def _close(conv: Any) -> None:
    close = getattr(conv, "close", None)  # an engine's conversation frees its slot
    if close is not None:
        await asyncio.to_thread(close)


class ChunkedStream(tts.ChunkedStream):
    """One text, spoken whole."""

    def __init__(self, *, tts: TTS, input_text: str, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, input_text=input_text, conn_options=conn_options)
        self._tts: TTS = tts

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(request_id=utils.shortuuid(), sample_rate=SAMPLE_RATE, num_channels=1,
                                  mime_type="audio/pcm")
        if not self._input_text.strip():
            return
        with SynthesisTrace() as synthesis:  # under LiveKit's tts_request_run span
            synthesis.start()
            conv = await self._tts._conversation()
            try:
                await self._tts._speak(conv, self._input_text, output_emitter, synthesis)
            finally:
                await _close(conv)


class SynthesizeStream(tts.SynthesizeStream):
    """Text streamed in (an LLM's tokens), spoken sentence by sentence as each completes."""

    def __init__(self, *, tts: TTS, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, conn_options=conn_options)
        self._tts: TTS = tts

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(request_id=utils.shortuuid(), sample_rate=SAMPLE_RATE, num_channels=1,
                                  mime_type="audio/pcm", stream=True)
        output_emitter.start_segment(segment_id=utils.shortuuid())
        sentences = tokenize.blingfire.SentenceTokenizer().stream()

        async def forward_input() -> None:
            async for data in self._input_ch:
                if isinstance(data, self._FlushSentinel):
                    sentences.flush()
                else:
                    sentences.push_text(data)
            sentences.end_input()

        async def speak() -> None:
            conv = None
            try:
                with SynthesisTrace() as synthesis:  # a task made in LiveKit's tts_request_run span
                    async for sentence in sentences:
                        if not sentence.token.strip():
                            continue
                        synthesis.start()  # asked at the first sentence: no text, no synthesis
                        conv = conv or await self._tts._conversation()
                        self._mark_started()
                        await self._tts._speak(conv, sentence.token, output_emitter, synthesis)
            finally:
                if conv is not None:
                    await _close(conv)

        tasks = [asyncio.create_task(forward_input()), asyncio.create_task(speak())]
        try:
            await asyncio.gather(*tasks)
        finally:
            await sentences.aclose()
            await utils.aio.cancel_and_wait(*tasks)
        output_emitter.end_segment()
