"""Caller transcripts from the reasoner itself: a side pass over a user audio turn with
Qwen2.5-Omni's documented speech-recognition prompt, so no second model is needed.

    for event in transcribe(model, turn.input_features, turn.feature_attention_mask, turn=3):
        ...  # TranscriptDelta(text, turn) ..., then TranscriptDone(text, turn, language, truncated)

The prompt is rendered with the checkpoint's own chat template and tokenizer and reuses the
turn's Whisper features (no feature extraction here). The pass runs greedily on a fresh
`Reasoner` of its own, so a conversation's KV cache is never touched, and stops at the
model's im_end / eos tokens or after `max_tokens` tokens (then `truncated`). Its text is
streamed through the incremental detokenizer: the deltas join to exactly the final text.

`transcribe` is blocking (every event is computed on the calling thread, one reasoner step
per token): callers on an event loop run it off the loop (`asyncio.to_thread`, an executor).
"""
from __future__ import annotations

from typing import Generator, Iterator

import torch

from ..events import TranscriptDelta, TranscriptDone
from ..model.processor import ReasonerInput, audio_token_count
from ..model.weights import ChromaWeights
from .detokenizer import IncrementalDetokenizer
from .generation import Reasoner

RECOGNITION_SYSTEM = "You are a speech recognition model."
MAX_TRANSCRIPT_TOKENS = 448  # Whisper's decoder limit: well over 30 s of speech

__all__ = ["MAX_TRANSCRIPT_TOKENS", "RECOGNITION_SYSTEM", "recognition_instruction", "recognition_messages",
           "recognition_prompt", "stop_token_ids", "transcribe"]


def recognition_instruction(language: str = "English") -> str:
    """The documented recognition instruction for `language`."""
    return f"Transcribe the {language} audio into text without any punctuation marks."


def recognition_messages(language: str = "English") -> list[dict]:
    """The recognition prompt in chat-template form: system, then the audio and the instruction."""
    return [{"role": "system", "content": RECOGNITION_SYSTEM},
            {"role": "user", "content": [{"type": "audio"},
                                         {"type": "text", "text": recognition_instruction(language)}]}]


def _one_clip(features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`features` as [1, bins, frames] and `mask` as [1, frames] (unbatched ones are accepted)."""
    features = features if features.dim() == 3 else features[None]
    mask = mask if mask.dim() == 2 else mask[None]
    if features.shape[0] != 1 or mask.shape[0] != 1:
        raise ValueError(f"transcribe one clip at a time: got features of {features.shape[0]} clips")
    if mask.shape[-1] != features.shape[-1]:
        raise ValueError(f"the mask has {mask.shape[-1]} frames but the features {features.shape[-1]}")
    return features, mask


def recognition_prompt(processor, features: torch.Tensor, mask: torch.Tensor,
                       language: str = "English") -> ReasonerInput:
    """The recognition prompt for one clip's Whisper `features` [1, bins, frames] and their
    `mask` [1, frames] (as `ChromaProcessor.features` or a turn's `ReasonerInput` hold them):
    the messages rendered with the checkpoint's chat template and the generation prompt,
    the audio placeholder expanded to the clip's encoder length, the features reused as given."""
    features, mask = _one_clip(features, mask)
    text = processor.render(recognition_messages(language), add_generation_prompt=True)
    if text.count(processor.audio_token) != 1:
        raise ValueError(f"the chat template renders {text.count(processor.audio_token)} audio placeholders "
                         "for one audio part; cannot build the recognition prompt")
    # the same expansion as ChromaProcessor.reasoner_input, from the mask instead of new features
    expanded = text.replace(processor.audio_token, processor.audio_token * audio_token_count(int(mask.sum())))
    ids = processor.tokenizer(expanded, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ReasonerInput(ids, features, mask)


def stop_token_ids(model: ChromaWeights) -> set[int]:
    """Tokens that end a transcript: the model's im_end and the tokenizer's eos."""
    eos = model.processor.tokenizer.eos_token_id
    return {model.config.im_end_token_id} | ({eos} if eos is not None else set())


def transcribe(model: ChromaWeights, features: torch.Tensor | None, mask: torch.Tensor | None, *,
               language: str = "English", turn: int = 0,
               max_tokens: int = MAX_TRANSCRIPT_TOKENS) -> Iterator[TranscriptDelta | TranscriptDone]:
    """The transcript of one user audio turn, from its Whisper `features` and `mask`:
    `TranscriptDelta`s, then one `TranscriptDone` whose text is their join. At most
    `max_tokens` tokens; `truncated` when the model had not ended by then. No audio
    (`features` None) gives an empty transcript; a failure inside ends it with
    `TranscriptDone(error=...)` holding the text so far, never an exception.

    Blocking: run it off the event loop. Bad arguments raise here, before anything runs."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if model.processor is None:
        raise RuntimeError("the model has no processor; load it with ChromaModel.from_pretrained")
    if features is not None and mask is None:
        raise ValueError("the features need their attention mask")
    return _events(model, features, mask, language, turn, max_tokens)


def _events(model: ChromaWeights, features, mask, language: str, turn: int,
            max_tokens: int) -> Iterator[TranscriptDelta | TranscriptDone]:
    detok = IncrementalDetokenizer(model.processor.decode)
    truncated, error = False, None
    try:
        if features is not None:
            prompt = recognition_prompt(model.processor, features, mask, language)
            truncated = yield from _greedy(model, prompt, max_tokens, detok, turn)
    except Exception as failure:  # noqa: BLE001 - a transcript that fails must not take the call down
        error = str(failure) or type(failure).__name__
    if text := detok.flush():
        yield TranscriptDelta(text, turn)
    yield TranscriptDone(detok.text, turn, language, truncated, error)


def _greedy(model: ChromaWeights, prompt: ReasonerInput, max_tokens: int, detok: IncrementalDetokenizer,
            turn: int) -> Generator[TranscriptDelta, None, bool]:
    """Greedy decoding of `prompt` on a fresh reasoner, pushing each token through `detok`;
    returns whether it was cut at `max_tokens`."""
    stop = stop_token_ids(model)
    # sized for the whole pass up front: the cache never regrows
    reasoner = Reasoner(model, capacity=prompt.input_ids.shape[1] + max_tokens + 1)
    # inference mode is entered per call, never held across a yield: it is thread-local and would leak
    with torch.inference_mode():
        _, token = reasoner.prefill(prompt)
    for _ in range(max_tokens):
        if token in stop:
            return False
        if text := detok.push([token]):
            yield TranscriptDelta(text, turn)
        with torch.inference_mode():
            _, token = reasoner.step(token)
    return token not in stop
