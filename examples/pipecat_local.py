"""Answer a spoken question in a cloned voice with a local Pipecat pipeline (no network).

The question WAV is fed to the pipeline like a microphone (20 ms frames in real time, then
silence), through the same turn detection as a live call: Silero VAD and Smart Turn in
the user aggregator. `ChromaSpeechToSpeechService` answers the turn; the reply's frames
are written to the output WAV (24 kHz) and its transcript is printed as it plays.

    python examples/pipecat_local.py --model FlashLabs/Chroma-4B --voice me.voice.safetensors \\
        --input question.wav --output answer.wav
    python examples/pipecat_local.py --model ./checkpoint --voice-audio me.wav \\
        --voice-text "The words me.wav says." --input question.wav --output answer.wav
"""
from __future__ import annotations

import argparse
import asyncio
import sys

import numpy as np
import soundfile as sf
import soxr
from loguru import logger
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import (
    EndFrame,
    InputAudioRawFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    TTSAudioRawFrame,
    TTSTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair, LLMUserAggregatorParams
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.workers.runner import WorkerRunner
from pipecat_chroma import ChromaSpeechToSpeechService

from chroma_agent import ChromaModel, Voice

RATE = 16000      # Silero VAD takes 8 or 16 kHz
FRAME_MS = 20


class ReplyRecorder(FrameProcessor):
    """Stands where the output transport would: keeps the reply's audio, prints its text."""

    def __init__(self):
        super().__init__()
        self.audio: list[bytes] = []
        self.sample_rate = 24000
        self.started = asyncio.Event()
        self.ended = asyncio.Event()

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        if isinstance(frame, LLMFullResponseStartFrame):
            self.started.set()
        elif isinstance(frame, TTSAudioRawFrame):
            self.audio.append(frame.audio)
            self.sample_rate = frame.sample_rate
        elif isinstance(frame, TTSTextFrame):
            print(frame.text, end="", flush=True)
        elif isinstance(frame, LLMFullResponseEndFrame):
            self.ended.set()
        await self.push_frame(frame, direction)


def microphone_frames(path: str) -> list[InputAudioRawFrame]:
    """The question as 20 ms int16 frames at 16 kHz: half a second of silence, the
    question, two seconds of silence (for the VAD and Smart Turn to end the turn)."""
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    question = soxr.resample(data.mean(axis=1), rate, RATE)
    audio = np.concatenate([np.zeros(RATE // 2), question, np.zeros(2 * RATE)])
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
    step = RATE * FRAME_MS // 1000
    return [InputAudioRawFrame(pcm[i:i + step].tobytes(), RATE, 1) for i in range(0, len(pcm), step)]


async def answer(args) -> int:
    model = ChromaModel.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    voice = Voice.load(args.voice) if args.voice else model.voice_from_audio(args.voice_audio, args.voice_text)
    llm = ChromaSpeechToSpeechService(model=model, voice=voice, settings=ChromaSpeechToSpeechService.Settings(
        system_instruction=args.system_prompt, max_frames=args.max_frames, seed=args.seed))
    # realtime mode (announced by the service): VAD starts the turn, Smart Turn ends it
    pair = LLMContextAggregatorPair(LLMContext(), user_params=LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer()))
    recorder = ReplyRecorder()
    worker = PipelineWorker(Pipeline([pair.user(), llm, recorder, pair.assistant()]),
                            params=PipelineParams(audio_in_sample_rate=RATE, enable_metrics=True))
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def on_started(worker, frame):
        started.set()

    async def speak():
        await started.wait()
        for frame in microphone_frames(args.input):
            await worker.queue_frame(frame)
            await asyncio.sleep(FRAME_MS / 1000)
        try:
            await asyncio.wait_for(recorder.started.wait(), timeout=10)
            await recorder.ended.wait()
        except TimeoutError:
            print("no turn was detected in the input (is it speech?)", file=sys.stderr)
        await worker.queue_frame(EndFrame())

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.gather(runner.run(), speak())
    print()
    if not recorder.audio:
        return 1
    pcm = np.frombuffer(b"".join(recorder.audio), np.int16)
    sf.write(args.output, pcm, recorder.sample_rate)
    print(f"wrote {len(pcm) / recorder.sample_rate:.2f} s of reply to {args.output}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id (FlashLabs/Chroma-4B)")
    voice = parser.add_mutually_exclusive_group(required=True)
    voice.add_argument("--voice", help="a voice file (chroma-agent voice ... --output me.voice.safetensors)")
    voice.add_argument("--voice-audio", help="a reference clip of the voice to clone (needs --voice-text)")
    parser.add_argument("--voice-text", help="the words the reference clip says")
    parser.add_argument("--input", required=True, help="the spoken question (WAV, any rate)")
    parser.add_argument("--output", required=True, help="where to write the spoken reply (WAV, 24 kHz)")
    parser.add_argument("--system-prompt", default=None, help="default: the model's own")
    parser.add_argument("--max-frames", type=int, default=375, help="longest reply, in 80 ms frames")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args()
    if args.voice_audio and not args.voice_text:
        parser.error("--voice-audio needs --voice-text")
    logger.remove()
    logger.add(sys.stderr, level="INFO")   # pipecat logs every frame link at DEBUG
    return asyncio.run(answer(args))


if __name__ == "__main__":
    sys.exit(main())
