"""Run one golden case (format: tests/data/golden/README.md) through the production path."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from ..model.codec import StreamingMimiDecoder
from ..api import ChromaModel
from ..model.processor import ReasonerInput
from ..model.sampling import SamplingOptions


@contextmanager
def weight_edits(model: ChromaModel, edits: list[dict]):
    """Apply `tensor[row] = scale * tensor[from_row]` edits (original values) and undo them after."""
    saved = []
    with torch.inference_mode():
        originals = {}
        for edit in edits:
            tensor = model.parameter_by_published_name(edit["tensor"])
            originals.setdefault(edit["tensor"], tensor.detach().clone())
        try:
            for edit in edits:
                tensor = model.parameter_by_published_name(edit["tensor"])
                source = originals[edit["tensor"]]
                saved.append((tensor, edit["row"], tensor[edit["row"]].clone()))
                tensor[edit["row"]] = edit["scale"] * source[edit["from_row"]]
            if edits:
                model.refresh_derived()
            yield
        finally:
            for tensor, row, value in reversed(saved):
                tensor[row] = value
            if edits:
                model.refresh_derived()


def run_case(model: ChromaModel, case: dict) -> dict:
    """Compute what the original implementation recorded for `case`:
    {"prompt_audio_codes", "codes", "thinker_tokens", "audio"}."""
    proc = model.processor
    with weight_edits(model, case.get("weight_edits", [])), torch.inference_mode():
        voice = model.voice_from_audio(np.asarray(case["prompt_audio_24k"], dtype=np.float32),
                                       list(case["prompt_text_ids"]), sample_rate=model.sample_rate)
        ids = torch.tensor([case["thinker_input_ids"]], dtype=torch.long)
        prompt = ReasonerInput(ids)
        if case.get("user_audio_16k") is not None:
            audio = proc.load_user_audio(np.asarray(case["user_audio_16k"], dtype=np.float32), 16000)
            prompt.input_features, prompt.feature_attention_mask = proc.features(audio)
        # the production path: the voice prefix's cached backbone KV, the streaming codec
        frames = model.reply_frames(voice, prompt, case["max_new_frames"], SamplingOptions(greedy=True),
                                    prefix=model.prefix_state(voice))
        codec = StreamingMimiDecoder(model.codec_model, model.config.num_codebooks)
        codes, audio = [], []
        for frame in frames:
            codes.append(frame.codes.tolist())
            audio.append(codec.decode_frame(frame.codes[None])[0])
        return {
            "prompt_audio_codes": voice.codes.tolist(),
            "codes": codes,
            "thinker_tokens": list(frames.text_ids),
            "audio": torch.cat(audio).cpu().numpy() if audio else np.zeros(0, np.float32),
        }
