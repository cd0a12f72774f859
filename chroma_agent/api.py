"""`ChromaModel`, the package's public face: the weights and per-frame math of
`ChromaWeights` (model.py) plus the reply-level entry points, `generate`, `reply_frames`
and `conversation`.

A subclass in its own module because those entry points build objects of the reply
scheduler (generation.py) and the streaming runtime (conversation.py), which sit on the
weights: every import then points down, none inside a method. `from_pretrained` /
`from_config` construct `cls`, so they return a `ChromaModel`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .runtime.conversation import Conversation
from .runtime.generation import ReplyFrames
from .model.weights import ChromaWeights
from .model.processor import DEFAULT_SYSTEM_PROMPT
from .model.sampling import SamplingOptions
from .model.voice import Voice

__all__ = ["ChromaModel", "Reply"]


@dataclass
class Reply:
    """A whole reply: 24 kHz float32 `audio`, the reasoner's `text`, and what made them."""

    audio: np.ndarray
    sample_rate: int
    text: str
    text_ids: list[int]
    codes: np.ndarray            # [frames, codebooks]
    stop_reason: str
    timings: dict[str, float]


class ChromaModel(ChromaWeights):
    """FlashLabs Chroma 1.0: reasoner (Qwen2.5-Omni thinker), backbone, decoder, Mimi codec.

    Load with `ChromaModel.from_pretrained("FlashLabs/Chroma-4B")` or a local directory.
    """

    def reply_frames(self, voice: Voice, prompt, max_frames: int = 375,
                     sampling: SamplingOptions | None = None, **state) -> ReplyFrames:
        """The frame-by-frame iterator of one reply to a prepared reasoner `prompt`
        (`state`: `reasoner`, `prefix`, `forced_ids`, see `ReplyFrames`)."""
        return ReplyFrames(self, voice, prompt, max_frames, sampling or SamplingOptions(), **state)

    def conversation(self, voice: Voice, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                     max_history_tokens: int = 8192, frame_graphs: bool | None = None, *,
                     transcribe: bool = False, language: str = "English",
                     max_transcript_tokens: int = 448) -> Conversation:
        """A multi-turn streaming conversation in `voice` (see `chroma_agent.runtime.conversation`);
        `transcribe`: the caller's words in `language` beside each reply. Many conversations
        can share this model."""
        return Conversation(self, voice, system_prompt, max_history_tokens, frame_graphs,
                            transcribe=transcribe, language=language, max_transcript_tokens=max_transcript_tokens)

    @torch.inference_mode()
    def generate(self, voice: Voice, audio=None, sample_rate: int | None = None, text: str | None = None,
                 system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, max_frames: int = 375,
                 sampling: SamplingOptions | None = None) -> Reply:
        """One-shot reply to a user turn (`audio` with its `sample_rate`, and/or `text`):
        runs the frame generator to the end, then decodes the whole reply."""
        start = time.perf_counter()
        user_audio = None if audio is None else self.processor.load_user_audio(audio, sample_rate)
        prompt = self.processor.user_turn(user_audio, text, system_prompt)
        frames = self.reply_frames(voice, prompt, max_frames, sampling)
        codes = [f.codes for f in frames]
        generated = time.perf_counter()
        codes_np = (torch.stack(codes).cpu().numpy() if codes
                    else np.zeros((0, self.config.num_codebooks), dtype=np.int64))
        wave = self.decode_audio(codes_np)
        done = time.perf_counter()
        text_ids = [t for t in frames.text_ids if t != self.config.im_end_token_id]
        return Reply(wave, self.sample_rate, self.processor.decode(text_ids), frames.text_ids, codes_np,
                     frames.stop_reason or "max_frames",
                     {"generate_s": generated - start, "decode_s": done - generated, "total_s": done - start,
                      "frames": len(codes), "audio_s": len(codes) * self.config.frame_size / self.sample_rate})
