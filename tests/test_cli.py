"""The `chroma-agent` command line, end to end on spoken input."""
import numpy as np
import soundfile as sf

from chroma_agent import Voice
from chroma_agent.cli import main

TRANSCRIPT = "Hello, thanks for calling. How can I help you today?"


def test_respond_with_reference_clip(tiny_checkpoint, speech, tmp_path, capsys):
    out = tmp_path / "answer.wav"
    rc = main(["respond", "--model", str(tiny_checkpoint), "--voice-audio", str(speech["reference"]),
               "--voice-text", TRANSCRIPT, "--input", str(speech["question"]), "--output", str(out),
               "--max-frames", "6", "--seed", "0", "--device", "cpu"])
    assert rc == 0
    audio, rate = sf.read(out)
    assert rate == 24000 and audio.shape == (6 * 1920,)
    err = capsys.readouterr().err
    assert "6 frames" in err and "real-time factor" in err


def test_voice_file_then_respond_is_repeatable(tiny_checkpoint, speech, tmp_path):
    voice_file = tmp_path / "caller.voice.safetensors"
    assert main(["voice", "--model", str(tiny_checkpoint), "--audio", str(speech["reference"]),
                 "--text", TRANSCRIPT, "--output", str(voice_file), "--device", "cpu"]) == 0
    assert Voice.load(voice_file).transcript == TRANSCRIPT
    outs = []
    for name in ("a.wav", "b.wav"):
        assert main(["respond", "--model", str(tiny_checkpoint), "--voice", str(voice_file),
                     "--input", str(speech["question"]), "--output", str(tmp_path / name),
                     "--max-frames", "4", "--greedy", "--device", "cpu"]) == 0
        outs.append(sf.read(tmp_path / name)[0])
    assert np.array_equal(outs[0], outs[1])


def test_bad_input_is_a_clear_error(tiny_checkpoint, speech, tmp_path, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    rc = main(["respond", "--model", str(tiny_checkpoint), "--voice-audio", str(speech["reference"]),
               "--voice-text", TRANSCRIPT, "--input", str(bad), "--output", str(tmp_path / "o.wav"),
               "--device", "cpu"])
    assert rc == 2
    assert "cannot read audio file" in capsys.readouterr().err
    assert not (tmp_path / "o.wav").exists()


def test_missing_checkpoint_is_a_clear_error(tmp_path, speech, capsys):
    rc = main(["voice", "--model", str(tmp_path), "--audio", str(speech["reference"]), "--text", "hi",
               "--output", str(tmp_path / "v.safetensors"), "--device", "cpu"])
    assert rc == 2
    assert "config.json not found" in capsys.readouterr().err
