"""Bad audio gets a clear error naming the problem; good audio of any rate/layout is accepted."""
import numpy as np
import pytest

from chroma_agent import AudioError

RATE = 16000


def tone(seconds, rate=RATE, amp=0.3):
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


@pytest.mark.parametrize("load", ["load_user_audio", "load_voice_audio"])
def test_unreadable_file(model, tmp_path, load):
    bad = tmp_path / "notes.wav"
    bad.write_text("this is not audio")
    with pytest.raises(AudioError, match="cannot read audio file .*notes.wav"):
        getattr(model.processor, load)(bad)


def test_missing_file(model, tmp_path):
    with pytest.raises(AudioError, match="does not exist"):
        model.processor.load_user_audio(tmp_path / "absent.wav")


def test_empty_audio(model, wav):
    with pytest.raises(AudioError, match="user audio is empty"):
        model.processor.load_user_audio(np.zeros(0, np.float32), RATE)
    with pytest.raises(AudioError, match="voice reference is empty"):
        model.processor.load_voice_audio(wav(np.zeros(0, np.float32), 24000))


def test_silent_audio(model):
    with pytest.raises(AudioError, match="silent"):
        model.processor.load_user_audio(np.zeros(RATE, np.float32), RATE)


def test_too_short_and_too_long(model):
    with pytest.raises(AudioError, match="too short: 0.050 s"):
        model.processor.load_user_audio(tone(0.05), RATE)
    with pytest.raises(AudioError, match="voice reference is too short"):
        model.processor.load_voice_audio(tone(0.2), RATE)
    with pytest.raises(AudioError, match="too long: 31.0 s"):
        model.processor.load_user_audio(tone(31.0), RATE)


def test_array_needs_its_rate_and_sane_values(model):
    with pytest.raises(AudioError, match="needs its sample_rate"):
        model.processor.load_user_audio(tone(1.0))
    with pytest.raises(AudioError, match="NaN"):
        model.processor.load_user_audio(np.full(RATE, np.nan, np.float32), RATE)
    with pytest.raises(AudioError, match="1-D or 2-D"):
        model.processor.load_user_audio(np.zeros((2, 2, RATE), np.float32), RATE)
    with pytest.raises(AudioError, match="not a valid audio rate"):
        model.processor.load_user_audio(tone(1.0), 0)


def test_file_rate_conflict(model, wav):
    path = wav(tone(1.0, 22050), 22050)
    with pytest.raises(AudioError, match="is 22050 Hz but sample_rate=16000"):
        model.processor.load_user_audio(path, 16000)


def test_any_rate_and_layout_is_resampled_to_mono(model, wav):
    stereo = np.stack([tone(1.0, 44100), tone(1.0, 44100)], axis=1)
    out = model.processor.load_voice_audio(wav(stereo, 44100), None)
    assert out.ndim == 1 and out.dtype == np.float32 and out.size == 24000
    pcm16 = (tone(1.0, 8000) * 32767).astype(np.int16)
    user = model.processor.load_user_audio(pcm16, 8000)
    assert user.size == RATE and 0.25 < np.abs(user).max() < 0.35  # int16 scaled to [-1, 1)
    channels_first = np.stack([tone(1.0), tone(1.0)])
    assert model.processor.load_user_audio(channels_first, RATE).shape == (RATE,)


def test_generate_rejects_bad_audio_before_any_work(model, voice):
    with pytest.raises(AudioError, match="silent"):
        model.generate(voice, audio=np.zeros(RATE, np.float32), sample_rate=RATE)
