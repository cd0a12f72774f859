"""Text and audio in the reasoner's terms: the checkpoint's own tokenizer and chat
template, Whisper log-mel features for user audio, 24 kHz mono for voice references."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, WhisperFeatureExtractor

from .audio import USER_LIMITS, VOICE_LIMITS, load_audio
from .config import ChromaConfig

DEFAULT_SYSTEM_PROMPT = "You are a helpful voice assistant. Answer briefly, in a natural spoken style."


@dataclass
class ReasonerInput:
    """One prefill of the reasoner: token ids with audio placeholders expanded, plus the
    Whisper features of each audio clip in order, and, once the audio tower has run on
    them, its output (kept so that a second pass over the same audio, the caller's
    transcript, does not run the tower again)."""

    input_ids: torch.Tensor                          # [1, n] long
    input_features: torch.Tensor | None = None       # [clips, mel_bins, frames]
    feature_attention_mask: torch.Tensor | None = None  # [clips, frames]
    audio_embeds: torch.Tensor | None = None         # [audio tokens, hidden]: the tower's output, all clips


def stack_features(features: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips' features [1, bins, frames_i] and masks [1, frames_i] as one zero-padded batch."""
    longest = max(f.shape[-1] for f in features)
    pad = torch.nn.functional.pad
    return (torch.cat([pad(f, (0, longest - f.shape[-1])) for f in features]),
            torch.cat([pad(m, (0, longest - m.shape[-1])) for m in masks]))


def audio_token_count(mel_frames: int) -> int:
    """Encoder outputs (and so `<|AUDIO|>` placeholders) for `mel_frames` Whisper frames."""
    return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1


class ChromaProcessor:
    """Tokenizer + chat template + Whisper features, loaded from the checkpoint directory."""

    def __init__(self, tokenizer, feature_extractor: WhisperFeatureExtractor, config: ChromaConfig):
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.config = config
        thinker = config.thinker
        self.audio_token = tokenizer.convert_ids_to_tokens(thinker.audio_token_index)
        if not tokenizer.chat_template:
            raise ValueError("the checkpoint's tokenizer has no chat template (tokenizer_config.json "
                             "'chat_template' or chat_template.jinja)")

    @classmethod
    def from_pretrained(cls, directory: str | Path, config: ChromaConfig) -> "ChromaProcessor":
        directory = Path(directory)
        if not any((directory / f).is_file() for f in ("tokenizer.json", "vocab.json")):
            raise FileNotFoundError(f"{directory} has no tokenizer (tokenizer.json or vocab.json + merges.txt); "
                                    "a Chroma checkpoint ships its Qwen2.5-Omni processor files")
        if not (directory / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"{directory} has no preprocessor_config.json (the Whisper feature extractor)")
        tokenizer = AutoTokenizer.from_pretrained(directory, config=config.thinker)  # not the chroma config.json
        features = WhisperFeatureExtractor.from_pretrained(directory)
        return cls(tokenizer, features, config)

    # -- text --
    def transcript_ids(self, text: str) -> list[int]:
        """Token ids of a voice transcript (no special tokens)."""
        if not text or not text.strip():
            raise ValueError("the voice transcript is empty: give the words spoken in the reference audio")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- audio --
    @property
    def feature_rate(self) -> int:
        return int(self.feature_extractor.sampling_rate)

    def load_user_audio(self, audio, sample_rate: int | None = None) -> np.ndarray:
        """User audio at the feature extractor's rate (16 kHz), mono float32."""
        return load_audio(audio, sample_rate, self.feature_rate, USER_LIMITS)

    def load_voice_audio(self, audio, sample_rate: int | None = None) -> np.ndarray:
        """Voice reference audio at the codec's rate (24 kHz), mono float32."""
        return load_audio(audio, sample_rate, self.config.sample_rate, VOICE_LIMITS)

    def features(self, audio_16k: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Whisper log-mel features [1, bins, frames] and their mask, unpadded (as the original)."""
        out = self.feature_extractor(audio_16k, sampling_rate=self.feature_rate, padding=False,
                                     return_attention_mask=True, return_tensors="pt")
        return out["input_features"], out["attention_mask"]

    # -- prompts --
    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """`messages` through the checkpoint's chat template, as text."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def reasoner_input(self, messages: list[dict], audio_16k: list[np.ndarray] = (),
                       add_generation_prompt: bool = True, after: str = "") -> ReasonerInput:
        """Render `messages` (chat-template form; audio parts as {"type": "audio"}) with the
        checkpoint's template, expanding each audio placeholder to its encoder length.
        `after`: a rendering of earlier messages to leave out (appending one turn)."""
        text = self.render(messages, add_generation_prompt)
        if not text.startswith(after):
            raise ValueError("the chat template does not render turns independently; cannot append a turn")
        text = text[len(after):]
        placeholders = text.count(self.audio_token)
        if placeholders != len(audio_16k):
            raise ValueError(f"the messages hold {placeholders} audio parts but {len(audio_16k)} clips were given")
        feats, masks = [], []
        pieces = text.split(self.audio_token)
        expanded = pieces[0]
        for clip, rest in zip(audio_16k, pieces[1:]):
            f, m = self.features(clip)
            feats.append(f)
            masks.append(m)
            expanded += self.audio_token * audio_token_count(int(m.sum())) + rest
        ids = self.tokenizer(expanded, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if not feats:
            return ReasonerInput(ids)
        return ReasonerInput(ids, *stack_features(feats, masks))

    def user_turn(self, audio_16k: np.ndarray | None = None, text: str | None = None,
                  system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> ReasonerInput:
        """A single user turn (audio, text or both) ready for the reasoner."""
        if audio_16k is None and not text:
            raise ValueError("a user turn needs audio or text")
        content = []
        if audio_16k is not None:
            content.append({"type": "audio"})
        if text:
            content.append({"type": "text", "text": text})
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
        messages.append({"role": "user", "content": content})
        return self.reasoner_input(messages, [] if audio_16k is None else [audio_16k])
