"""Voices: cloned once from a reference clip, saved and loaded without pickle."""
import numpy as np
import pytest
from safetensors import safe_open

from chroma_agent import Voice


def test_voice_from_speech_file(model, speech):
    voice = model.voice_from_audio(speech["reference"], "Hello, thanks for calling. How can I help you today?")
    import soundfile as sf
    info = sf.info(str(speech["reference"]))
    samples_24k = round(info.frames * 24000 / info.samplerate)
    assert voice.codes.shape == (-(-samples_24k // 1920), 8)
    assert voice.codes.max() < 2048
    assert voice.transcript_ids == tuple(model.processor.transcript_ids(voice.transcript))


def test_save_load_roundtrip_is_safetensors(voice, tmp_path):
    path = voice.save(tmp_path / "alice.voice.safetensors")
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata()["format"] == "chroma-voice"
        assert set(f.keys()) == {"codes", "transcript_ids"}
    loaded = Voice.load(path)
    assert np.array_equal(loaded.codes, voice.codes)
    assert loaded.transcript_ids == voice.transcript_ids
    assert loaded.transcript == voice.transcript


def test_loading_something_else_fails_clearly(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="is not a voice file"):
        Voice.load(junk)
    with pytest.raises(FileNotFoundError):
        Voice.load(tmp_path / "none.safetensors")


def test_transcript_must_not_be_empty(model, speech):
    with pytest.raises(ValueError, match="transcript is empty"):
        model.voice_from_audio(speech["reference"], "  ")


def test_voice_prefix_layout(model, voice):
    """T(start), T(transcript), T(end), A(frames), zeros."""
    prefix = model.voice_prefix(voice)
    n_text = len(voice.transcript_ids) + 2
    assert prefix.shape == (1, n_text + voice.num_frames + 1, 2048)
    assert (prefix[0, -1] == 0).all()
    table = model.thinker.model.language_model.embed_tokens.weight
    assert (prefix[0, 0] == table[model.config.text_start_token_id]).all()
    assert (prefix[0, n_text - 1] == table[model.config.text_end_token_id]).all()
